"""Chapter 6 exercises: a DPO loss by hand, the loss with padding, an implicit reward, matching the variants,
diagnosing a run, and choosing beta."""

from __future__ import annotations

import math

import torch

from . import check_function, check_value, exercise, hidden_function_check, report

__all__ = ["check_dpo_loss_by_hand", "check_dpo_loss_fn", "check_implicit_reward", "check_loss_matching",
           "check_diagnosis", "check_beta_choice", "EXERCISES"]


@exercise("answer_dpo_loss", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_dpo_loss_by_hand(answer) -> bool:
    """beta = 0.5; log pi: chosen -12, rejected -15; log pi_ref: chosen -13, rejected -14."""
    # log-ratios +1 (chosen) and -1 (rejected): beta * (1 - (-1)) = 1, loss = -log sigmoid(1) = log(1 + e^-1)
    return check_value(
        "dpo_loss_by_hand", answer, math.log1p(math.exp(-1.0)),
        hint="first each reply's log-ratio log pi - log pi_ref, then their difference (chosen minus rejected), "
        "times beta; the loss is -log sigmoid of that, i.e. log(1 + exp(-x)).",
    )


def _padded_pairs(g: torch.Generator) -> tuple:
    B, T = 4, 7
    out = []
    for _ in range(2):  # chosen, rejected
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = (torch.arange(T) < lengths[:, None]).long()
        lp = -3 * torch.rand(B, T, generator=g)
        ref = lp + 0.3 * torch.randn(B, T, generator=g)
        # padding holds garbage, as it can in real code: NaN, so multiplying by the mask is not enough
        lp, ref = (torch.where(mask.bool(), x, float("nan")) for x in (lp, ref))
        out += [lp, ref, mask]
    beta = float(0.05 + torch.rand(1, generator=g).item())
    return (*out, beta)


def _reference_dpo(lp_c, ref_c, mask_c, lp_r, ref_r, mask_r, beta):
    from ..dpo import dpo_loss
    from ..rollout import sequence_logprob

    s = lambda x, m: sequence_logprob(torch.where(m.bool(), x, 0.0), m)  # noqa: E731
    return dpo_loss(s(lp_c, mask_c), s(lp_r, mask_r), s(ref_c, mask_c), s(ref_r, mask_r), beta)[0]


@exercise("dpo_loss", points=4, difficulty="medium", minutes=20, kind="code")
def check_dpo_loss_fn(fn) -> bool:
    """fn(lp_chosen, ref_chosen, mask_chosen, lp_rejected, ref_rejected, mask_rejected, beta) -> (B,) losses."""
    return check_function(
        "dpo_loss", fn, _reference_dpo, _padded_pairs,
        hint="sum each reply's per-token log-probs over its mask only (torch.where(mask.bool(), x, 0.0): padding "
        "holds NaN here), for the policy and the reference; then -logsigmoid(beta * (chosen log-ratio - rejected "
        "log-ratio)), one loss per pair (no mean).",
    )


@exercise("answer_implicit_reward", points=1, difficulty="easy", minutes=5, kind="numeric")
def check_implicit_reward(answer) -> bool:
    """beta = 0.1, log pi(y|x) = -20.0, log pi_ref(y|x) = -23.0: the implicit reward of y."""
    return check_value(
        "implicit_reward", answer, 0.1 * (-20.0 + 23.0),
        hint="r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), up to beta log Z(x), which is the same for every "
        "reply to x and cancels in a comparison.",
    )


# loss type -> the description it matches (the notebook lists the descriptions a-d)
_MATCHING = {"sigmoid": "c", "hinge": "a", "ipo": "d", "simpo": "b"}


@exercise("answer_matching", points=2, difficulty="medium", minutes=10, kind="matching")
def check_loss_matching(answer) -> bool:
    """Match each loss_type to its description a-d."""
    if answer is None or answer is ...:
        return report("loss_matching", False, "not answered yet")
    if not isinstance(answer, dict) or set(answer) != set(_MATCHING):
        return report("loss_matching", False, f"expected a dict with the keys {sorted(_MATCHING)}, got {answer!r}",
                      "one letter per loss type, e.g. {'sigmoid': 'a', ...}")
    wrong = sorted(k for k, v in answer.items() if str(v).strip().lower() != _MATCHING[k])
    return report("loss_matching", not wrong, "" if not wrong else f"{len(wrong)} of 4 not right",
                  "a squared loss has a target value and stops pushing there; a hinge stops at a margin; one form "
                  "needs no reference model at all.")


@exercise("answer_diagnosis", points=2, difficulty="medium", minutes=10, kind="diagnosis")
def check_diagnosis(answer) -> bool:
    """A run whose chosen and rejected log-probs both fall (see the notebook): which reading is right?"""
    return check_value(
        "diagnosis", answer, "B",
        hint="the loss only sees the difference of the two log-ratios; nothing in it keeps the chosen reply's "
        "probability up. Where does the probability mass both replies lose go, and what measures that?",
    )


@exercise("answer_beta", points=1, difficulty="easy", minutes=5, kind="multiple choice")
def check_beta_choice(answer) -> bool:
    """Which beta for the next run, given the described failure (see the notebook)?"""
    return check_value(
        "beta_choice", answer, "C",
        hint="in DPO, as in PPO, beta prices the distance from pi_ref: a small beta let the policy drift tens of "
        "nats; the fix moves beta the other way, but not so far that the policy cannot move at all.",
    )


EXERCISES = {
    "answer_dpo_loss": check_dpo_loss_by_hand,
    "dpo_loss": check_dpo_loss_fn,
    "answer_implicit_reward": check_implicit_reward,
    "answer_matching": check_loss_matching,
    "answer_diagnosis": check_diagnosis,
    "answer_beta": check_beta_choice,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_dpo_loss(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    return hidden_function_check(fn, _reference_dpo, _padded_pairs, seed)
