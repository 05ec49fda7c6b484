"""Chapter 5 exercises: the clipped objective by hand, choosing beta, the k3 KL estimator, matching the KL
estimators to their properties, a negative KL to diagnose, and a short experiment with the learning rate."""

from __future__ import annotations

import torch

from . import check_function, check_matching, check_value, exercise, hidden_function_check, report

__all__ = ["check_clipped_objective", "check_beta_choice", "check_kl_k3", "check_kl_matching",
           "check_negative_kl", "check_lr_experiment", "EXERCISES"]


@exercise("answer_clipped_objective", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_clipped_objective(answer) -> bool:
    """Mean PPO objective of two tokens, eps = 0.2: (rho=1.4, A=+2) and (rho=0.6, A=-1)."""
    # token 1: min(1.4 * 2, 1.2 * 2) = 2.4 (clipped); token 2: min(0.6 * -1, 0.8 * -1) = -0.8 (clipped)
    return check_value(
        "answer_clipped_objective", answer, (2.4 + -0.8) / 2,
        hint=("for each token take the smaller of rho A and clip(rho, 0.8, 1.2) A, then average the two tokens. "
              "The min is the pessimistic choice: it applies to negative advantages too.",
              "token 1: min(1.4 * 2, 1.2 * 2); token 2: min(0.6 * (-1), 0.8 * (-1)). With A < 0 and rho below "
              "1 - eps, the clipped term is the smaller one."),
    )


@exercise("answer_beta", points=1, difficulty="easy", minutes=5, kind="multiple choice")
def check_beta_choice(answer) -> bool:
    """Which beta should the next run use, given the described over-optimised run at beta = 0?"""
    return check_value(
        "answer_beta", answer, "C",
        hint=("the run at beta = 0 over-optimised the proxy. Ask what each option does to the price of moving away "
              "from the reference, and what a very large price would do to learning.",
              "beta = 0 let the policy drift tens of nats; beta = 50 pins it to the reference, so nothing is "
              "learnt; a negative beta pays it to drift. A small positive beta kept the KL at a few nats in §5.5 "
              "(0.05 and 0.2)."),
    )


def _logprob_pairs(g: torch.Generator) -> tuple:
    B, T = 3, 6
    lp = torch.log_softmax(torch.randn(B, T, 9, generator=g), -1)[..., 0]
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    ref[0] = lp[0]  # identical policies on one row: k3 must be exactly 0 there
    return lp, ref


_K3_HINT = ("with omega = pi_ref / pi_theta, log omega = ref_logprobs - logprobs and k3 = (omega - 1) - log omega. "
            "When the policies are close, omega - 1 computed as exp(log omega) - 1 loses most of its digits in "
            "float32.",
            "log_omega = ref_logprobs - logprobs; return torch.expm1(log_omega) - log_omega. torch.expm1(x) computes "
            "exp(x) - 1 accurately for tiny x.")


@exercise("kl_k3", points=3, difficulty="medium", minutes=15, kind="code")
def check_kl_k3(fn) -> bool:
    """fn(logprobs, ref_logprobs) -> (B, T): k3 = (omega - 1) - log omega with omega = exp(ref_logprobs - logprobs)."""
    from ..kl import kl_k3

    if not check_function("kl_k3", fn, kl_k3, _logprob_pairs, hint=_K3_HINT, atol=1e-5, rtol=1e-4):
        return False
    # precision: log-ratios of 1e-3 (policies that barely moved) in float32
    x = torch.tensor([[1e-3, -1e-3, 2e-3, -2e-3]])
    try:
        got = torch.as_tensor(fn(torch.zeros_like(x), x)).double()
    except Exception as e:  # noqa: BLE001 (the learner's bug, shown rather than raised)
        return report("kl_k3 (precision)", False, f"raised {type(e).__name__}: {e}", _K3_HINT)
    expect = torch.expm1(x.double()) - x.double()
    ok = got.shape == expect.shape and bool((got >= 0).all()) and torch.allclose(got, expect, rtol=1e-2, atol=0.0)
    detail = "accurate for tiny log-ratios" if ok else "inaccurate (or negative) for log-ratios ~1e-3"
    return report("kl_k3 (precision)", ok, detail, _K3_HINT)


# item -> its property in the list a-e of exercise 5.4 (e, "exact on every sample", fits none)
_KL_PROPERTIES = {"k1": "c", "k2": "d", "k3": "a", "k3_loss": "b"}


@exercise("answer_kl_matching", points=2, difficulty="medium", minutes=10, kind="matching")
def check_kl_matching(answer) -> bool:
    """Match k1, k2, k3 and the k3 loss to their properties a-e (one is left over)."""
    return check_matching(
        "answer_kl_matching", answer, _KL_PROPERTIES,
        hint=("two of the three estimators are never negative; tell them apart by their bias. The fourth item is "
              "about a gradient, not a value. One property fits none of them.",
              "k1 = -log omega is unbiased, but its sign varies from token to token; k2 is >= 0 and biased; k3 adds "
              "the zero-mean omega - 1 to k1, so it stays unbiased and is >= 0; autograd on a k3 loss follows the "
              "gradient of KL(pi_ref || pi_theta), the forward KL (§5.2). No estimator is exact on every sample."),
    )


@exercise("answer_negative_kl", points=2, difficulty="medium", minutes=10, kind="diagnosis")
def check_negative_kl(answer) -> bool:
    """A run whose KL to the reference is negative before any update and stays negative: the cause (A-D)."""
    return check_value(
        "answer_negative_kl", answer, "A",
        hint=("at iteration 1 the policy still equals the reference. What must any KL estimate be then, whatever "
              "the batch size and the learning rate?",
              "before any update the KL is 0, unless the two log-probs are not of the same distribution; a batch "
              "mean that stays negative is a bug, not noise (§5.8). A temperature applied to one side only is the "
              "usual cause, as in the cell of §5.8."),
    )


@exercise("answer_lr_experiment", points=3, difficulty="medium", minutes=15, kind="experiment")
def check_lr_experiment(answer) -> bool:
    """The experiment of exercise 5.6: PPO with ten times the learning rate, clip fraction and approx-KL (A-D)."""
    # measured with seeds 0, 1, 2 (10 iterations, beta = 0.05): mean clip fraction 0.02-0.03 at lr = 1e-4 and
    # 0.19-0.22 at lr = 1e-3; mean approx-KL about 0.005 and 0.2; the KL to the reference 2-4 nats and over 10 nats
    return check_value(
        "answer_lr_experiment", answer, "B",
        hint=("compare the two printed rows: the mean clip fraction and approx-KL over the same 10 iterations, and "
              "the KL to the reference at the end.",
              "the clip only removes the gradient of tokens whose ratio has already left 1 +- eps; it does not stop "
              "a large step from taking many tokens there. Ten times the learning rate sent about a fifth of the "
              "tokens past the clip (against a few percent): the steps are too large (§5.8)."),
    )


EXERCISES = {
    "answer_clipped_objective": check_clipped_objective,
    "answer_beta": check_beta_choice,
    "kl_k3": check_kl_k3,
    "answer_kl_matching": check_kl_matching,
    "answer_negative_kl": check_negative_kl,
    "answer_lr_experiment": check_lr_experiment,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_kl_k3(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    from ..kl import kl_k3

    return hidden_function_check(fn, kl_k3, _logprob_pairs, seed, atol=1e-5, rtol=1e-4)


def hidden_check_answer_lr_experiment(answer, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    """The experiment of 5.6, against the student's own run: it must be in the notebook, at lr = 1e-3, and show the
    reading answered (B: clip fraction and approx-KL both several times those of the lr = 1e-4 run)."""
    ns = ns or {}
    history, lr, runs = ns.get("history_lr"), ns.get("lr"), ns.get("runs") or {}
    base = runs.get("beta=0.05") if isinstance(runs, dict) else None
    if not history or not base:
        return False, "the experiment's run (history_lr) is not in the notebook: run its cell"
    if lr != 1e-3:
        return False, f"the notebook's run is at lr = {lr!r}; the question is about lr = 1e-3"

    def means(h):
        its = [x for x in h if "clipfrac" in x][:10]
        n = max(len(its), 1)
        return sum(float(x["clipfrac"]) for x in its) / n, sum(float(x["approx_kl"]) for x in its) / n

    try:
        (clip, kl), (clip0, kl0) = means(history), means(base)
    except (TypeError, KeyError, ValueError):
        return False, "the experiment's run has no clip fraction or approx-KL"
    grows = clip >= 3 * clip0 and kl >= 3 * kl0 and clip > 0
    shown = "B" if grows else "D" if clip >= 3 * clip0 and kl < kl0 else "A"
    if str(answer).strip().upper() != shown:
        return False, (f"your run: clip fraction {clip0:.3f} -> {clip:.3f}, approx-KL {kl0:.4f} -> {kl:.4f}; it "
                       "does not show your answer")
    return True, f"consistent with your run (clip fraction {clip0:.3f} -> {clip:.3f}, approx-KL {kl0:.4f} -> {kl:.4f})"
