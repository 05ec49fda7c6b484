"""Critic-free RL: advantages and loss aggregations by hand, GSPO, clip-higher, pass@k, a real run, resume."""

import copy
import itertools
import math
from dataclasses import fields
from fractions import Fraction

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch

from rlhf_book.config import describe
from rlhf_book.corpus import prompt_split
from rlhf_book.critic import PolicyWithValueHead
from rlhf_book.critic_free import (CriticFreeConfig, CriticFreeTrainer, RunningMeanBaseline, aggregate_loss,
                                   critic_free_policy_loss, degenerate_groups, evaluate_pass_at_k, grpo_advantages,
                                   pass_at_k, rloo_advantages, sequence_rewards)
from rlhf_book.kl import sequence_kl
from rlhf_book.rollout import Rollout, generate, prompt_texts

LN2 = math.log(2.0)
K3_HALF = -0.5 + LN2  # k3 with r = pi_ref / pi_theta = 1/2: (r - 1) - log r = 0.1931...


# ------------------------------------------------------------------ advantages
def test_rloo_is_reward_minus_the_mean_of_the_others():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    # group 1: the others' means are 11/3, 10/3, 3, 2; group 2: 2/3, 2/3, 1/3, 1/3; group 3 is degenerate
    expect = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], [-2 / 3, -2 / 3, 2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rloo_advantages(r), expect)
    torch.testing.assert_close(rloo_advantages(r), 4 / 3 * (r - r.mean(1, keepdim=True)))  # = K/(K-1) (r - mean)
    assert rloo_advantages(torch.tensor([[1.0, 3.0]])).tolist() == [[-2.0, 2.0]]  # K = 2: the other one is the baseline
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_advantages(torch.tensor([[1.0], [2.0]]))


def test_grpo_group_std_and_degenerate_groups_give_zero_not_nan():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.1, 0.1, 0.1, 0.1]])
    # group 1: mean 3, centred (-2, -1, 0, 3), Bessel std sqrt(14 / 3) = 2.1602; group 2: all equal
    std = math.sqrt(14 / 3)
    a = grpo_advantages(r)  # scale="group", eps=1e-4 (TRL)
    torch.testing.assert_close(a[0], torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-4))
    assert a[1].tolist() == [0.0] * 4
    for eps in (1e-4, 0.0):  # 0/0 without the explicit zero
        for scale in ("group", "batch", "none"):
            z = grpo_advantages(torch.full((3, 5), 0.7), scale, eps)
            assert torch.equal(z, torch.zeros(3, 5)), (scale, eps)
    assert degenerate_groups(r).tolist() == [False, True]


def test_grpo_scale_none_and_batch_on_hand_cases():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    centred = torch.tensor([[-2.0, -1.0, 0.0, 3.0], [-0.5, -0.5, 0.5, 0.5]])
    assert torch.equal(grpo_advantages(r, "none"), centred)  # Dr. GRPO: only the group mean
    # batch std: the 8 rewards have mean 1.75 and squared deviations summing to 27.5 -> sqrt(27.5 / 7) = 1.98206
    torch.testing.assert_close(grpo_advantages(r, "batch"), centred / (math.sqrt(27.5 / 7) + 1e-4))
    # group std: the easy-looking second group (std 0.577) is blown up more than the first (std 2.16)
    g = grpo_advantages(r, "group")
    assert g[1].abs().max() > 0.8 > (centred[1].abs().max() / math.sqrt(27.5 / 7))
    with pytest.raises(ValueError, match="scale must be one of"):
        grpo_advantages(r, "std")
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        grpo_advantages(torch.ones(4))


def test_running_mean_baseline_uses_only_past_batches_and_round_trips():
    b = RunningMeanBaseline(decay=0.5)
    assert b.advantages(torch.tensor([0.0, 2.0])).tolist() == [0.0, 2.0]  # b = 0 before any batch
    assert b.value == 1.0  # bias-corrected: the first batch's mean, whatever the decay
    assert b.advantages(torch.tensor([3.0, 3.0])).tolist() == [2.0, 2.0]  # r - 1
    assert b.value == pytest.approx((0.5 * 1 + 1 * 3) / 1.5)  # weights 0.5, 1 on the means 1, 3
    c = RunningMeanBaseline(0.9)
    c.load_state_dict(b.state_dict())
    assert c.value == b.value and c.decay == 0.5
    with pytest.raises(ValueError, match="decay"):
        RunningMeanBaseline(1.0)


# ------------------------------------------------------------------ aggregation and the clipped loss
def test_each_loss_type_on_a_hand_case():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(x, mask, "grpo").item() == pytest.approx(3.0)  # sequence means 2 and 4 -> 3
    assert aggregate_loss(x, mask, "bnpo").item() == pytest.approx(2.5)  # 10 over 4 tokens
    assert aggregate_loss(x, mask, "dr_grpo", max_completion_length=5).item() == pytest.approx(1.0)  # 10 / (2 * 5)
    assert aggregate_loss(x, mask, "dapo").item() == pytest.approx(2.5)  # num_items defaults to these 4 tokens
    assert aggregate_loss(x, mask, "dapo", num_items=8).item() == pytest.approx(1.25)  # 10 / 8
    # one value per sequence (sequence-level ratio), broadcast over its tokens: grpo 3, token-level mean (6 + 4) / 4
    seq = torch.tensor([[2.0], [4.0]])
    assert aggregate_loss(seq, mask, "grpo").item() == pytest.approx(3.0)
    assert aggregate_loss(seq, mask, "bnpo").item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(x, mask, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aggregate_loss(x, mask, "token_mean")


def _loss(lp, old, adv, mask, **kw):
    x = lp.clone().requires_grad_(True)
    loss, stats = critic_free_policy_loss(x, old, adv, mask, **kw)
    loss.backward()
    return loss.item(), stats, x.grad


def test_token_vs_sequence_level_ratio_gspo_on_a_hand_case():
    old = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.long)
    adv = torch.tensor([1.0])
    # token ratios 2 and 1/2, A = +1, eps = 0.2: -min(2, 1.2) = -1.2 (clipped), -min(0.5, 0.8) = -0.5 -> mean -0.85
    lp = old + torch.log(torch.tensor([[2.0, 0.5]]))
    loss, s, grad = _loss(lp, old, adv, mask, loss_type="grpo")
    assert loss == pytest.approx(-0.85) and s["clipfrac"] == 0.5 and s["clip_high"] == 0.5
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.25]]))  # d(-w A / 2)/dlogp = -w / 2 where unclipped
    # sequence ratio exp(mean(ln 2, ln 1/2)) = 1: inside the clip, loss -1, both tokens get -w A / |y| = -0.5
    loss, s, grad = _loss(lp, old, adv, mask, loss_type="grpo", importance_sampling_level="sequence")
    assert loss == pytest.approx(-1.0) and s["clipfrac"] == 0.0 and s["ratio_mean"] == pytest.approx(1.0)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -0.5]]))
    # ratios 1.5 and 1.5: the sequence ratio 1.5 is clipped as a whole -> -1.2, no gradient anywhere
    loss, s, grad = _loss(old + math.log(1.5), old, adv, mask, loss_type="grpo", importance_sampling_level="sequence")
    assert loss == pytest.approx(-1.2) and s["clipfrac"] == 1.0 and torch.equal(grad, torch.zeros(1, 2))


def test_epsilon_high_clips_asymmetrically():
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.25, 1.25, 0.75]]))
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.long)
    # symmetric (0.8, 1.2): -min(1.25, 1.2) = -1.2 (clipped high), -min(-1.25, -1.2) = 1.25, -min(-0.75, -0.8) = 0.8
    loss, s, grad = _loss(lp, old, adv, mask, loss_type="bnpo", epsilon=0.2)
    assert loss == pytest.approx((-1.2 + 1.25 + 0.8) / 3)
    assert s["clip_high"] == pytest.approx(1 / 3) and s["clip_low"] == pytest.approx(1 / 3)
    # clip-higher (0.8, 1.28): the first token is inside now, -1.25; the lower clip is unchanged
    loss, s, grad = _loss(lp, old, adv, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=0.28)
    assert loss == pytest.approx((-1.25 + 1.25 + 0.8) / 3)
    assert s["clip_high"] == 0.0 and s["clip_low"] == pytest.approx(1 / 3)
    torch.testing.assert_close(grad, torch.tensor([[-1.25 / 3, 1.25 / 3, 0.0]]))


def test_kl_in_the_loss_is_k3_aggregated_like_the_policy_term():
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    ref = old - LN2  # pi_ref = pi_theta / 2 on every token: k3 = 0.1931 per token
    adv = torch.tensor([1.0, -1.0])
    for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
        kw = dict(loss_type=loss_type, max_completion_length=4)
        pg, _ = critic_free_policy_loss(old, old, adv, mask, **kw)
        total, s = critic_free_policy_loss(old, old, adv, mask, ref_logprobs=ref, beta=0.5, **kw)
        k3 = aggregate_loss(torch.full((2, 3), K3_HALF), mask, loss_type, 4)
        assert total.item() == pytest.approx(pg.item() + 0.5 * k3.item()), loss_type
        assert s["kl_loss"] == pytest.approx(K3_HALF) and s["policy_loss"] == pytest.approx(pg.item())
    # grpo: the two sequences' means of -w A are -1 and +1 -> 0; bnpo: (-3 + 1) / 4 = -0.5
    assert critic_free_policy_loss(old, old, adv, mask, loss_type="grpo")[0].item() == pytest.approx(0.0)
    assert critic_free_policy_loss(old, old, adv, mask, loss_type="bnpo")[0].item() == pytest.approx(-0.5)


def test_bias_corrected_kl_has_the_same_value_and_gains_k3_grad_log_pi():
    """TRL 1.16's use_bias_correction_kl: beta * k3 * w; on-policy (w = 1) the value is unchanged and the
    gradient of each token's log-prob gains beta * k3_t / (tokens), the k3 * grad log pi term."""
    old = torch.tensor([[-1.0, -0.5, -2.0], [-1.5, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ref = old - torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, 0.0]])
    zero_adv = torch.zeros(2)  # only the KL term has a gradient
    grads, values = [], []
    for corrected in (False, True):
        lp = old.clone().requires_grad_()
        loss, _ = critic_free_policy_loss(lp, old, zero_adv, mask, loss_type="bnpo", ref_logprobs=ref, beta=0.5,
                                          use_bias_correction_kl=corrected)
        loss.backward()
        grads.append(lp.grad)
        values.append(loss.item())
    assert values[0] == pytest.approx(values[1])
    k3 = (torch.exp(ref - old) - 1) - (ref - old)
    torch.testing.assert_close(grads[1] - grads[0], 0.5 * k3 * mask / mask.sum())


def test_identity_ratio_is_one_and_nothing_clipped():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g)
    adv = torch.randn(4, generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    for level in ("token", "sequence"):
        loss, s = critic_free_policy_loss(lp.clone().requires_grad_(True), lp, adv, mask,
                                          importance_sampling_level=level, ref_logprobs=lp, beta=0.1)
        assert s["ratio_mean"] == 1.0 and s["clipfrac"] == 0.0 and s["approx_kl"] == 0.0 and s["kl_loss"] == 0.0
        assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)  # -mean A at w = 1, no KL


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_loss_is_padding_invariant(loss_type, level):
    g = torch.Generator().manual_seed(3)
    B, T, pad = 3, 5, 4
    old = -torch.rand(B, T, generator=g)
    new = old + 0.4 * torch.randn(B, T, generator=g)
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    kw = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=12, beta=0.1)
    loss, s, grad = _loss(new, old, adv, mask, ref_logprobs=ref, **kw)

    def garbage(x, fill):  # fill the masked positions and add padded columns of NaN
        return torch.cat([torch.where(mask.bool(), x, torch.full_like(x, fill)), torch.full((B, pad), float("nan"))], 1)

    mask2 = torch.cat([mask, torch.zeros(B, pad, dtype=torch.long)], 1)
    loss2, s2, grad2 = _loss(garbage(new, float("inf")), garbage(old, float("nan")), adv, mask2,
                             ref_logprobs=garbage(ref, float("-inf")), **kw)
    assert loss2 == pytest.approx(loss, abs=1e-6) and s2 == pytest.approx(s)
    torch.testing.assert_close(grad2[:, :T], torch.where(mask.bool(), grad, 0.0))
    assert torch.equal(grad2[:, T:], torch.zeros(B, pad))


def test_loss_rejects_bad_input():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="epsilon_high"):
        critic_free_policy_loss(z, z, z, z.long(), epsilon_high=0.0)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        critic_free_policy_loss(z, z, z, z.long(), importance_sampling_level="seq")
    with pytest.raises(ValueError, match="advantages"):
        critic_free_policy_loss(z, z, torch.zeros(3), z.long())


# ------------------------------------------------------------------ pass@k
def _brute_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share correct
    big = 1 - Fraction(math.comb(497, 100), math.comb(500, 100))  # binomials far beyond a float
    assert pass_at_k(500, 3, 100) == pytest.approx(float(big), rel=1e-12)
    for bad in [(0, 0, 1), (5, 6, 1), (5, 2, 6), (5, 2, 0), (5.0, 2, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_evaluate_pass_at_k_on_the_tiny_world(tiny_world):
    lm, tok = tiny_world
    prompts = PROMPTS[:3]
    words = lambda p, r, t: [float(len(x.split())) for x in r]  # noqa: E731
    out = evaluate_pass_at_k(lm, tok, prompts, words, tau=4.0, n=6, ks=[1, 3, 6], max_new_tokens=8, batch_size=7)
    assert len(out["correct"]) == 3 and all(0 <= c <= 6 for c in out["correct"])
    assert [sum(v >= 4.0 for v in row) for row in out["scores"]] == out["correct"]  # the scores recount c
    assert 0 < sum(out["correct"]) < 18, out  # the threshold splits this model's replies
    assert out["pass@1"] == pytest.approx(out["accuracy"])
    assert out["pass@6"] == pytest.approx(sum(c > 0 for c in out["correct"]) / 3)
    assert out["pass@1"] <= out["pass@3"] <= out["pass@6"]
    again = evaluate_pass_at_k(lm, tok, prompts, words, tau=4.0, n=6, ks=[1, 3, 6], max_new_tokens=8, batch_size=7)
    assert again == out  # its own seeded generator: the same replies each time
    other = evaluate_pass_at_k(lm, tok, prompts, words, tau=4.0, n=6, ks=[1, 3, 6], max_new_tokens=8, batch_size=7,
                               seed=1)
    assert other["correct"] != out["correct"]  # ... and another seed samples others
    always = evaluate_pass_at_k(lm, tok, prompts, lambda p, r, t: [1.0] * len(r), tau=1.0, n=2, max_new_tokens=4)
    assert always["pass@1"] == always["pass@2"] == 1.0
    with pytest.raises(ValueError, match="every k"):
        evaluate_pass_at_k(lm, tok, prompts, words, tau=1.0, n=2, ks=[3])


# ------------------------------------------------------------------ the trainer on the tiny world
TRAIN, EVAL = prompt_split(0)
PROMPTS = prompt_texts(TRAIN[:16])


def short_reply_reward(prompts, responses, terminated):
    """+1 for ending with EOS, -0.1 a word: a reward the tiny model can learn in a few iterations."""
    return [float(t) - 0.1 * len(r.split()) for r, t in zip(responses, terminated)]


def _trainer(world, reward=short_reply_reward, **overrides):
    model, tok = world
    kw = dict(batch_size=4, num_generations=4, max_new_tokens=12, lr=3e-3, missing_eos_score=None, eval_every=2,
              checkpoint_every=2, progress=False)
    kw.update(overrides)
    return CriticFreeTrainer(copy.deepcopy(model), copy.deepcopy(model), tok, reward, CriticFreeConfig(**kw),
                             gold_fn=reward)


def test_groups_are_adjacent_and_advantages_are_the_estimators(tiny_world):
    for advantage, fn in (("rloo", rloo_advantages), ("grpo", grpo_advantages)):
        tr = _trainer(tiny_world, advantage=advantage, kl_penalty="reward", kl_coef=0.1, lr=1e-2)
        tr.step(PROMPTS[:4])
        tr.step(PROMPTS[4:8])  # sampled by a policy that has left the reference: the KL in the reward is not 0
        exp = tr.experience
        assert exp.rollout.prompts == [p for p in PROMPTS[4:8] for _ in range(4)]
        r = exp.scores - 0.1 * sequence_kl(exp.kl, exp.mask)  # RLOO's form: k1 summed over the reply
        assert float(sequence_kl(exp.kl, exp.mask).abs().mean()) > 0.1
        torch.testing.assert_close(sequence_rewards(exp), r)
        expect = fn(r.view(4, 4)).reshape(-1)
        torch.testing.assert_close(exp.advantages, torch.where(exp.mask.bool(), expect[:, None], 0.0))
        torch.testing.assert_close(exp.returns, torch.where(exp.mask.bool(), r[:, None], 0.0))


def test_no_critic_is_built_or_trained(tiny_world):
    tr = _trainer(tiny_world)
    assert tr.critic is None and not tr.has_critic and tr.model is tr.lm
    assert not isinstance(tr.model, PolicyWithValueHead)
    assert len(tr.optimizer.param_groups) == 1 and tr.critic_params == []
    assert {id(p) for p in tr.optimizer.param_groups[0]["params"]} == {id(p) for p in tr.lm.parameters()}
    stats = tr.step(PROMPTS[:4])
    assert torch.equal(tr.experience.values, torch.zeros_like(tr.experience.values))
    assert "explained_variance" not in stats and "value_mean" not in stats
    with pytest.raises(ValueError, match="no critic"):
        tr.values(tr.experience.rollout)
    model, tok = tiny_world
    with pytest.raises(ValueError, match=r"critic is 'none'"):
        CriticFreeTrainer(PolicyWithValueHead(copy.deepcopy(model)), copy.deepcopy(model), tok, short_reply_reward,
                          CriticFreeConfig(progress=False))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_identity_at_start(tiny_world, level):
    tr = _trainer(tiny_world, importance_sampling_level=level, temperature=0.7, kl_coef=0.1, num_iterations=2,
                  minibatch_size=8, lr=1e-8)  # the later steps barely move: their KL term stays ~0 too
    stats = tr.step(PROMPTS[:4])
    # policy == reference, dropout off, first step on-policy: ratio 1, nothing clipped, no KL
    assert stats["first_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert stats["first_clipfrac"] == 0.0 and stats["first_approx_kl"] < 1e-8
    assert abs(stats["kl"]) < 1e-4 and stats["kl_k3"] < 1e-6 and stats["kl_loss"] < 1e-6
    assert stats["updates"] == 2 * 2  # 16 replies in minibatches of 8, twice


def _pad_rollout(ro, left, right, pad_id):
    """The same rollout with ``left`` more PAD columns before the prompts and ``right`` after the responses."""
    B = len(ro)
    lp = lambda x, v: torch.cat([torch.full((B, left), v, dtype=x.dtype), x], 1)  # noqa: E731
    rp = lambda x, v: torch.cat([x, torch.full((B, right), v, dtype=x.dtype)], 1)  # noqa: E731
    return Rollout(prompt_ids=lp(ro.prompt_ids, pad_id), prompt_mask=lp(ro.prompt_mask, 0),
                   response_ids=rp(ro.response_ids, pad_id), response_mask=rp(ro.response_mask, 0),
                   logprobs=rp(ro.logprobs, 0.0), terminated=ro.terminated, prompts=ro.prompts,
                   responses=ro.responses, temperature=ro.temperature)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_trainer_loss_is_padding_invariant(tiny_world, loss_type):
    tr = _trainer(tiny_world, loss_type=loss_type, lr=1e-2, kl_coef=0.1)
    tr.step(PROMPTS[:4])  # move the policy away from the reference
    texts = [p for p in PROMPTS[4:8] for _ in range(4)]
    ro = generate(tr.lm, tr.tokenizer, texts, 12, generator=torch.Generator().manual_seed(0))
    a, b = tr.make_experience(ro), tr.make_experience(_pad_rollout(ro, 3, 4, tr.tokenizer.pad_token_id))
    R = ro.response_ids.size(1)
    torch.testing.assert_close(b.advantages[:, :R], a.advantages, atol=1e-5, rtol=1e-4)
    la, sa = tr.loss(a)
    lb, sb = tr.loss(b)
    assert abs(float(la.detach())) > 1e-4  # a real loss, not a trivially invariant 0
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-4)
    for key in ("policy_loss", "kl_loss", "entropy", "clipfrac", "approx_kl"):
        assert float(sb[key]) == pytest.approx(float(sa[key]), abs=1e-5), key


def test_dapo_is_bnpo_in_one_step_and_not_with_minibatches(tiny_world):
    def weights_after(loss_type, mb):
        tr = _trainer(tiny_world, loss_type=loss_type, minibatch_size=mb, kl_coef=0.0)
        tr.step(PROMPTS[:4])
        return torch.cat([p.detach().flatten() for p in tr.lm.parameters()])

    torch.testing.assert_close(weights_after("dapo", None), weights_after("bnpo", None))
    assert not torch.allclose(weights_after("dapo", 4), weights_after("bnpo", 4))  # sum / mean tokens vs token mean


def test_dapo_and_dr_grpo_normalisers_over_minibatches(tiny_world):
    # 16 replies in 4 optimizer steps; lr ~ 0 keeps every ratio 1, so a step's loss is -sum(A m) / normaliser:
    # dapo divides by the batch's tokens / 4 (TRL's num_items_in_batch per step), dr_grpo by 4 replies * 12
    # tokens; the mean over the 4 steps is then -sum(A m) / tokens and -sum(A m) / (16 * 12)
    for loss_type, normaliser in (("dapo", lambda m: m.sum()), ("dr_grpo", lambda m: 16 * 12)):
        tr = _trainer(tiny_world, loss_type=loss_type, minibatch_size=4, lr=1e-9, kl_coef=0.0)
        stats = tr.step(PROMPTS[:4])
        exp = tr.experience
        total = float((exp.advantages * exp.mask).sum())
        assert abs(total) > 0.1 and stats["updates"] == 4
        assert stats["policy_loss"] == pytest.approx(-total / float(normaliser(exp.mask)), rel=1e-4), loss_type


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce"])
def test_a_short_run_raises_the_reward(tiny_world, advantage):
    """15 iterations of 4 prompts x 4 replies: held-out reward from ~0 (long replies, few EOS) to > 0.5."""
    tr = _trainer(tiny_world, advantage=advantage, kl_coef=0.0, eval_every=0,
                  num_generations=4 if advantage != "reinforce" else 2)
    history = tr.train(TRAIN, 15, eval_prompts=EVAL[:16])
    before, after = history[0]["eval_gold_reward"], history[-1]["eval_gold_reward"]
    assert after - before > 0.5, (before, after)
    assert {"reward_std", "advantage_std", "policy_loss", "clipfrac", "entropy", "grad_norm"} <= set(history[-1])
    assert ("degenerate_groups" in history[-1]) and 0.0 <= history[-1]["degenerate_groups"] <= 1.0


def _strip_times(history):
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in history]


@pytest.mark.parametrize("overrides", [
    dict(advantage="grpo", num_iterations=2, minibatch_size=8, kl_target=0.5, kl_coef=0.05, kl_horizon=200,
         epsilon_high=0.28),
    dict(advantage="reinforce", num_generations=2, kl_penalty="reward", importance_sampling_level="sequence"),
])
def test_resume_reproduces_the_uninterrupted_run(tiny_world, tmp_path, overrides):
    full_trainer = _trainer(tiny_world, **overrides)
    full = full_trainer.train(TRAIN, 4, eval_prompts=EVAL[:6])
    part = _trainer(tiny_world, **overrides).train(TRAIN, 2, checkpoint_dir=tmp_path, eval_prompts=EVAL[:6])
    assert len(part) == 3 and (tmp_path / f"{overrides['advantage']}_state.pt").exists()
    resumed_trainer = _trainer(tiny_world, **overrides)  # a fresh process: new models, new optimizer, new baseline
    resumed = resumed_trainer.train(TRAIN, 4, checkpoint_dir=tmp_path, eval_prompts=EVAL[:6])
    assert _strip_times(resumed) == _strip_times(full)
    for (n, a), (_, b) in zip(full_trainer.lm.state_dict().items(), resumed_trainer.lm.state_dict().items()):
        assert torch.equal(a, b), n
    if overrides["advantage"] == "reinforce":
        assert resumed_trainer.baseline.count == 4 and resumed_trainer.baseline.value == full_trainer.baseline.value


@pytest.mark.parametrize("field, value, match", [
    ("num_generations", 1, r"CriticFreeConfig\.num_generations must be >= 2 for advantage='grpo'"),
    ("loss_type", "token_mean", r"CriticFreeConfig\.loss_type must be one of \['grpo', 'dr_grpo', 'dapo', 'bnpo'\]"),
    ("scale_rewards", "std", r"CriticFreeConfig\.scale_rewards must be one of"),
    ("advantage", "ppo", r"CriticFreeConfig\.advantage must be one of \['grpo', 'rloo', 'reinforce', 'process'\]"),
    ("epsilon", 0.0, r"CriticFreeConfig\.epsilon must be > 0"),
    ("epsilon_high", -0.1, r"CriticFreeConfig\.epsilon_high must be > 0 or None"),
    ("importance_sampling_level", "seq", r"CriticFreeConfig\.importance_sampling_level must be one of"),
    ("num_iterations", 0, r"CriticFreeConfig\.num_iterations must be >= 1"),
    ("critic", "head", r"CriticFreeConfig\.critic must be one of \['none'\]"),
    ("minibatch_size", 5, r"CriticFreeConfig\.minibatch_size \(5\) must divide batch_size \* num_generations \(32\)"),
    ("baseline_decay", 1.0, r"CriticFreeConfig\.baseline_decay must be < 1"),
    ("whiten_rewards", True, r"CriticFreeConfig\.whiten_rewards must be False"),
    ("kl_penalty", "both", r"CriticFreeConfig\.kl_penalty must be one of"),
])
def test_bad_config_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        CriticFreeConfig(**{field: value})


def test_config_defaults_and_reinforce_with_one_sample():
    for f in fields(CriticFreeConfig):  # every field documented, with a declared range or choices where it has one
        assert f.metadata.get("help"), f.name
    described = {d["name"]: d for d in describe(CriticFreeConfig)}
    assert described["loss_type"]["valid"] == "'grpo' | 'dr_grpo' | 'dapo' | 'bnpo'"
    assert described["batch_size"]["default"] == 8 and "num_generations" in described["batch_size"]["help"]
    cfg = CriticFreeConfig()
    assert (cfg.critic, cfg.advantage, cfg.loss_type, cfg.kl_penalty, cfg.whiten_advantages) == (
        "none", "grpo", "dapo", "loss", False)
    assert CriticFreeConfig(advantage="reinforce", num_generations=1).num_generations == 1  # no group needed
    assert CriticFreeConfig.from_dict({"epsilon_high": 0.28}).epsilon_high == 0.28


# ------------------------------------------------------------------ the book's world
@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_a_short_run_on_the_books_world_raises_heldout_gold(cpu_world, advantage):
    """12 iterations of 8 prompts x 4 replies against the gold reward: held-out gold +0.3 over pi_ref, KL < 12 nats."""
    from rlhf_book import gold_reward_fn

    model, tok = cpu_world
    cfg = CriticFreeConfig(advantage=advantage, batch_size=8, num_generations=4, num_iterations=4, minibatch_size=16,
                           max_new_tokens=40, lr=1e-4, kl_coef=0.05,
                           kl_penalty="loss" if advantage == "grpo" else "reward", eval_every=0, progress=False)
    tr = CriticFreeTrainer(copy.deepcopy(model), copy.deepcopy(model), tok, gold_reward_fn, cfg, gold_fn=gold_reward_fn)
    history = tr.train(TRAIN, 12, eval_prompts=EVAL)
    before, after = history[0], history[-1]
    assert abs(before["eval_kl"]) < 1e-3  # the untrained policy is the reference
    assert after["eval_gold_reward"] - before["eval_gold_reward"] > 0.3, (before["eval_gold_reward"],
                                                                          after["eval_gold_reward"])
    assert after["eval_kl"] < 12.0
