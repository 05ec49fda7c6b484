"""Over-optimisation: best-of-n and its KL, reward-model ensembles, Gao et al.'s fits (rlhf_book.overoptimization)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

import rlhf_book
from rlhf_book import reward_model as rm_mod
from rlhf_book.overoptimization import (
    aggregate_rewards,
    best_of_n,
    best_of_n_distribution,
    best_of_n_kl_bound,
    best_of_n_kl_estimate,
    best_of_n_kl_exact,
    best_of_n_kl_sampled,
    best_of_n_weights,
    ensemble_reward_fn,
    expected_best_of_n,
    fit_gao,
)

PROMPTS = ["Review the film Night Train.", "Review Luigi's.", "Review the novel The Glass Harbour."]


def length_reward(prompts, responses, terminated):
    """A toy reward: characters of the reply, + 0.5 when it ended with EOS."""
    return [len(r) + 0.5 * bool(t) for r, t in zip(responses, torch.as_tensor(terminated).tolist())]


# ----------------------------------------------------------------------------- best-of-n sampling
def test_best_of_n_keeps_the_argmax_of_the_reward(tiny_world):
    lm, tok = tiny_world
    bon = best_of_n(lm, tok, PROMPTS, 6, length_reward, max_new_tokens=10, seed=3, batch_size=7)
    assert bon.scores.shape == bon.logprobs.shape == bon.terminated.shape == (3, 6)
    assert [len(r) for r in bon.responses] == [6, 6, 6] and bon.prompts == PROMPTS
    again = torch.tensor([length_reward([p] * 6, r, t) for p, r, t in zip(PROMPTS, bon.responses, bon.terminated)])
    torch.testing.assert_close(bon.scores, again.float())  # scores are the reward of the kept texts
    for i in range(3):
        first_max = next(j for j in range(6) if bon.scores[i, j] == bon.scores[i].max())
        assert bon.best[i] == first_max  # the argmax; on a tie the first
        assert bon.chosen[i] == bon.responses[i][first_max] and bon.chosen_scores[i] == bon.scores[i].max()
        assert bool(bon.chosen_terminated[i]) == bool(bon.terminated[i, first_max])
    assert (bon.logprobs < 0).all() and torch.isfinite(bon.logprobs).all()
    torch.testing.assert_close(bon.score(length_reward), bon.scores)
    same = best_of_n(lm, tok, PROMPTS, 6, length_reward, max_new_tokens=10, seed=3, batch_size=7)
    assert same.responses == bon.responses  # its own seeded generator: the same draw again
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        best_of_n(lm, tok, PROMPTS, 0, length_reward)
    with pytest.raises(ValueError, match="reward_fn must be a function"):
        best_of_n(lm, tok, PROMPTS, 2, 0.5)


def test_best_of_n_weights_are_the_subset_max_probabilities():
    for n, k in [(1, 1), (5, 1), (5, 2), (7, 3), (6, 6)]:
        w = best_of_n_weights(n, k)
        exact = [math.comb(i - 1, k - 1) / math.comb(n, k) for i in range(1, n + 1)]
        np.testing.assert_allclose(w, exact, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="k must be <= n"):
        best_of_n_weights(3, 4)


def test_expected_best_of_n_is_the_mean_over_all_subsets_ties_included():
    rng = np.random.default_rng(0)
    proxy = rng.integers(0, 4, size=(3, 6)).astype(float)  # few values: many ties
    gold = rng.normal(size=(3, 6))
    ns = [1, 2, 3, 6]
    brute = []
    for k in ns:
        per_prompt = []
        for row in range(3):
            vals = []
            for sub in itertools.combinations(range(6), k):
                top = max(proxy[row, j] for j in sub)
                vals.append(np.mean([gold[row, j] for j in sub if proxy[row, j] == top]))  # random tie-break
            per_prompt.append(np.mean(vals))
        brute.append(np.mean(per_prompt))
    np.testing.assert_allclose(expected_best_of_n(proxy, gold, ns), brute, rtol=1e-12)
    assert expected_best_of_n(proxy, gold, [1])[0] == pytest.approx(gold.mean())
    # one prompt as 1-D, torch tensors, and the proxy curve of itself
    np.testing.assert_allclose(expected_best_of_n(torch.tensor([3.0, 1, 2, 0]), [30, 10, 20, 0], [1, 2, 4]),
                               [15, 140 / 6, 30])
    with pytest.raises(ValueError, match=r"every n' in ns must be an integer in \[1, n=4\], got 5"):
        expected_best_of_n([[1, 2, 3, 4]], [[1, 2, 3, 4]], [1, 5])
    with pytest.raises(ValueError, match="proxy and gold must have one shape"):
        expected_best_of_n([[1, 2, 3]], [[1, 2]], [1])
    with pytest.raises(ValueError, match="gold has a NaN"):
        expected_best_of_n([[1, 2]], [[1, float("nan")]], [1])


# ----------------------------------------------------------------------------- KL of best-of-n
def test_kl_bound_formula():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl_bound(64) == pytest.approx(math.log(64) - 63 / 64)
    bounds = [best_of_n_kl_bound(n) for n in range(1, 50)]
    assert (np.diff(bounds) > 0).all()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            best_of_n_kl_bound(bad)


def test_exact_kl_approaches_the_bound_from_below_for_distinct_rewards():
    rng = np.random.default_rng(1)
    for n in (2, 4, 16):
        bound = best_of_n_kl_bound(n)
        gaps = []
        for K in (20, 200, 5000):
            p = rng.dirichlet(np.full(K, 50.0))  # near uniform, every atom small
            kl = best_of_n_kl_exact(p, rng.permutation(K).astype(float), n)
            assert kl < bound
            gaps.append(bound - kl)
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3 * bound
    assert best_of_n_kl_exact(np.ones(10) / 10, np.arange(10), 1) == pytest.approx(0.0, abs=1e-12)


def test_exact_best_of_n_matches_enumeration_of_all_n_tuples_with_ties():
    p = np.array([0.5, 0.3, 0.2, 0.0])
    r = np.array([1.0, 0.0, 1.0, 5.0])  # atoms 0 and 2 tie; atom 3 has the top reward but no mass
    n = 3
    pi = np.zeros(4)
    for t in itertools.product(range(4), repeat=n):  # best-of-3 keeping the first of the tied maxima
        prob = np.prod(p[list(t)])
        top = max(r[j] for j in t)
        pi[next(j for j in t if r[j] == top)] += prob
    np.testing.assert_allclose(best_of_n_distribution(p, r, n), pi, atol=1e-15)
    keep = p > 0
    assert best_of_n_kl_exact(p, r, n) == pytest.approx(float(np.sum(pi[keep] * np.log(pi[keep] / p[keep]))))
    # tied atoms share one ratio pi_n / p, and every reply tied: best-of-n is p itself
    ratio = best_of_n_distribution(p, r, n)[keep] / p[keep]
    assert ratio[0] == pytest.approx(ratio[2])
    np.testing.assert_allclose(best_of_n_distribution([0.2, 0.8], [1.0, 1.0], 5), [0.2, 0.8])
    assert best_of_n_kl_exact([0.2, 0.8], [1.0, 1.0], 5) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"p": [0.5, 0.6], "rewards": [0.0, 1.0]}, "p must be a probability vector"),
    ({"p": [1.5, -0.5], "rewards": [0.0, 1.0]}, "p must be a probability vector"),
    ({"p": [0.5, 0.5], "rewards": [0.0]}, "p and rewards must have one shape"),
    ({"p": [0.5, 0.5], "rewards": [0.0, float("nan")]}, "rewards has a NaN"),
])
def test_exact_kl_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        best_of_n_kl_exact(n=2, **kwargs)


def test_monte_carlo_kl_agrees_with_the_exact_categorical_kl():
    # a toy "LM" whose sequence probabilities we control: K replies, p = counts / M, distinct rewards
    rng = np.random.default_rng(2)
    K, n = 40, 4
    counts = rng.integers(1, 30, size=K)
    p = counts / counts.sum()
    r = rng.normal(size=K)
    ref = np.repeat(r, counts)  # the m reference rewards: with these F_< is exact
    exact = best_of_n_kl_exact(p, r, n)
    J = 20_000
    draws = rng.choice(K, size=(J, n), p=p)
    y = draws[np.arange(J), np.argmax(r[draws], 1)]  # J best-of-n draws
    est = best_of_n_kl_estimate(np.log(p[y]), r[y], ref, n)
    assert est.shape == (1,)
    # the per-draw terms log(pi_n / p) have mean = exact; 4 standard errors
    pi = best_of_n_distribution(p, r, n)
    terms = np.log(pi[y] / p[y])
    assert est[0] == pytest.approx(terms.mean(), rel=1e-9)
    assert abs(est[0] - exact) < 4 * terms.std() / math.sqrt(J)
    # F_< from m i.i.d. samples instead: still close; two prompts at once give one estimate each
    sampled_ref = r[rng.choice(K, size=(2, 4000), p=p)]
    est2 = best_of_n_kl_estimate(np.log(p[y]).reshape(2, -1), r[y].reshape(2, -1), sampled_ref, n)
    assert est2.shape == (2,) and np.abs(est2 - exact).max() < 0.05
    assert (est <= math.log(n)).all()  # pi_n / p <= n always


def test_monte_carlo_kl_handles_tiny_sequence_probabilities():
    # log p = -200: (F + p)^n - F^n cancels in floating point; the log form keeps n F^(n-1)
    est = best_of_n_kl_estimate([[-200.0]], [[1.0]], [[0.0, 0.0, 2.0, 2.0]], 3)  # F_< = 1/2
    assert est[0] == pytest.approx(math.log(3 * 0.25))
    est = best_of_n_kl_estimate([[-200.0]], [[1.0]], [[2.0, 3.0]], 3)  # F_< = 0: ratio p^(n-1)
    assert est[0] == pytest.approx(-400.0)
    with pytest.raises(ValueError, match=r"logp must be log-probabilities \(<= 0\)"):
        best_of_n_kl_estimate([[0.5]], [[1.0]], [[0.0]], 2)
    with pytest.raises(ValueError, match="ref_rewards must have one row per prompt"):
        best_of_n_kl_estimate([[-1.0], [-1.0]], [[1.0], [1.0]], [[0.0, 1.0]], 2)
    with pytest.raises(ValueError, match="logp and rewards must have one shape"):
        best_of_n_kl_estimate([[-1.0, -2.0]], [[1.0]], [[0.0]], 2)


def test_monte_carlo_kl_on_the_tiny_world(tiny_world):
    lm, tok = tiny_world
    out = best_of_n_kl_sampled(lm, tok, PROMPTS[:2], 4, length_reward, draws=4, max_new_tokens=10, seed=0)
    assert set(out) == {"kl", "kl_per_prompt", "bound", "n", "draws"} and out["kl_per_prompt"].shape == (2,)
    assert math.isfinite(out["kl"]) and out["kl"] <= math.log(4) + 1e-9
    assert out["bound"] == best_of_n_kl_bound(4)
    one = best_of_n_kl_sampled(lm, tok, PROMPTS[:2], 1, length_reward, draws=8, max_new_tokens=10)
    assert one["kl"] == pytest.approx(0.0, abs=1e-6)  # best-of-1 is the base policy: every log-ratio is 0


# ----------------------------------------------------------------------------- ensembles
def _const(values):
    return lambda prompts, responses, terminated=None: torch.tensor(values, dtype=torch.float32)


def test_ensemble_aggregations_on_hand_cases():
    a, b = _const([1.0, 2.0, 3.0]), _const([3.0, 2.0, 1.0])
    args = (["x"] * 3, ["a", "b", "c"], [True] * 3)
    expected = {("mean", 1.0): [2, 2, 2], ("min", 1.0): [1, 2, 1], ("mean_minus_std", 0.5): [1.5, 2, 1.5],
                ("mean_minus_var", 2.0): [0, 2, 0]}  # std = var = 1 where the members disagree by 2
    for (agg, lam), want in expected.items():
        fn = ensemble_reward_fn([a, b], agg, lam)
        out = fn(*args)
        assert out.dtype == torch.float32 and out.shape == (3,)
        torch.testing.assert_close(out, torch.tensor(want, dtype=torch.float32))
    torch.testing.assert_close(ensemble_reward_fn([a])(*args), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(ensemble_reward_fn([a], "mean_minus_std", 3.0)(*args), torch.tensor([1.0, 2.0, 3.0]))
    scores = torch.tensor([[0.0, 4.0], [2.0, 4.0], [4.0, 4.0]])  # 3 members
    torch.testing.assert_close(aggregate_rewards(scores, "mean_minus_std", 1.0),
                               torch.tensor([2.0 - math.sqrt(8 / 3), 4.0]))
    torch.testing.assert_close(ensemble_reward_fn([a, b]).members(*args), torch.tensor([[1.0, 2, 3], [3.0, 2, 1]]))


def test_ensemble_is_a_reward_function_anywhere(tiny_world):
    lm, tok = tiny_world

    class Movable:
        def __init__(self):
            self.device = None

        def __call__(self, prompts, responses, terminated=None):
            return length_reward(prompts, responses, terminated)

        def to(self, device):
            self.device = device
            return self

    member = Movable()
    ens = ensemble_reward_fn([member, length_reward], "min")
    assert ens.to("cpu") is ens and member.device == "cpu"
    bon = best_of_n(lm, tok, PROMPTS[:2], 3, ens, max_new_tokens=8)
    torch.testing.assert_close(bon.scores, bon.score(length_reward))


@pytest.mark.parametrize("args, message", [
    (([],), "reward_fns must be a non-empty list"),
    ((length_reward,), "reward_fns must be a non-empty list"),
    (([length_reward, 3],), r"reward_fns\[1\] must be a function"),
    (([length_reward], "median"), "aggregate must be one of mean, min, mean_minus_std, mean_minus_var"),
    (([length_reward], "mean_minus_std", -1.0), "lam must be a finite number >= 0"),
    (([length_reward], "mean_minus_std", float("nan")), "lam must be a finite number >= 0"),
])
def test_ensemble_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        ensemble_reward_fn(*args)


def test_ensemble_names_a_member_that_returns_the_wrong_count():
    with pytest.raises(ValueError, match=r"reward_fns\[1\] returned 2 scores for 3 replies"):
        ensemble_reward_fn([_const([1.0, 2, 3]), _const([1.0, 2])])(["x"] * 3, ["a", "b", "c"])


def _pairs(n):
    good = ["It was great and the staff were kind.", "A lovely film, warm and funny.", "The food was superb."]
    bad = ["It was bad.", "bad bad bad bad", "The the the the."]
    return [{"prompt": PROMPTS[i % 3], "chosen": good[i % 3], "rejected": bad[(i + 1) % 3]} for i in range(n)]


def test_ensemble_member_records_are_seeded_subsets():
    recs = _pairs(20)
    assert rm_mod.ensemble_member_records(recs, seed=0) == recs
    half = rm_mod.ensemble_member_records(recs, seed=1, data_fraction=0.5)
    assert len(half) == 10 and all(r in recs for r in half)
    assert half == rm_mod.ensemble_member_records(recs, seed=1, data_fraction=0.5)
    assert half != rm_mod.ensemble_member_records(recs, seed=2, data_fraction=0.5)
    with pytest.raises(ValueError, match=r"data_fraction must be a number in \(0, 1\], got 0"):
        rm_mod.ensemble_member_records(recs, seed=0, data_fraction=0)


def test_label_noise_flips_the_same_pairs_for_every_member():
    recs = [{**r, "chosen_gold": 1.0, "rejected_gold": 0.0} for r in _pairs(400)]
    noisy = rm_mod.flip_labels(recs, 0.25)
    flipped = [a["chosen"] != b["chosen"] for a, b in zip(recs, noisy)]
    assert 0.18 < sum(flipped) / len(recs) < 0.32
    for a, b, f in zip(recs, noisy, flipped):  # every chosen_* / rejected_* field swapped together
        assert (b["chosen"], b["rejected"], b["chosen_gold"]) == ((a["rejected"], a["chosen"], 0.0) if f else
                                                                  (a["chosen"], a["rejected"], 1.0))
    assert rm_mod.ensemble_member_records(recs, seed=1, label_noise=0.25) == noisy  # the raters' noise, not the seed's
    assert rm_mod.ensemble_member_records(recs, seed=2, label_noise=0.25) == noisy
    assert rm_mod.artifact_name("tiny", member={"seed": 0, "label_noise": 0.0}) == rm_mod.artifact_name("tiny")
    assert rm_mod.artifact_name("tiny", member={"seed": 0, "label_noise": 0.25}) != rm_mod.artifact_name("tiny")
    with pytest.raises(ValueError, match=r"label_noise \(the share of flipped labels\) must be a number in \[0, 1\)"):
        rm_mod.flip_labels(recs, 1.0)


def test_train_reward_ensemble_on_the_tiny_world(tiny_world):
    lm, tok = tiny_world
    ref = rlhf_book.generate(lm, tok, PROMPTS * 4, max_new_tokens=10, generator=torch.Generator().manual_seed(0))
    reference = (ref.prompts, ref.responses, ref.terminated)
    kw = {"epochs": 1, "batch_size": 8, "lr": 3e-3, "progress": False}
    lm_before = {k: v.clone() for k, v in lm.state_dict().items()}
    models, hists = rlhf_book.train_reward_ensemble(lm, tok, _pairs(24), k=2, seeds=[5, 6], data_fraction=0.75,
                                                    head_init_std=0.05, reference=reference, **kw)
    assert len(models) == len(hists) == 2 and all(len(h) == 3 for h in hists)  # 18 pairs / 8 = 3 steps each
    fns = [rlhf_book.reward_fn_from_model(m, tok) for m in models]
    scores = torch.stack([f(*reference) for f in fns])
    assert scores.mean(1).abs().max() < 1e-4 and (scores.std(1) - 1).abs().max() < 1e-4  # each normalised
    assert not torch.allclose(scores[0], scores[1])  # different seeds, subsets and head starts: different models
    torch.testing.assert_close(ensemble_reward_fn(fns, "min")(*reference), scores.min(0).values)
    again, _ = rlhf_book.train_reward_ensemble(lm, tok, _pairs(24), k=1, seeds=[6], data_fraction=0.75,
                                               head_init_std=0.05, reference=reference, **kw)
    torch.testing.assert_close(rlhf_book.reward_fn_from_model(again[0], tok)(*reference), scores[1])  # seeded
    assert all(torch.equal(v, lm_before[k]) for k, v in lm.state_dict().items())  # the shared LM is not trained
    assert not torch.equal(models[0].transformer.wte.weight, lm.transformer.wte.weight)  # each member's own trunk
    with pytest.raises(ValueError, match="seeds must differ"):
        rlhf_book.train_reward_ensemble(lm, tok, _pairs(8), k=2, seeds=[1, 1], **kw)
    with pytest.raises(ValueError, match="k must be an integer >= 1 and seeds"):
        rlhf_book.train_reward_ensemble(lm, tok, _pairs(8), k=3, seeds=[1, 2], **kw)


def test_ensemble_members_have_their_own_cache_keys():
    book = rm_mod.artifact_name("tiny")
    assert rm_mod.artifact_name("tiny", member={"seed": rm_mod.RM_RECIPES["tiny"].seed}) == book  # member 0 = book
    keys = {rm_mod.artifact_name("tiny", member=m) for m in
            [{"seed": 1}, {"seed": 2}, {"seed": 0, "data_fraction": 0.5}, {"seed": 0, "head_init_std": 0.02}]}
    assert len(keys) == 4 and book not in keys and all(k.startswith("rm-tiny-") for k in keys)
    with pytest.raises(ValueError, match="member: unknown keys"):
        rm_mod.artifact_name("tiny", member={"sead": 1})
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        rlhf_book.load_reward_ensemble("tiny", k=0)
    with pytest.raises(ValueError, match="head_init_std must be a finite number >= 0"):
        rlhf_book.load_reward_ensemble("tiny", k=2, head_init_std=-1.0)


# ----------------------------------------------------------------------------- Gao et al.'s fits
@pytest.mark.parametrize("form, alpha, beta, d_peak", [
    ("bon", 1.2, 0.3, 2.0), ("rl", 0.8, 0.4, math.exp(0.8 / 0.4 - 1)),
])
def test_fit_gao_recovers_known_coefficients(form, alpha, beta, d_peak):
    kl = np.linspace(0, 12, 25)
    d = np.sqrt(kl)
    second = d**2 if form == "bon" else np.where(d > 0, d * np.log(np.where(d > 0, d, 1)), 0)
    reward = alpha * d - beta * second
    fit = fit_gao(kl, reward, form)
    assert fit.form == form and fit.n_points == 25
    assert fit.alpha == pytest.approx(alpha, rel=1e-10) and fit.beta == pytest.approx(beta, rel=1e-10)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.d_peak == pytest.approx(d_peak) and fit.kl_peak == pytest.approx(d_peak**2)
    np.testing.assert_allclose(fit.predict(kl), reward, atol=1e-10)
    assert fit.predict(4.0).shape == ()
    noisy = reward + np.random.default_rng(0).normal(0, 0.01, size=kl.shape)
    fit = fit_gao(torch.tensor(kl), list(noisy), form)
    assert fit.alpha == pytest.approx(alpha, abs=0.03) and fit.beta == pytest.approx(beta, abs=0.03)
    assert 0.97 < fit.r2 < 1.0


def test_fit_gao_peak_when_the_curve_never_turns_down():
    kl = [0.0, 1.0, 4.0, 9.0]
    d = np.sqrt(kl)
    assert fit_gao(kl, d + 0.1 * d**2, "bon").d_peak == math.inf  # beta = -0.1: curves up
    assert fit_gao(kl, -d - 0.1 * d**2, "bon").d_peak == 0.0  # alpha < 0 < beta: never rises


@pytest.mark.parametrize("kl, reward, form, message", [
    ([0.0, 1.0, float("nan")], [0.0, 1.0, 2.0], "bon", "kl has a NaN"),
    ([0.0, 1.0, 2.0], [0.0, float("inf"), 2.0], "bon", "reward has a NaN or infinite value"),
    ([0.0, -1.0, 2.0], [0.0, 1.0, 2.0], "bon", "kl must be >= 0, got -1 at index 1"),
    ([0.0, 1.0], [0.0, 1.0], "bon", "kl needs at least 3 points"),
    ([0.0, 0.0, 1.0], [0.0, 0.0, 1.0], "rl", "kl needs at least 3 points, 2 distinct ones > 0"),
    ([0.0, 1.0, 2.0], [0.0, 1.0], "bon", "kl and reward must have one length"),
    ([0.0, 1.0, 2.0], [0.0, 1.0, 2.0], "power", "form must be one of bon, rl"),
    ([[0.0, 1.0, 2.0]], [0.0, 1.0, 2.0], "bon", "kl must have 1 dimensions"),
])
def test_fit_gao_rejects_bad_input(kl, reward, form, message):
    with pytest.raises(ValueError, match=message):
        fit_gao(kl, reward, form)


def test_load_reward_ensemble_caches_each_member(tiny_cache_dir, tiny_artifacts, monkeypatch):
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tiny_cache_dir))  # the session's tiny base LM, data and reward model
    models, tok = rlhf_book.load_reward_ensemble("tiny", k=2, device="cpu", progress=False)
    assert len(models) == 2 and not models[0].training
    assert rm_mod.reward_model_path("tiny") == tiny_artifacts["rm"]  # member 0 is the book's reward model
    seed1 = rm_mod.reward_model_path("tiny", member={"seed": rm_mod.RM_RECIPES["tiny"].seed + 1})
    meta = json.loads((seed1 / "metadata.json").read_text())
    assert meta["member"] == {"seed": 1, "data_fraction": 1.0, "head_init_std": 0.0}
    book, _ = rlhf_book.load_reward_model("tiny", device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), book.state_dict().values()))
    fns = [rlhf_book.reward_fn_from_model(m, tok) for m in models]
    texts = (PROMPTS, ["It was great.", "bad bad bad", "A fine book."], [True, True, False])
    s0, s1 = fns[0](*texts), fns[1](*texts)
    assert not torch.allclose(s0, s1)  # another batch order: another model
    torch.testing.assert_close(ensemble_reward_fn(fns, "mean")(*texts), (s0 + s1) / 2)
