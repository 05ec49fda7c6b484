"""Chapter 4 (the value loss) exercises: numeric, code, a stalled run to diagnose, multiple-choice, and a short
experiment with a frozen critic."""

from __future__ import annotations

import torch

from ..advantage import gae
from . import check_function, check_value, exercise, hidden_function_check

__all__ = ["check_value_target", "check_gae_advantages", "check_stalled_run", "check_lambda_choice",
           "check_frozen_critic", "EXERCISES"]


@exercise("answer_value_target", points=1, difficulty="easy", minutes=5, kind="numeric")
def check_value_target(answer) -> bool:
    """V(s_t) = 0.4, r_t = -0.2, V(s_{t+1}) = 1.0, gamma = 1: the TD target the critic regresses V(s_t) onto."""
    return check_value(
        "answer_value_target",
        answer,
        -0.2 + 1.0 * 1.0,
        hint=("the critic is regressed onto what one step of experience says the state is worth, not onto its own "
              "current guess.",
              "the TD target is r_t + gamma * V(s_{t+1}) = -0.2 + 1.0 * 1.0; V(s_t) = 0.4 is the prediction being "
              "corrected, not part of the target."),
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


@exercise("gae_advantages", points=5, difficulty="hard", minutes=30, kind="code")
def check_gae_advantages(fn) -> bool:
    """fn(rewards, values, mask, gamma, lam) -> (B, T): GAE advantages, 0 on padding, no bootstrap past the end."""
    return check_function(
        "gae_advantages",
        fn,
        lambda r, v, m, g, lam: gae(r, v, m, g, lam)[0],
        _gae_inputs,
        hint=("first the TD errors delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the last real token; then "
              "accumulate them backwards with the factor gamma * lam. Padding holds NaN rewards and bogus values.",
              "zero the padding of both rewards and values with torch.where(mask.bool(), x, 0.0) (multiplying "
              "keeps NaN); next_v[:, :-1] = v[:, 1:]; then A_t = delta_t + gamma * lam * A_{t+1} for t from T - 1 "
              "down to 0, and 0 on padding."),
    )


@exercise("answer_stalled_run", points=2, difficulty="medium", minutes=10, kind="diagnosis")
def check_stalled_run(answer) -> bool:
    """Which diagnosis fits the logged curves of the stalled run?"""
    return check_value(
        "answer_stalled_run",
        answer,
        "B",
        hint=("the KL column shows whether the actor moves; the value-loss and explained-variance columns show "
              "what the critic knows.",
              "the KL grows to 19 nats, so the actor moves and no penalty holds it back; the proxy stays flat, so "
              "nothing is being hacked; explained variance 0 and a flat value loss mean the critic's values carry "
              "no information, so with lam = 0 the advantages are little more than the reward at the last token."),
    )


@exercise("answer_lambda", points=1, difficulty="easy", minutes=5, kind="multiple choice")
def check_lambda_choice(answer) -> bool:
    """Which lambda makes the advantage independent of how wrong the critic is (at the cost of variance)?"""
    return check_value(
        "answer_lambda",
        answer,
        "D",
        hint=("write A_t as the sum of the TD errors delta_t, delta_{t+1}, ... and watch the V(s_{t+k}) terms when "
              "each delta is weighted by (gamma lam)^k.",
              "with gamma lam = 1 the later values telescope away: A_t = G_t - V(s_t), so only the baseline V(s_t) "
              "is left. That needs lam = 1 (with gamma = 1)."),
    )


@exercise("answer_frozen_critic", points=3, difficulty="medium", minutes=15, kind="experiment")
def check_frozen_critic(answer) -> bool:
    """The experiment of exercise 4.5: a critic that is never updated (V = 0), with lam = 1 instead of 0."""
    # measured with seeds 0, 1, 2 (20 iterations): the held-out proxy goes from about -0.2 to +1.3 with lam = 1 in
    # every seed (gold to about 0.7), while the lam = 0 runs stay flat (their gold falls)
    return check_value(
        "answer_frozen_critic",
        answer,
        "C",
        hint=("compare the held-out proxy reward of the two printed rows at iteration 20 with their values at "
              "iteration 0. Then ask what the advantage is when V = 0 everywhere and lam = 1.",
              "with lam = 1 and gamma = 1, A_t = G_t - V(s_t) = G_t here: the final score reaches every token "
              "directly, and whitening subtracts the batch mean, a constant baseline (REINFORCE with a baseline, "
              "§3.5). With lam = 0 only the last token sees the score. The critic never learns in either run."),
    )


EXERCISES = {
    "answer_value_target": check_value_target,
    "gae_advantages": check_gae_advantages,
    "answer_stalled_run": check_stalled_run,
    "answer_lambda": check_lambda_choice,
    "answer_frozen_critic": check_frozen_critic,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_gae_advantages(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    return hidden_function_check(fn, lambda r, v, m, g, lam: gae(r, v, m, g, lam)[0], _gae_inputs, seed)


def hidden_check_answer_frozen_critic(answer, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    """The experiment of 4.5, against the student's own run: it must be in the notebook, at lam = 1.0, and show
    the reading answered (C: the proxy reward of the frozen critic's run rises clearly with lam = 1)."""
    ns = ns or {}
    history, lam = ns.get("history_frozen"), ns.get("lam")
    if not history:
        return False, "the experiment's run (history_frozen) is not in the notebook: run its cell"
    if lam != 1.0:
        return False, f"the notebook's run is at lam = {lam!r}; the question is about lam = 1.0"
    try:
        evals = [float(x["eval_proxy_reward"]) for x in history if "eval_proxy_reward" in x]
    except (TypeError, KeyError, ValueError):
        evals = []
    if len(evals) < 2:
        return False, "the experiment's run has fewer than two evaluations"
    rise = evals[-1] - evals[0]
    shown = "C" if rise >= 0.1 else "D" if rise <= -0.1 else "A"
    if str(answer).strip().upper() != shown:
        return False, f"your run's proxy reward went {evals[0]:+.2f} -> {evals[-1]:+.2f}: it does not show your answer"
    return True, f"consistent with your run (proxy {evals[0]:+.2f} -> {evals[-1]:+.2f})"
