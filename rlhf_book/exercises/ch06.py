"""Chapter 6 exercises: a DPO loss and a gradient weight by hand, the loss with padding, matching the variants,
diagnosing a run, choosing beta, and a short experiment with beta."""

from __future__ import annotations

import math

import torch

from . import check_function, check_matching, check_value, exercise, hidden_experiment_check, hidden_function_check

__all__ = ["check_dpo_loss_by_hand", "check_gradient_weight", "check_dpo_loss_fn", "check_loss_matching",
           "check_diagnosis", "check_beta_choice", "check_beta_experiment", "EXERCISES"]


@exercise("answer_dpo_loss", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_dpo_loss_by_hand(answer) -> bool:
    """beta = 0.5; log pi: chosen -12, rejected -15; log pi_ref: chosen -13, rejected -14."""
    # log-ratios +1 (chosen) and -1 (rejected): beta * (1 - (-1)) = 1, loss = -log sigmoid(1) = log(1 + e^-1)
    return check_value(
        "answer_dpo_loss", answer, math.log1p(math.exp(-1.0)),
        hint=("every quantity in the DPO loss is a log-ratio of the policy to the reference (§6.1). Which two "
              "log-ratios does this pair have, and how does the loss combine them before the sigmoid?",
              "log-ratios: chosen -12 - (-13) = +1, rejected -15 - (-14) = -1; beta times their difference is "
              "0.5 * 2 = 1; the loss is -log sigmoid(1) = log(1 + exp(-1)), with the natural log."),
    )


@exercise("answer_gradient_weight", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_gradient_weight(answer) -> bool:
    """beta = 0.1; log pi: chosen -20, rejected -25; log pi_ref: chosen -23, rejected -22: the weight
    sigmoid(r_rejected - r_chosen) the DPO gradient gives the pair, from its implicit rewards."""
    # implicit rewards 0.1 * (+3) = +0.3 and 0.1 * (-3) = -0.3; weight sigmoid(-0.6) = 0.354
    return check_value(
        "answer_gradient_weight", answer, 1.0 / (1.0 + math.exp(0.6)),
        hint=("first the implicit reward of each reply (§6.1). The gradient weight of §6.3 is the probability "
              "those rewards give to the wrong order of the pair: is this pair ranked right or wrong?",
              "r_chosen = 0.1 * (-20 - (-23)) = +0.3 and r_rejected = 0.1 * (-25 - (-22)) = -0.3; the weight is "
              "sigmoid(r_rejected - r_chosen) = sigmoid(-0.6) = 1 / (1 + exp(0.6)), below 1/2 because the pair "
              "is already ranked right."),
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
        hint=("a reply's log-probability is the sum of its token log-probs over its real tokens only, under the "
              "policy and under the reference; the padding holds NaN here, and NaN * 0 is NaN. Return one loss per "
              "pair, shape (B,).",
              "sum each of the four tensors with torch.where(mask.bool(), x, 0.0).sum(-1) (select, do not "
              "multiply); then -F.logsigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r))) on those sums, without a "
              "mean over the batch."),
    )


# loss type -> the description it matches (the notebook lists the descriptions a-d)
_MATCHING = {"sigmoid": "c", "hinge": "a", "ipo": "d", "simpo": "b"}


@exercise("answer_matching", points=2, difficulty="medium", minutes=10, kind="matching")
def check_loss_matching(answer) -> bool:
    """Match each loss_type to its description a-d."""
    return check_matching(
        "answer_matching", answer, _MATCHING,
        hint=("for each loss, ask what happens to a pair whose margin is already large: does the loss keep falling, "
              "go flat, or rise again? And which of the four never mentions pi_ref?",
              "sigmoid: -log sigmoid(beta Delta) keeps falling as the margin grows (c); hinge: max(0, 1 - beta "
              "Delta) is flat past a margin of 1/beta (a); ipo: a square, smallest at a target margin, so a pair "
              "past it is pushed back (d); simpo: per-token averaged log-likelihoods, no reference, a margin gamma "
              "(b). See §6.4's table."),
    )


@exercise("answer_diagnosis", points=2, difficulty="medium", minutes=10, kind="diagnosis")
def check_diagnosis(answer) -> bool:
    """A run whose chosen and rejected log-probs both fall (see the notebook): which reading is right?"""
    return check_value(
        "answer_diagnosis", answer, "D",
        hint=("test each option against the log: which does a held-out accuracy that rose to 0.79, or a loss "
              "still falling, rule out? Then ask what the loss actually asks of the two log-probs.",
              "the loss only sees the difference of the two log-ratios: nothing in it keeps the chosen reply's "
              "probability up. Both can fall while the margin grows, and the mass they lose goes to replies in "
              "neither, which the KL to the reference measures (§6.5, §6.7). Accuracy rising rules out flipped "
              "labels; log-probs of chosen replies can fall under DPO."),
    )


@exercise("answer_beta", points=1, difficulty="easy", minutes=5, kind="multiple choice")
def check_beta_choice(answer) -> bool:
    """Which beta for the next run, given the described failure (see the notebook)?"""
    return check_value(
        "answer_beta", answer, "C",
        hint=("in DPO, as in PPO, beta prices the distance from pi_ref. In which direction does this run need to "
              "move beta, and what would an extreme value do?",
              "the run drifted 40 nats at beta = 0.03, so beta must grow; at beta = 300 any margin beyond a "
              "fraction of a nat is worthless and the policy barely moves. §6.7's runs at beta = 0.3 stayed within "
              "a few nats and did not turn over."),
    )


_EXPERIMENT_BETAS = (0.1, 1.0)  # exercise 6.7 compares these two


@exercise("answer_beta_experiment", points=3, difficulty="medium", minutes=15, kind="experiment")
def check_beta_experiment(answer) -> bool:
    """The experiment of exercise 6.7: DPO at beta = 0.1 and beta = 1 on the same 8 pairs for 30 steps (3 seeds)."""
    # measured with seeds 0-9: the log-ratio margin on the 8 pairs is 23-38 nats at beta = 0.1 against 10-14 at
    # beta = 1 (at least twice as wide in every seed), and the KL on 120 held-out replies 2.2-10.5 nats against
    # 0.7-2.0 (at least 1.6 times as large in every seed)
    return check_value(
        "answer_beta_experiment", answer, "A",
        hint=("compare the two columns seed by seed: which run ends further from pi_ref, on its own pairs and on "
              "the held-out replies? Then look at the loss -log sigmoid(beta Delta): at what margin Delta has each "
              "beta won its pairs?",
              "Adam divides the gradient by its own running scale, so beta does not set the step size: the two runs "
              "start alike. At beta = 1 the loss is near 0 once the margin passes a few nats, and the gradient "
              "weight sigmoid(-beta Delta) with it; at beta = 0.1 the same margin is worth ten times less, so it "
              "keeps pushing: about twice the margin, and a larger KL on held-out prompts, in every seed."),
    )


EXERCISES = {
    "answer_dpo_loss": check_dpo_loss_by_hand,
    "answer_gradient_weight": check_gradient_weight,
    "dpo_loss": check_dpo_loss_fn,
    "answer_matching": check_loss_matching,
    "answer_diagnosis": check_diagnosis,
    "answer_beta": check_beta_choice,
    "answer_beta_experiment": check_beta_experiment,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_dpo_loss(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    return hidden_function_check(fn, _reference_dpo, _padded_pairs, seed)


def _beta_reading(drift: dict) -> tuple[str | None, str]:
    """The letter of exercise 6.7 that a run ``{beta: {seed: {"margin", "kl"}}}`` shows, and a summary of it."""
    small, large = (drift[b] for b in _EXPERIMENT_BETAS)
    seeds = sorted(set(small) & set(large))
    pairs = [(float(small[s][k]), float(large[s][k])) for s in seeds for k in ("margin", "kl")]
    shown = None
    if all(max(a, b) < 0.05 for a, b in pairs):
        shown = "D"  # neither moved
    elif all(abs(a - b) <= 0.2 * max(a, b) for a, b in pairs):
        shown = "C"  # about equally far
    elif all(a > b for a, b in pairs):
        shown = "A"  # beta = 0.1 further, on its pairs and on held-out replies, in every seed
    elif all(b > a for a, b in pairs):
        shown = "B"
    summary = "; ".join(f"seed {s}: margin {float(small[s]['margin']):.1f} vs {float(large[s]['margin']):.1f}, "
                        f"KL {float(small[s]['kl']):.2f} vs {float(large[s]['kl']):.2f}" for s in seeds)
    return shown, summary


def hidden_check_answer_beta_experiment(answer, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    """The experiment of 6.7, against the student's own run: it must be in the notebook, compare beta = 0.1 with
    beta = 1.0 over three seeds, and show the reading answered (A: beta = 0.1 ends further away in every seed)."""

    def prerequisites(ns, drift):
        if (ns.get("beta_small"), ns.get("beta_large")) != _EXPERIMENT_BETAS or not all(b in drift for b in _EXPERIMENT_BETAS):
            return (f"the notebook's runs compare beta = {ns.get('beta_small')!r} with {ns.get('beta_large')!r}; "
                    "the question is about 0.1 and 1.0")
        if min(len(drift[b]) for b in _EXPERIMENT_BETAS) < 3:
            return "the experiment has fewer than three seeds per beta: run its whole cell"
        return ""

    return hidden_experiment_check(answer, ns, "dpo_drift", "runs", prerequisites, _beta_reading,
                                   "runs (beta = 0.1 vs 1.0)")
