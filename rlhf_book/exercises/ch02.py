"""Chapter 2 (reward modeling) exercises: two code, two numeric, a diagnosis from measurements, one multiple-choice."""

from __future__ import annotations

import math

import torch

from ..advantage import last_token_index
from ..reward_model import bradley_terry_loss
from . import check_function, check_value, exercise, hidden_function_check

__all__ = [
    "check_bt_loss",
    "check_p_a_over_b",
    "check_gap_for_90",
    "check_last_token_scores",
    "check_length_diagnosis",
    "check_invariance",
    "EXERCISES",
]


def _score_pairs(g: torch.Generator) -> tuple:
    rc = 3 * torch.randn(8, generator=g)
    rr = 3 * torch.randn(8, generator=g)
    rr[0] = rc[0] + 150.0  # one badly wrong pair: exp/log of sigmoid underflows here
    return rc, rr


@exercise("bt_loss", points=3, difficulty="medium", minutes=15, kind="code")
def check_bt_loss(bt_loss) -> bool:
    """``bt_loss(r_chosen, r_rejected)`` must equal mean(-log sigmoid(r_c - r_r)), also for large gaps."""
    return check_function(
        "bt_loss",
        bt_loss,
        lambda rc, rr: bradley_terry_loss(rc, rr),
        _score_pairs,
        hint=("the loss is the mean over pairs of -log sigmoid(r_chosen - r_rejected). One pair is wrong by a gap "
              "of 150: in float32 sigmoid(-150) is 0, and log(0) = -inf.",
              "use torch.nn.functional.logsigmoid(r_chosen - r_rejected), which is computed stably for any gap, "
              "then take minus its mean."),
        atol=1e-4,
        rtol=1e-5,
    )


@exercise("p_a_over_b", points=1, difficulty="easy", minutes=3, kind="numeric")
def check_p_a_over_b(p_a_over_b) -> bool:
    """r(A) = 1.2, r(B) = 0.5: the Bradley-Terry probability that A is preferred."""
    return check_value(
        "p_a_over_b",
        p_a_over_b,
        1 / (1 + math.exp(-(1.2 - 0.5))),
        hint=("under Bradley-Terry only the difference of the two rewards matters, passed through a sigmoid.",
              "P(A > B) = sigmoid(r_A - r_B) = 1 / (1 + exp(-(1.2 - 0.5)))."),
        atol=2e-3,
    )


@exercise("gap_for_90", points=2, difficulty="medium", minutes=5, kind="numeric")
def check_gap_for_90(gap_for_90) -> bool:
    """The reward gap r(A) - r(B) at which the model predicts A wins 90% of the time."""
    return check_value(
        "gap_for_90", gap_for_90, math.log(9.0),
        hint=("you need the gap d with sigmoid(d) = 0.9: invert the sigmoid.",
              "sigmoid(d) = p  <=>  d = log(p / (1 - p)); here p = 0.9 (natural log)."),
        atol=2e-3,
    )


def _scores_and_mask(g: torch.Generator) -> tuple:
    B, T = 6, 9
    scores = torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    left = torch.rand(B, generator=g) < 0.5
    cols = torch.arange(T)
    right_mask = cols[None, :] < lengths[:, None]
    left_mask = cols[None, :] >= (T - lengths)[:, None]
    mask = torch.where(left[:, None], left_mask, right_mask).long()
    return scores, mask


@exercise("last_token_scores", points=4, difficulty="hard", minutes=20, kind="code")
def check_last_token_scores(last_token_scores) -> bool:
    """``last_token_scores(scores (B, T), attention_mask (B, T)) -> (B,)``: the score at each row's last real token."""

    def reference(scores, mask):
        return scores[torch.arange(scores.size(0)), last_token_index(mask)]

    return check_function(
        "last_token_scores",
        last_token_scores,
        reference,
        _scores_and_mask,
        hint=("rows are padded on the left *or* on the right, so mask.sum(-1) - 1 is the index of the last real "
              "token only for right padding.",
              "find the column of the last 1 in each row: torch.where(mask.bool(), column index, -1).max(-1) gives "
              "it for either padding; then index scores[torch.arange(B), last]."),
    )


@exercise("length_diagnosis", points=2, difficulty="medium", minutes=10, kind="diagnosis")
def check_length_diagnosis(length_diagnosis) -> bool:
    """Multiple choice: what the correlation numbers say about a colleague's reward model."""
    return check_value(
        "length_diagnosis",
        length_diagnosis,
        "A",
        hint=("compare how the RM's score and the gold score move with length, and on which pairs the RM is wrong.",
              "gold barely depends on length (+0.04) while the RM's score does (+0.71); and 0.38 on the pairs "
              "whose better reply is the shorter one is worse than a coin flip. More epochs on the same data "
              "would only fit the same shortcut better."),
    )


@exercise("answer_invariance", points=1, difficulty="easy", minutes=5, kind="multiple choice")
def check_invariance(answer) -> bool:
    """Which change of the scores leaves every Bradley-Terry probability P(y_c > y_r) unchanged?"""
    return check_value(
        "answer_invariance", answer, "C",
        hint=("P(y_c > y_r) = sigmoid(r_c - r_r): look for the change that leaves the difference r_c - r_r of "
              "every pair as it was.",
              "both replies of a pair answer the same prompt, so a number added for the prompt is added to both "
              "scores and cancels in r_c - r_r. Scaling, a length bonus and exp all change that difference."),
    )


EXERCISES = {
    "bt_loss": check_bt_loss,
    "p_a_over_b": check_p_a_over_b,
    "gap_for_90": check_gap_for_90,
    "last_token_scores": check_last_token_scores,
    "length_diagnosis": check_length_diagnosis,
    "answer_invariance": check_invariance,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_bt_loss(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    return hidden_function_check(fn, lambda rc, rr: bradley_terry_loss(rc, rr), _score_pairs, seed, atol=1e-4)


def hidden_check_last_token_scores(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    return hidden_function_check(fn, lambda s, m: s[torch.arange(s.size(0)), last_token_index(m)], _scores_and_mask,
                                 seed)
