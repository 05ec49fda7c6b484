"""Chapter 1 exercises: the LM <-> RL dictionary (two code, one numeric, two multiple-choice, one matching)."""

from __future__ import annotations

import math

import torch

from . import check_function, check_matching, check_value, exercise, hidden_function_check

__all__ = ["check_trajectory_logprob", "check_returns_to_go", "check_logprob_value", "check_state_question",
           "check_credit_question", "check_quantity_matching", "EXERCISES"]


def _logprobs_and_mask(g: torch.Generator) -> tuple:
    B, T = 3, 7
    lp = -torch.rand(B, T, generator=g) * 4
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    lp = torch.where(mask.bool(), lp, torch.full_like(lp, float("nan")))  # padding is garbage, not zero
    return lp, mask


@exercise("trajectory_logprob", points=3, difficulty="easy", minutes=10, kind="code")
def check_trajectory_logprob(fn) -> bool:
    """fn(token_logprobs (B, T), mask (B, T)) -> (B,): log pi(y|x) = sum of log pi(a_t|s_t) over real tokens."""
    from ..rollout import sequence_logprob

    return check_function(
        "trajectory_logprob", fn, sequence_logprob, _logprobs_and_mask,
        hint=("log pi(y|x) is a sum over the response's real tokens only, the positions where mask == 1. Mind the "
              "padded positions: they hold NaN, and NaN * 0 is still NaN.",
              "select before you sum: torch.where(mask.bool(), token_logprobs, 0.0).sum(-1). Multiplying by the "
              "mask keeps the NaN of the padding."),
    )


def _rewards_mask_gamma(g: torch.Generator) -> tuple:
    B, T = 3, 6
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    # padding holds garbage (NaN), as it can in real code: an implementation that ignores the mask fails
    rewards = torch.where(mask.bool(), torch.randn(B, T, generator=g), torch.full((B, T), float("nan")))
    gamma = float(torch.rand((), generator=g)) * 0.5 + 0.5
    return rewards, mask, gamma


@exercise("returns_to_go", points=4, difficulty="medium", minutes=20, kind="code")
def check_returns_to_go(fn) -> bool:
    """fn(rewards (B, T), mask (B, T), gamma) -> (B, T): G_t = sum_{k >= t} gamma^(k - t) r_k."""
    from ..advantage import discounted_returns

    return check_function(
        "returns_to_go", fn, discounted_returns, _rewards_mask_gamma,
        hint=("G_t depends on G_{t+1}: compute the returns from the last column backwards. Keep the padded "
              "positions out of it (their rewards hold NaN here) and return 0 there.",
              "rewards = torch.where(mask.bool(), rewards, 0.0) first; then running = rewards[:, t] + gamma * running "
              "for t from T - 1 down to 0, stored in column t; finally 0 wherever mask == 0."),
    )


@exercise("answer_logprob", points=1, difficulty="easy", minutes=3, kind="numeric")
def check_logprob_value(answer) -> bool:
    """The log-probability of a 3-token response whose tokens had probabilities 0.5, 0.25 and 0.8."""
    return check_value(
        "answer_logprob", answer, math.log(0.5 * 0.25 * 0.8),
        hint=("the probability of a response is the product of its tokens' probabilities; the question asks for "
              "its natural logarithm.",
              "log(0.5 * 0.25 * 0.8) = log 0.5 + log 0.25 + log 0.8, with math.log (natural log, not log10); the "
              "result is negative."),
    )


@exercise("answer_state", points=1, difficulty="easy", minutes=3, kind="multiple choice")
def check_state_question(answer) -> bool:
    """Which is the state s_3 (before the third response token is chosen)?"""
    return check_value(
        "answer_state", answer, "B",
        hint=("the state is everything the policy conditions on at the moment it picks a_t (the dictionary of "
              "§1.3).",
              "s_t = (x, y_<t): the prompt and the tokens *before* y_t. For the third token that is the prompt and "
              "two tokens, not the third token itself."),
    )


@exercise("answer_credit", points=1, difficulty="easy", minutes=5, kind="multiple choice")
def check_credit_question(answer) -> bool:
    """Why does a single score at the end of a 500-token story make learning slow?"""
    return check_value(
        "answer_credit", answer, "D",
        hint=("think about which of the 500 actions the one number should be credited to.",
              "with a reward only at the end, every token of a story sees the same return, so the per-token signal "
              "is weak and noisy (§1.6), whatever the size of the reward model; and RLHF uses gamma = 1 routinely."),
    )


# quantity -> its definition in the list a-e of exercise 1.6 (c, the trajectory log-probability, is left over)
_QUANTITIES = {"G": "b", "V": "e", "Q": "a", "A": "d"}


@exercise("answer_matching", points=2, difficulty="medium", minutes=8, kind="matching")
def check_quantity_matching(answer) -> bool:
    """Match G_t, V(s_t), Q(s_t, a_t) and A(s_t, a_t) to their definitions a-e (one is left over)."""
    return check_matching(
        "answer_matching", answer, _QUANTITIES,
        hint=("one of the four is a single sampled number, two are expectations that differ in what they "
              "condition on, and one is a difference of two others. One definition is not a value at all.",
              "G_t is what one sampled response actually earned (no expectation); V conditions on the state only, Q "
              "also on the token chosen there; A = Q - V. The sum of log-probabilities is left over."),
    )


EXERCISES = {
    "trajectory_logprob": check_trajectory_logprob,
    "returns_to_go": check_returns_to_go,
    "answer_logprob": check_logprob_value,
    "answer_state": check_state_question,
    "answer_credit": check_credit_question,
    "answer_matching": check_quantity_matching,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_trajectory_logprob(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    from ..rollout import sequence_logprob

    return hidden_function_check(fn, sequence_logprob, _logprobs_and_mask, seed)


def hidden_check_returns_to_go(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    from ..advantage import discounted_returns

    return hidden_function_check(fn, discounted_returns, _rewards_mask_gamma, seed)
