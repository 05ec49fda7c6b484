"""Chapter 8 exercises: the best-of-n KL bound and an exact KL by hand, reading the peak off a Gao et al. fit, the
best-of-n distribution of a categorical policy, an ensemble aggregation for a miscalibrated member, diagnosing
over-optimisation from a training log, and matching the chapter's curves to their properties."""

from __future__ import annotations

import math

import torch

from . import check_function, check_numbers, check_value, exercise, hidden_function_check, report

__all__ = ["EXERCISES", "check_best_of_n_probs_fn", "check_ensemble_choice", "check_forms_matching",
           "check_gao_peak", "check_kl_bound", "check_kl_coin", "check_overoptimization_diagnosis"]

_BOUND_NS = (4, 16)  # exercise 8.1
_ALPHA, _BETA = 0.9, 0.25  # exercise 8.3: a best-of-n fit R(d) = d (alpha - beta d), d = sqrt(KL)


@exercise("answer_kl_bound", points=2, difficulty="easy", minutes=5, kind="numeric")
def check_kl_bound(answer) -> bool:
    """The best-of-n KL bound log n - (n - 1)/n (nats) for n = 4 and n = 16: a list of 2 numbers."""
    from ..overoptimization import best_of_n_kl_bound

    # log 4 - 3/4 = 0.636; log 16 - 15/16 = 1.835
    hint = ("KL is in nats: the natural log, not log2 or log10; and the bound subtracts (n - 1)/n, which is near 1 "
            "for large n but not 1. One number per n, in the order n = 4, n = 16.")
    expected = torch.tensor([best_of_n_kl_bound(n) for n in _BOUND_NS], dtype=torch.float64)
    return check_numbers("kl_bound", answer, expected, "n = 4, then n = 16", hint)


@exercise("answer_kl_coin", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_kl_coin(answer) -> bool:
    """Two replies, p = (1/2, 1/2), rewards (0, 1): the exact KL(pi_2 || p) of best-of-2, in nats."""
    from ..overoptimization import best_of_n_kl_exact

    # best-of-2 keeps reward 0 only if both draws are 0: pi_2 = (1/4, 3/4); KL = 1/4 log(1/2) + 3/4 log(3/2) = 0.131
    # (the bound log 2 - 1/2 = 0.193 is loose: two atoms are far from a continuous reward)
    return check_value(
        "kl_coin", answer, best_of_n_kl_exact([0.5, 0.5], [0.0, 1.0], 2),
        hint="first find pi_2: best-of-2 ends with the reward-0 reply only when both draws are it. Then "
        "KL(pi_2 || p) = sum_y pi_2(y) log(pi_2(y) / p(y)), with the natural log and pi_2 (not p) outside the log. "
        "The bound log n - (n-1)/n is only an upper bound here.",
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
    hints = {
        "d_peak": "the gain is a quadratic in d; set its derivative in d to zero.",
        "kl_peak": "d is sqrt(KL), not KL.",
        "gain": "put d_peak back into R(d) = d (alpha - beta d).",
        "n": "the bound grows with n, so try integers near your estimate and keep the smallest that reaches kl_peak; "
             "solving log n = KL + 1 drops the + 1/n.",
    }
    name = "gao_peak"
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
        hint = f"d_peak: {hints['d_peak']} kl_peak, gain and n follow from it."
    else:
        hint = " ".join(f"{k}: {hints[k]}" for k in wrong)
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
        hint="F(r(y)) is the probability of drawing a reply whose reward is <= r(y), and F(r(y)^-) of one whose "
        "reward is < r(y): accumulate p in the order of the rewards, not in the order the atoms are given, and "
        "return the answer in the given order. The result is a probability vector: it sums to 1.",
    )


@exercise("answer_ensemble", points=1, difficulty="easy", minutes=5, kind="multiple choice")
def check_ensemble_choice(answer) -> bool:
    """Ensemble of 4 normalised reward models, aggregate="mean"; the policy finds replies that member 4 scores +5
    while members 1-3 score about 0: which change targets this (A-D)?"""
    return check_value(
        "ensemble_choice", answer, "B",
        hint="work out what each aggregation gives the exploited reply, member scores (0, 0, 0, 5), against an "
        "ordinary reply the four agree on, (0, 0, 0, 0). Which ones make the exploit stop paying? The reward is "
        "what the policy optimises, so what should a disagreement between the members do to it?",
    )


@exercise("answer_diagnosis", points=2, difficulty="medium", minutes=10, kind="diagnosis")
def check_overoptimization_diagnosis(answer) -> bool:
    """PPO log over iterations 0-600: KL 0, 0.5, 1.5, 3, 5, 8, 12; proxy 0, 0.73, 1.20, 1.64, 2.06, 2.55, 3.06;
    gold 0, 0.69, 0.86, 0.91, 0.89, 0.79, 0.62: the diagnosis and the fix (A-D)."""
    return check_value(
        "overoptimization_diagnosis", answer, "B",
        hint="the gold reward is the one you care about: follow it and the proxy column side by side. Over which "
        "iterations do they agree, and where do they part? A learning rate, an underfit reward model or a "
        "KL estimator would each show in the proxy or the KL column; what does the proxy column show?",
    )


# form -> the property that matches it (exercise 8.7)
_FORMS = {"bon_fit": "c", "rl_fit": "d", "kl_bound": "a", "kl_exact": "b"}


@exercise("answer_forms", points=2, difficulty="medium", minutes=10, kind="matching")
def check_forms_matching(answer) -> bool:
    """bon_fit d (alpha - beta d), rl_fit d (alpha - beta log d), kl_bound log n - (n-1)/n, kl_exact (ties) to
    (a) a function of n alone, unbounded like log n; (b) never above log(1/q) for a 0/1 reward right with
    probability q; (c) back to zero gain at d = alpha/beta; (d) back to zero gain at d = exp(alpha/beta)."""
    name = "forms_matching"
    if answer is None or answer is ...:
        return report(name, False, "not answered yet")
    if not isinstance(answer, dict) or set(answer) != set(_FORMS):
        return report(name, False, f"expected a dict with the keys {sorted(_FORMS)}, got {answer!r}",
                      'one letter per form, e.g. {"bon_fit": "a", ...}')
    wrong = sorted(k for k, v in answer.items() if str(v).strip().lower() != _FORMS[k])
    return report(name, not wrong, "" if not wrong else f"{len(wrong)} of {len(_FORMS)} not right",
                  "solve R(d) = 0 for d > 0 in each fit. For the KL: which formula involves the rewards at all? "
                  "With a 0/1 reward, what does best-of-n converge to as n grows, and what is its KL to p then?")


EXERCISES = {
    "answer_kl_bound": check_kl_bound,
    "answer_kl_coin": check_kl_coin,
    "answer_gao_peak": check_gao_peak,
    "best_of_n_probs": check_best_of_n_probs_fn,
    "answer_ensemble": check_ensemble_choice,
    "answer_diagnosis": check_overoptimization_diagnosis,
    "answer_forms": check_forms_matching,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_best_of_n_probs(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    return hidden_function_check(fn, _reference_probs, _distinct_categorical, seed)
