"""Chapter 3 (advantage actor-critic) exercises and their automatic checks."""

from __future__ import annotations

import re

import torch

from . import check_function, check_value, report
from ..losses import policy_gradient_loss

__all__ = ["check_advantage_value", "check_a2c_actor_loss", "check_step_order", "check_high_advantage", "EXERCISES"]


def check_advantage_value(answer) -> bool:
    """V(s_t) = 2.0, r_t = -0.1, V(s_{t+1}) = 2.5, gamma = 0.95: the one-step (TD) advantage."""
    return check_value(
        "answer_advantage",
        answer,
        -0.1 + 0.95 * 2.5 - 2.0,
        hint="A_t = r_t + gamma * V(s_{t+1}) - V(s_t); the discount multiplies only the next state's value",
    )


def _actor_inputs(g: torch.Generator) -> tuple:
    B, T = 4, 7
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    logprobs = -4 * torch.rand(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    logprobs = torch.where(mask.bool(), logprobs, torch.full_like(logprobs, float("nan")))  # padding is garbage
    return logprobs.requires_grad_(), adv.requires_grad_(), mask


def check_a2c_actor_loss(fn) -> bool:
    """fn(logprobs, advantages, mask) -> scalar -mean_t[A_t log pi_t] over real tokens, advantages held constant."""
    hint = (
        "minus the mean over real tokens (mask == 1) of advantages * logprobs; select with torch.where, don't "
        "multiply by the mask (padding holds NaN); detach the advantages"
    )
    if not check_function("a2c_actor_loss (value)", fn, policy_gradient_loss, _actor_inputs, hint=hint):
        return False
    logprobs, adv, mask = _actor_inputs(torch.Generator().manual_seed(7))
    loss = fn(logprobs, adv, mask)
    loss.backward()
    grad_lp = logprobs.grad
    expect = torch.where(mask.bool(), -adv.detach() / mask.sum(), torch.zeros_like(adv))
    if grad_lp is None or not torch.allclose(torch.nan_to_num(grad_lp, nan=1e9), expect, atol=1e-5):
        return report("a2c_actor_loss", False, "the gradient w.r.t. the log-probs is wrong", hint)
    if adv.grad is not None and bool((adv.grad != 0).any()):
        return report(
            "a2c_actor_loss",
            False,
            "gradient flows into the advantages: the critic would be trained by the actor's loss",
            "use advantages.detach()",
        )
    return report("a2c_actor_loss", True, "value and gradient match the library's policy_gradient_loss")


STEP_ORDERS = ("DBEAC", "DEBAC")  # scoring (B) and criticising (E) both need only the response: either may come first


def check_step_order(answer) -> bool:
    """Order of the events of one A2C iteration (letters A-E, e.g. "EDCBA"); both valid orders pass."""
    if answer is None or answer is ...:  # no hint before a first attempt
        return report("answer_order", False, "not answered yet")
    letters = re.sub(r"[^A-Za-z]", "", answer).upper() if isinstance(answer, str) else None
    ok = letters in STEP_ORDERS
    return report("answer_order", ok, "" if ok else f"{answer!r} is not right",
                  "the critic can only judge a token once there is a response, and the advantage needs both the "
                  "reward and the critic's values; the update comes last")


def check_high_advantage(answer) -> bool:
    """A token gets a large positive advantage: what does the actor's update do to its probability?"""
    return check_value(
        "answer_high_advantage",
        answer,
        "B",
        hint="the gradient of -A log pi(a|s) points towards a larger log pi(a|s) when A > 0",
    )


EXERCISES = {
    "answer_advantage": check_advantage_value,
    "a2c_actor_loss": check_a2c_actor_loss,
    "answer_order": check_step_order,
    "answer_high_advantage": check_high_advantage,
}
