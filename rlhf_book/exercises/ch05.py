"""Chapter 5 exercises: the clipped objective by hand, choosing beta, and the k3 KL estimator."""

from __future__ import annotations

import torch

from . import check_function, check_value, report

__all__ = ["check_clipped_objective", "check_beta_choice", "check_kl_k3", "EXERCISES"]


def check_clipped_objective(answer) -> bool:
    """Mean PPO objective of two tokens, eps = 0.2: (r=1.4, A=+2) and (r=0.6, A=-1)."""
    # token 1: min(1.4 * 2, 1.2 * 2) = 2.4 (clipped); token 2: min(0.6 * -1, 0.8 * -1) = -0.8 (clipped)
    return check_value(
        "clipped_objective", answer, (2.4 + -0.8) / 2,
        hint="per token take min(r A, clip(r, 1 - eps, 1 + eps) A), then average; the min is the pessimistic "
        "choice, so with A < 0 a ratio below 1 - eps is clipped too.",
    )


def check_beta_choice(answer) -> bool:
    """Which beta should the next run use, given the described over-optimised run at beta = 0?"""
    return check_value(
        "beta_choice", answer, "B",
        hint="the run at beta = 0 over-optimised the proxy; a huge beta pins the policy to the reference "
        "(no learning at all). Look for the value that keeps the KL at a few nats.",
    )


def _logprob_pairs(g: torch.Generator) -> tuple:
    B, T = 3, 6
    lp = torch.log_softmax(torch.randn(B, T, 9, generator=g), -1)[..., 0]
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    ref[0] = lp[0]  # identical policies on one row: k3 must be exactly 0 there
    return lp, ref


def check_kl_k3(fn) -> bool:
    """fn(logprobs, ref_logprobs) -> (B, T): k3 = (r - 1) - log r with r = exp(ref_logprobs - logprobs)."""
    from ..kl import kl_k3

    hint = ("log r = ref_logprobs - logprobs; k3 = (exp(log r) - 1) - log r. For precision when the policies are "
            "close, use torch.expm1(log_r) instead of torch.exp(log_r) - 1.")
    if not check_function("kl_k3", fn, kl_k3, _logprob_pairs, hint=hint, atol=1e-5, rtol=1e-4):
        return False
    # precision: log-ratios of 1e-3 (policies that barely moved) in float32
    x = torch.tensor([[1e-3, -1e-3, 2e-3, -2e-3]])
    try:
        got = torch.as_tensor(fn(torch.zeros_like(x), x)).double()
    except Exception as e:
        return report("kl_k3 (precision)", False, f"raised {type(e).__name__}: {e}", hint)
    expect = torch.expm1(x.double()) - x.double()
    ok = bool((got >= 0).all()) and torch.allclose(got, expect, rtol=1e-2, atol=0.0)
    detail = "accurate for tiny log-ratios" if ok else "inaccurate (or negative) for log-ratios ~1e-3"
    return report("kl_k3 (precision)", ok, detail, hint)


EXERCISES = {
    "answer_clipped_objective": check_clipped_objective,
    "answer_beta": check_beta_choice,
    "kl_k3": check_kl_k3,
}
