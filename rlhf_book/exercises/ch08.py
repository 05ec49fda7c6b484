"""Chapter 8 exercises: the best-of-n KL bound and an exact KL by hand, reading the peak off a Gao et al. fit, the
best-of-n distribution of a categorical policy, an ensemble aggregation for a miscalibrated member, diagnosing
over-optimisation from a training log, matching the chapter's curves to their properties, and a short experiment
with best-of-n and an oracle."""

from __future__ import annotations

import math

import torch

from . import check_function, check_numbers, check_value, exercise, hidden_experiment_check, hidden_function_check, report

__all__ = ["EXERCISES", "check_best_of_n_probs_fn", "check_ensemble_choice", "check_forms_matching",
           "check_gao_peak", "check_kl_bound", "check_kl_coin", "check_overoptimization_diagnosis",
           "check_selection_experiment"]

_BOUND_NS = (4, 16)  # exercise 8.1
_ALPHA, _BETA = 0.9, 0.25  # exercise 8.3: a best-of-n fit R(d) = d (alpha - beta d), d = sqrt(KL)


@exercise("answer_kl_bound", points=2, difficulty="easy", minutes=5, kind="numeric")
def check_kl_bound(answer) -> bool:
    """The best-of-n KL bound log n - (n - 1)/n (nats) for n = 4 and n = 16: a list of 2 numbers."""
    from ..overoptimization import best_of_n_kl_bound

    # log 4 - 3/4 = 0.636; log 16 - 15/16 = 1.835
    hint = ("KL here is measured in nats, and the bound has two terms. One number per n, in the order n = 4, "
            "n = 16.",
            "nats mean the natural log (math.log, not log2 or log10): log 4 - 3/4 and log 16 - 15/16; the "
            "subtracted (n - 1)/n is near 1 for large n, but not 1.")
    expected = torch.tensor([best_of_n_kl_bound(n) for n in _BOUND_NS], dtype=torch.float64)
    return check_numbers("answer_kl_bound", answer, expected, "n = 4, then n = 16", hint)


@exercise("answer_kl_coin", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_kl_coin(answer) -> bool:
    """Two replies, p = (1/2, 1/2), rewards (0, 1): the exact KL(pi_2 || p) of best-of-2, in nats."""
    from ..overoptimization import best_of_n_kl_exact

    # best-of-2 keeps reward 0 only if both draws are 0: pi_2 = (1/4, 3/4); KL = 1/4 log(1/2) + 3/4 log(3/2) = 0.131
    # (the bound log 2 - 1/2 = 0.193 is loose: two atoms are far from a continuous reward)
    return check_value(
        "answer_kl_coin", answer, best_of_n_kl_exact([0.5, 0.5], [0.0, 1.0], 2),
        hint=("first find pi_2, the distribution of the reply best-of-2 keeps: when does it end with the wrong "
              "reply? Then the KL of pi_2 to p, in nats. The bound of 8.1 is not the answer here.",
              "best-of-2 keeps the wrong reply only when both draws are it: pi_2 = (1/4, 3/4). KL(pi_2 || p) = "
              "sum_y pi_2(y) log(pi_2(y) / p(y)), natural log, pi_2 (not p) outside the log. The bound is only an "
              "upper bound: two atoms are far from a continuous reward."),
    )


@exercise("answer_gao_peak", points=3, difficulty="hard", minutes=15, kind="numeric")
def check_gao_peak(answer) -> bool:
    """A best-of-n fit R(d) = d (alpha - beta d), d = sqrt(KL), alpha = 0.9, beta = 0.25: a dict with the d of the
    peak "d_peak", the KL there "kl_peak", the gold gain there "gain", and "n", the smallest integer n with
    log n - (n - 1)/n >= kl_peak."""
    from ..overoptimization import GaoFit, _peak, best_of_n_kl_bound

    # dR/dd = alpha - 2 beta d = 0 -> d* = 0.9 / 0.5 = 1.8; KL* = 3.24; R(d*) = alpha^2 / (4 beta) = 0.81;
    # log 68 - 67/68 = 3.234 < 3.24 <= log 69 - 68/69 = 3.249 -> n = 69 (e^(KL* + 1) = 69.4 forgets the 1/n)
    d_peak = _peak("bon", _ALPHA, _BETA)
    fit = GaoFit("bon", _ALPHA, _BETA, math.nan, d_peak, d_peak**2, 0)
    n = 1
    while best_of_n_kl_bound(n) < fit.kl_peak:
        n += 1
    expected = {"d_peak": d_peak, "kl_peak": fit.kl_peak, "gain": float(fit.predict(fit.kl_peak)), "n": n}
    hints = {  # per key: (first hint, stronger hint)
        "d_peak": ("the gain is a quadratic in d: where is its maximum?",
                   "R'(d) = alpha - 2 beta d = 0 at d* = alpha / (2 beta)."),
        "kl_peak": ("how are d and the KL related?", "d is sqrt(KL), so KL = d_peak ** 2, not d_peak."),
        "gain": ("evaluate the fit at its peak.",
                 "put d_peak back into R(d) = d (alpha - beta d): alpha^2 / (4 beta)."),
        "n": ("the bound grows with n, so try the integers near your estimate and keep the smallest that reaches "
              "kl_peak.",
              "solving log n = KL + 1 drops the + 1/n term of the bound: compute log n - (n - 1)/n for the integers "
              "just below e^(kl_peak + 1) and keep the smallest whose bound is >= kl_peak."),
    }
    name = "answer_gao_peak"
    if answer is None or answer is ...:
        return report(name, False, "not answered yet")
    if not isinstance(answer, dict) or set(answer) != set(expected):
        return report(name, False, f"expected a dict with the keys {sorted(expected)}, got {answer!r}",
                      'one number per key, e.g. {"d_peak": 1.0, "kl_peak": 1.0, "gain": 1.0, "n": 10}')
    wrong = []
    for key, value in expected.items():
        try:
            ok = abs(float(answer[key]) - value) <= (1e-9 if key == "n" else 1e-3)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            wrong.append(key)
    if "d_peak" in wrong:  # the other three follow from d_peak: one thing to fix first
        hint = tuple(f"d_peak: {h} kl_peak, gain and n follow from it." for h in hints["d_peak"])
    else:
        hint = tuple(" ".join(f"{k}: {hints[k][level]}" for k in wrong) for level in (0, 1))
    return report(name, not wrong, "" if not wrong else f"{', '.join(wrong)} not right", hint)


def _distinct_categorical(g: torch.Generator) -> tuple:
    trial = g.initial_seed() - 1000  # check_function seeds trial t with 1000 + t
    K = (2, 5, 3, 8, 12)[trial % 5]
    n = (2, 4, 1, 16, 7)[trial % 5]
    p = torch.rand(K, generator=g, dtype=torch.float64) + 0.05
    if trial == 3:
        p[int(torch.randint(K, (1,), generator=g))] = 0.0  # a reply the base policy never gives
    p = p / p.sum()
    rewards = torch.randperm(K, generator=g).double() * 0.5 + torch.rand(K, generator=g, dtype=torch.float64) * 0.1
    return p, rewards, n  # distinct rewards in random order (not sorted by reward)


def _reference_probs(p, rewards, n):
    from ..overoptimization import best_of_n_distribution

    return torch.as_tensor(best_of_n_distribution(p, rewards, n), dtype=torch.float64)


@exercise("best_of_n_probs", points=4, difficulty="hard", minutes=25, kind="code")
def check_best_of_n_probs_fn(fn) -> bool:
    """fn(p, rewards, n) -> (K,): pi_n(y) = F(r(y))^n - F(r(y)^-)^n for a categorical p (K,) with distinct rewards
    (K,) in no particular order, F the CDF of the reward under p; random cases with K = 2 to 12, n = 1 to 16 and
    one atom of probability 0, against best_of_n_distribution."""
    return check_function(
        "best_of_n_probs", fn, _reference_probs, _distinct_categorical,
        hint=("F(r(y)) is the probability that one draw scores at most r(y), F(r(y)^-) that it scores below r(y). "
              "The atoms come in no particular order: what must you do to p before adding it up, and in which "
              "order must the answer come back? The result is a probability vector: it sums to 1.",
              "order = torch.argsort(rewards); F = torch.cumsum(p[order], 0); F_below = F - p[order]; then "
              "pi[order] = F ** n - F_below ** n, so each atom gets its own value back in the order of p."),
    )


@exercise("answer_ensemble", points=1, difficulty="easy", minutes=5, kind="multiple choice")
def check_ensemble_choice(answer) -> bool:
    """Ensemble of 4 normalised reward models, aggregate="mean"; the policy finds replies that member 4 scores +5
    while members 1-3 score about 0: which change targets this (A-D)?"""
    return check_value(
        "answer_ensemble", answer, "A",
        hint=("work out what each aggregation gives the exploited reply, member scores (0, 0, 0, 5), and an "
              "ordinary reply the four agree on, (0, 0, 0, 0). The policy maximises that number: which options "
              "stop the exploit from paying?",
              "the mean gives the exploit 1.25 > 0: one member's error is diluted, not removed, and it still pays. "
              "min gives 0 and mean - std less than 0: disagreement no longer pays (Coste et al. 2023). Adding the "
              "std rewards the disagreement; one bigger reward model still has errors for the policy to find."),
    )


@exercise("answer_diagnosis", points=2, difficulty="medium", minutes=10, kind="diagnosis")
def check_overoptimization_diagnosis(answer) -> bool:
    """PPO log over iterations 0-600: KL 0, 0.5, 1.5, 3, 5, 8, 12; proxy 0, 0.73, 1.20, 1.64, 2.06, 2.55, 3.06;
    gold 0, 0.69, 0.86, 0.91, 0.89, 0.79, 0.62: the diagnosis and the fix (A-D)."""
    return check_value(
        "answer_diagnosis", answer, "D",
        hint=("the gold reward is the one you care about: follow it and the proxy column side by side. Over which "
              "iterations do they agree, and where do they part?",
              "proxy and gold rise together to iteration 300 (KL 3); then the proxy keeps rising while the gold "
              "falls: the policy gains proxy reward from the reward model's errors (over-optimisation, §8.4). A "
              "low learning rate, an underfit reward model or a biased KL estimator would show in the proxy or KL "
              "columns, and both look healthy."),
    )


# form -> the property that matches it (exercise 8.7)
_FORMS = {"bon_fit": "c", "rl_fit": "d", "kl_bound": "a", "kl_exact": "b"}


@exercise("answer_forms", points=2, difficulty="medium", minutes=10, kind="matching")
def check_forms_matching(answer) -> bool:
    """bon_fit d (alpha - beta d), rl_fit d (alpha - beta log d), kl_bound log n - (n-1)/n, kl_exact (ties) to
    (a) a function of n alone, unbounded like log n; (b) never above log(1/q) for a 0/1 reward right with
    probability q; (c) back to zero gain at d = alpha/beta; (d) back to zero gain at d = exp(alpha/beta)."""
    name = "answer_forms"
    if answer is None or answer is ...:
        return report(name, False, "not answered yet")
    if not isinstance(answer, dict) or set(answer) != set(_FORMS):
        return report(name, False, f"expected a dict with the keys {sorted(_FORMS)}, got {answer!r}",
                      'one letter per form, e.g. {"bon_fit": "a", ...}')
    wrong = sorted(k for k, v in answer.items() if str(v).strip().lower() != _FORMS[k])
    return report(
        name, not wrong, "" if not wrong else f"{len(wrong)} of {len(_FORMS)} not right",
        hint=("solve R(d) = 0 for d > 0 in each fit. For the two KL formulas: which one involves the rewards at all?",
              "bon_fit: d (alpha - beta d) = 0 at d = alpha/beta (c); rl_fit: alpha - beta log d = 0 at "
              "d = e^(alpha/beta) (d); the bound depends on n alone and grows like log n (a); with a 0/1 reward, "
              "best-of-n tends to p restricted to the right replies, whose KL to p is log(1/q), and the exact KL "
              "stays below it (b)."),
    )


_SELECTION_N = 64  # exercise 8.8: replies drawn per prompt


@exercise("answer_selection_experiment", points=3, difficulty="medium", minutes=15, kind="experiment")
def check_selection_experiment(answer) -> bool:
    """The experiment of exercise 8.8: best-of-n' (n' = 1..64) picked by the reward model and by the gold itself,
    and the gold between the two picks (3 draws)."""
    # measured with draws 0-7 (64 replies to each of the 30 held-out prompts): the gap is 0.029-0.036 at n' = 2 and
    # 0.051-0.107 at n' = 64 (at least 1.6 times as wide in every draw), 0.061-0.087 at n' = 32; up to n' = 32 it
    # grows with n' in every draw
    return check_value(
        "answer_selection_experiment", answer, "B",
        hint=("compare each draw's gap at n' = 2 with its gap at n' = 64. Then ask what a reply's proxy score is "
              "made of, besides its gold, and which replies come out on top when many compete.",
              "the reply best-of-n' keeps is the one with the largest proxy score, and the proxy is the gold plus "
              "the reward model's error. Among many candidates the largest score increasingly belongs to a reply "
              "whose error is large and positive (Goodhart's law, in its regressional form), so the gold lost to "
              "the error grows with n': from about 0.03 at n' = 2 to 0.05-0.11 at n' = 64, in every draw."),
    )


EXERCISES = {
    "answer_kl_bound": check_kl_bound,
    "answer_kl_coin": check_kl_coin,
    "answer_gao_peak": check_gao_peak,
    "best_of_n_probs": check_best_of_n_probs_fn,
    "answer_ensemble": check_ensemble_choice,
    "answer_diagnosis": check_overoptimization_diagnosis,
    "answer_forms": check_forms_matching,
    "answer_selection_experiment": check_selection_experiment,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_best_of_n_probs(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    return hidden_function_check(fn, _reference_probs, _distinct_categorical, seed)


def _selection_reading(gaps: dict) -> tuple[str | None, str]:
    """The letter of exercise 8.8 that ``{seed: {n': gap}}`` shows (n' = 2 against the largest n'), and a summary."""
    rows = []
    for s, by_n in sorted(gaps.items()):
        by_n = {int(k): float(v) for k, v in by_n.items()}
        top = max(by_n)
        rows.append((s, by_n[2], top, by_n[top]))
    shown = None
    if all(max(abs(a), abs(b)) < 0.01 for _, a, _, b in rows):
        shown = "A"  # no gap anywhere
    elif all(b >= 1.2 * a and b > 0.01 for _, a, _, b in rows):
        shown = "B"  # widens
    elif all(b <= 0.8 * a for _, a, _, b in rows):
        shown = "D"
    elif all(abs(b - a) < 0.2 * max(abs(a), abs(b)) for _, a, _, b in rows):
        shown = "C"
    summary = "; ".join(f"draw {s}: {a:.3f} at n' = 2, {b:.3f} at n' = {top}" for s, a, top, b in rows)
    return shown, summary


def hidden_check_answer_selection_experiment(answer, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    """The experiment of 8.8, against the student's own draws: they must be in the notebook, of n_max = 64 replies,
    three of them, and show the reading answered (B: the gap at n' = 64 is clearly wider than at n' = 2 in each)."""

    def prerequisites(ns, gaps):
        if ns.get("n_max") != _SELECTION_N:
            return (f"the notebook's draws are of n_max = {ns.get('n_max')!r} replies; the question is about "
                    f"{_SELECTION_N}")
        return "" if len(gaps) >= 3 else "the experiment has fewer than three draws: run its whole cell"

    return hidden_experiment_check(answer, ns, "bon_gap", "draws", prerequisites, _selection_reading, "draws")
