"""Chapter 4 (the value loss) exercises and their automatic checks."""

from __future__ import annotations

import torch

from . import check_function, check_value
from ..advantage import gae

__all__ = ["check_value_target", "check_gae_advantages", "check_stalled_run", "check_lambda_choice", "EXERCISES"]


def check_value_target(answer) -> bool:
    """V(s_t) = 0.4, r_t = -0.2, V(s_{t+1}) = 1.0, gamma = 1: the TD target the critic regresses V(s_t) onto."""
    return check_value(
        "answer_value_target",
        answer,
        -0.2 + 1.0 * 1.0,
        hint="the target is r_t + gamma * V(s_{t+1}); V(s_t) itself is what is being corrected",
    )


def _gae_inputs(g: torch.Generator) -> tuple:
    B, T = 4, 8
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # one response that fills the batch
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    rewards = 0.1 * torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, float("nan")))  # padding is garbage
    values = torch.where(mask.bool(), values, torch.full_like(values, 99.0))
    gamma = float(torch.rand((), generator=g)) * 0.2 + 0.8
    lam = float(torch.rand((), generator=g))
    return rewards, values, mask, gamma, lam


def check_gae_advantages(fn) -> bool:
    """fn(rewards, values, mask, gamma, lam) -> (B, T): GAE advantages, 0 on padding, no bootstrap past the end."""
    return check_function(
        "gae_advantages",
        fn,
        lambda r, v, m, g, lam: gae(r, v, m, g, lam)[0],
        _gae_inputs,
        hint="delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last real token; then walk backwards "
        "A_t = delta_t + gamma * lam * A_{t+1}. Padding holds NaN rewards and bogus values: select, don't multiply.",
    )


def check_stalled_run(answer) -> bool:
    """Which diagnosis fits the logged curves of the stalled run?"""
    return check_value(
        "answer_stalled_run",
        answer,
        "C",
        hint="the KL shows the actor is moving, so it is not frozen; look at what the critic's "
        "explained variance and value loss say about the advantages it produces",
    )


def check_lambda_choice(answer) -> bool:
    """Which lambda makes the advantage independent of how wrong the critic is (at the cost of variance)?"""
    return check_value(
        "answer_lambda",
        answer,
        "D",
        hint="with lam = 1 the V(s_{t+1}) terms telescope away and only V(s_t) is left as a baseline",
    )


EXERCISES = {
    "answer_value_target": check_value_target,
    "gae_advantages": check_gae_advantages,
    "answer_stalled_run": check_stalled_run,
    "answer_lambda": check_lambda_choice,
}
