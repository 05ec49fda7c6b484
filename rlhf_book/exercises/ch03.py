"""Chapter 3 (advantage actor-critic) exercises: numeric, code, ordering, multiple-choice and a run to diagnose."""

from __future__ import annotations

import re

import torch

from ..losses import policy_gradient_loss
from . import check_function, check_value, exercise, hidden_function_check, not_answered, report

__all__ = ["check_advantage_value", "check_a2c_actor_loss", "check_step_order", "check_high_advantage",
           "check_run_diagnosis", "EXERCISES"]


@exercise("answer_advantage", points=1, difficulty="easy", minutes=5, kind="numeric")
def check_advantage_value(answer) -> bool:
    """V(s_t) = 2.0, r_t = -0.1, V(s_{t+1}) = 2.5, gamma = 0.95: the one-step (TD) advantage."""
    return check_value(
        "answer_advantage",
        answer,
        -0.1 + 0.95 * 2.5 - 2.0,
        hint=("the one-step advantage compares what happened (the reward, plus the discounted value of the new "
              "state) with what the critic expected from s_t.",
              "A_t = r_t + gamma * V(s_{t+1}) - V(s_t) = -0.1 + 0.95 * 2.5 - 2.0: the discount multiplies only "
              "the next state's value."),
    )


def _actor_inputs(g: torch.Generator) -> tuple:
    B, T = 4, 7
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    logprobs = -4 * torch.rand(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    logprobs = torch.where(mask.bool(), logprobs, torch.full_like(logprobs, float("nan")))  # padding is garbage
    return logprobs.requires_grad_(), adv.requires_grad_(), mask


_ACTOR_HINT = (
    "minus the mean over real tokens (mask == 1) of advantage times log-prob. Padded positions hold NaN, and the "
    "advantages are fixed weights here, not something this loss should train.",
    "terms = torch.where(mask.bool(), advantages.detach() * logprobs, 0.0); return -terms.sum() / mask.sum(). "
    "Multiplying by the mask keeps the NaN of the padding.",
)


@exercise("a2c_actor_loss", points=4, difficulty="medium", minutes=20, kind="code")
def check_a2c_actor_loss(fn) -> bool:
    """fn(logprobs, advantages, mask) -> scalar -mean_t[A_t log pi_t] over real tokens, advantages held constant."""
    if not check_function("a2c_actor_loss (value)", fn, policy_gradient_loss, _actor_inputs, hint=_ACTOR_HINT):
        return False
    logprobs, adv, mask = _actor_inputs(torch.Generator().manual_seed(7))
    try:
        fn(logprobs, adv, mask).backward()
    except Exception as e:  # noqa: BLE001 (the learner's bug, shown rather than raised)
        return report("a2c_actor_loss (gradient)", False, f"backward() raised {type(e).__name__}: {e}", _ACTOR_HINT)
    grad_lp = logprobs.grad
    expect = torch.where(mask.bool(), -adv.detach() / mask.sum(), torch.zeros_like(adv))
    if grad_lp is None or not torch.allclose(torch.nan_to_num(grad_lp, nan=1e9), expect, atol=1e-5):
        return report("a2c_actor_loss", False, "the gradient w.r.t. the log-probs is wrong", _ACTOR_HINT)
    if adv.grad is not None and bool((adv.grad != 0).any()):
        return report(
            "a2c_actor_loss",
            False,
            "gradient flows into the advantages: the critic would be trained by the actor's loss",
            ("the advantages are fixed weights in the actor's loss: no gradient may reach them.",
             "use advantages.detach() in the loss."),
        )
    return report("a2c_actor_loss", True, "value and gradient match the library's policy_gradient_loss")


STEP_ORDERS = ("DBEAC", "DEBAC")  # scoring (B) and criticising (E) both need only the response: either may come first


@exercise("answer_order", points=2, difficulty="medium", minutes=10, kind="ordering")
def check_step_order(answer) -> bool:
    """Order of the events of one A2C iteration (letters A-E, e.g. "EDCBA"); both valid orders pass."""
    if answer is None or answer is ... or (isinstance(answer, str) and not answer.strip()):
        return not_answered("answer_order")  # no hint before a first attempt
    letters = re.sub(r"[^A-Za-z]", "", answer).upper() if isinstance(answer, str) else None
    ok = letters in STEP_ORDERS
    return report("answer_order", ok, "" if ok else f"{answer!r} is not right",
                  ("the critic can only judge a token once there is a response, and the advantage needs both the "
                   "reward and the critic's values.",
                   "the actor samples first (D) and the gradient step comes last (C); the reward model (B) and the "
                   "critic (E) each need only the response, in either order, and the advantages (A) need both."))


@exercise("answer_high_advantage", points=1, difficulty="easy", minutes=5, kind="multiple choice")
def check_high_advantage(answer) -> bool:
    """A token gets a large positive advantage: what does the actor's update do to its probability?"""
    return check_value(
        "answer_high_advantage",
        answer,
        "D",
        hint=("the actor's loss is -A log pi(a|s): which way does a gradient step move log pi(a|s) when A > 0?",
              "minimising -A log pi raises log pi(a|s) when A > 0, whatever the sign of the reward; A2C clips "
              "nothing, and the critic is trained by its own loss, not by the actor's."),
    )


@exercise("answer_run_diagnosis", points=2, difficulty="medium", minutes=10, kind="diagnosis")
def check_run_diagnosis(answer) -> bool:
    """A colleague's A2C log (proxy up, gold down, KL in the tens of nats, entropy rising): diagnosis and fix."""
    return check_value(
        "answer_run_diagnosis",
        answer,
        "A",
        hint=("the proxy reward is what the actor optimises and the gold reward is what you want: follow the two "
              "columns, and the KL, together.",
              "proxy up while gold falls, a KL of tens of nats, rising entropy and degenerate text: the reward "
              "model is being hacked far from where it was trained (§3.6). The critic is fine (explained variance "
              "about 0.5) and the actor clearly moves; what is missing is the anchor to the reference."),
    )


EXERCISES = {
    "answer_advantage": check_advantage_value,
    "a2c_actor_loss": check_a2c_actor_loss,
    "answer_order": check_step_order,
    "answer_high_advantage": check_high_advantage,
    "answer_run_diagnosis": check_run_diagnosis,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_a2c_actor_loss(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    return hidden_function_check(fn, policy_gradient_loss, _actor_inputs, seed)
