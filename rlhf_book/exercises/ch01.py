"""Chapter 1 exercises: the LM <-> RL dictionary."""

from __future__ import annotations

import math

import torch

from . import check_function, check_value

__all__ = ["check_trajectory_logprob", "check_returns_to_go", "check_logprob_value", "check_state_question", "check_credit_question", "EXERCISES"]


def _logprobs_and_mask(g: torch.Generator) -> tuple:
    B, T = 3, 7
    lp = -torch.rand(B, T, generator=g) * 4
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    lp = torch.where(mask.bool(), lp, torch.full_like(lp, float("nan")))  # padding is garbage, not zero
    return lp, mask


def check_trajectory_logprob(fn) -> bool:
    """fn(token_logprobs (B, T), mask (B, T)) -> (B,): log pi(y|x) = sum of log pi(a_t|s_t) over real tokens."""
    from ..rollout import sequence_logprob

    return check_function(
        "trajectory_logprob", fn, sequence_logprob, _logprobs_and_mask,
        hint="sum log-probs over positions where mask == 1; padded positions hold NaN, so select, don't multiply "
        "(torch.where(mask.bool(), lp, 0)).",
    )


def _rewards_mask_gamma(g: torch.Generator) -> tuple:
    B, T = 3, 6
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    # padding holds garbage (NaN), as it can in real code: an implementation that ignores the mask fails
    rewards = torch.where(mask.bool(), torch.randn(B, T, generator=g), torch.full((B, T), float("nan")))
    gamma = float(torch.rand((), generator=g)) * 0.5 + 0.5
    return rewards, mask, gamma


def check_returns_to_go(fn) -> bool:
    """fn(rewards (B, T), mask (B, T), gamma) -> (B, T): G_t = sum_{k >= t} gamma^(k - t) r_k."""
    from ..advantage import discounted_returns

    return check_function(
        "returns_to_go", fn, discounted_returns, _rewards_mask_gamma,
        hint="walk backwards: G_t = r_t + gamma * G_{t+1}, with G = 0 after the last real token and 0 on padding "
        "(padded rewards hold NaN here: select the real ones with torch.where(mask.bool(), rewards, 0.0)).",
    )


def check_logprob_value(answer) -> bool:
    """The log-probability of a 3-token response whose tokens had probabilities 0.5, 0.25 and 0.8."""
    return check_value("logprob_value", answer, math.log(0.5 * 0.25 * 0.8),
                       hint="log of a product is the sum of logs: log 0.5 + log 0.25 + log 0.8 (natural log).")


def check_state_question(answer) -> bool:
    """Which is the state s_3 (before the third response token is chosen)?"""
    return check_value("state_question", answer, "B",
                       hint="the state is everything the policy conditions on when it picks a_t: the prompt and y_<t.")


def check_credit_question(answer) -> bool:
    """Why does a single score at the end of a 500-token story make learning slow?"""
    return check_value("credit_question", answer, "C",
                       hint="think about which of the 500 actions the one number should be credited to.")


EXERCISES = {
    "trajectory_logprob": check_trajectory_logprob,
    "returns_to_go": check_returns_to_go,
    "answer_logprob": check_logprob_value,
    "answer_state": check_state_question,
    "answer_credit": check_credit_question,
}
