"""Chapter 7 exercises: RLOO and GRPO advantages by hand, a group advantage with degenerate groups, the length
bias of the loss aggregation, pass@k by hand, and telling a run that sharpens from one that widens."""

from __future__ import annotations

import torch

from . import check_function, check_numbers, check_value, exercise, hidden_function_check, report

__all__ = ["EXERCISES", "check_group_advantage_fn", "check_grpo_by_hand", "check_loss_aggregation_choice",
           "check_pass_at_k_by_hand", "check_rloo_by_hand", "check_sharpen_or_widen"]

_GROUP = [1.0, 0.0, 0.0, 3.0]  # the group of exercises 7.1 and 7.2: K = 4 rewards of one prompt


@exercise("answer_rloo", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_rloo_by_hand(answer) -> bool:
    """Group rewards [1.0, 0.0, 0.0, 3.0] (K = 4 replies to one prompt): the RLOO advantage of each reply, 4 numbers."""
    from ..critic_free import rloo_advantages

    # baseline of reply i: the mean of the other three, (4 - r_i) / 3 -> [1, 4/3, 4/3, 1/3]; A = [0, -4/3, -4/3, 8/3]
    hint = ("each reply's baseline is the mean of the *other* K - 1 rewards of its group, not of all K, so that it "
            "does not depend on the reply it judges; one advantage per reply, in the order of the rewards.")
    return check_numbers("rloo_by_hand", answer, rloo_advantages(torch.tensor([_GROUP]))[0], "one per reply", hint)


@exercise("answer_grpo", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_grpo_by_hand(answer) -> bool:
    """Group rewards [1.0, 0.0, 0.0, 3.0]: the GRPO advantage of the 4th reply, (r - mean) / (std + 1e-4), with the
    unbiased (Bessel-corrected, torch.std's) group std, as ``grpo_advantages(scale="group")``; 2/sqrt(2) is accepted."""
    from ..critic_free import grpo_advantages

    # mean 1; deviations [0, -1, -1, 2], squares sum to 6; unbiased var 6/3 = 2, std sqrt(2); 2 / (sqrt(2) + 1e-4)
    return check_value(
        "grpo_by_hand", answer, grpo_advantages(torch.tensor([_GROUP]))[0, 3].item(),
        hint="subtract the group mean, then divide by the group std; torch.std, like the library, divides the "
        "sum of squared deviations by K - 1, not by K.",
    )


def _group_rewards(g: torch.Generator) -> tuple:
    K = (4, 2, 3, 8, 2)[g.initial_seed() % 5]  # check_function seeds trial t with 1000 + t: K = 2 in two trials
    B = 8
    rows = []
    for b in range(B):
        kind = b if b < 4 else int(torch.randint(2, 5, (1,), generator=g))  # rows 0-3: one of each kind, then any
        if kind == 0:
            row = torch.zeros(K)  # every reply wrong
        elif kind == 1:
            row = torch.ones(K)  # every reply right
        elif kind == 2:
            row = (torch.rand(K, generator=g) < 0.5).float()  # a thresholded reward: often all equal when K is small
        elif kind == 3:
            row = torch.randn(K, generator=g) * 2.0 + 1.0  # a continuous reward
        else:
            row = torch.full((K,), float(torch.randint(-2, 3, (1,), generator=g)) * 0.5)  # all equal, exact in floats
        rows.append(row)
    return (torch.stack(rows),)


# Degenerate groups whose float mean is not exactly their value: r - mean and the std come out ~1e-8, so
# (r - mean) / (std + 1e-4) is ~1e-4, not 0, unless the equal groups are found from the rewards themselves.
_ROUNDING = [(K, x, rows) for K in (3, 6, 7, 8) for x in (0.1, 0.2, 0.3, 0.7, 0.9, 3.7) for rows in (1, 2)]


@exercise("group_advantages", points=4, difficulty="hard", minutes=25, kind="code")
def check_group_advantage_fn(fn) -> bool:
    """fn(rewards) -> (B, K) on (B, K) rewards: (r - group mean) / (group std + 1e-4), torch.std's unbiased std,
    and exactly 0.0 (never NaN) for a group whose K rewards are all equal; random cases with K = 2, 3, 4, 8, degenerate
    groups included, then degenerate groups of values like 0.9 (repeated K times) whose float mean is not exact."""
    from ..critic_free import grpo_advantages

    name = "group_advantages"
    if not check_function(
        name, fn, grpo_advantages, _group_rewards,
        hint="mean and std over each group's K rewards (dim 1, keepdim=True); torch.std divides by K - 1, as the "
        "library does; add 1e-4 to the std; a group whose rewards are all equal must give 0, not 0/0.",
    ):
        return False
    hint = ("the float mean of seven copies of 0.9 is not exactly 0.9, so r - mean and the std come out ~1e-8 and "
            "(r - mean) / (std + 1e-4) leaves a spurious advantage of ~1e-4 (and a test std == 0 can miss them). "
            "Decide which groups are degenerate from the rewards themselves, and set their advantages to 0.")
    for K, x, rows in _ROUNDING:
        r = torch.full((rows, K), x)
        r[1:] = torch.linspace(0.0, 1.0, K)  # with two rows, an ordinary group next to it (torch reduces differently)
        try:
            got = torch.as_tensor(fn(r.clone()))
        except Exception as e:  # noqa: BLE001 (the learner's bug, shown rather than raised)
            return report(f"{name} (equal rewards)", False, f"raised {type(e).__name__}: {e}", hint)
        if got.shape != r.shape or not bool(torch.isfinite(got).all()) or bool((got[0] != 0).any()):
            return report(f"{name} (equal rewards)", False,
                          f"a group of {K} rewards all equal to {x} does not get exactly 0.0", hint)
    return report(f"{name} (equal rewards)", True, "degenerate groups give exactly 0, whatever the rounding")


@exercise("answer_aggregation", points=2, difficulty="medium", minutes=10, kind="diagnosis")
def check_loss_aggregation_choice(answer) -> bool:
    """Under loss_type="grpo" the replies with negative advantage grow longer: why, and what removes it (A-D)?"""
    return check_value(
        "loss_aggregation", answer, "B",
        hint="write the weight that one token of reply i gets in 1/N sum_i (1/|y_i| sum_t l_it). How does it "
        "change with |y_i|, and for a reply with A < 0, what does a longer reply buy? The fix is a normaliser "
        "that does not depend on the reply's own length.",
    )


@exercise("answer_pass_at_k", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_pass_at_k_by_hand(answer) -> bool:
    """n = 5 samples of which c = 2 are correct: the unbiased estimate of pass@2."""
    from ..critic_free import pass_at_k

    # 1 - C(n - c, k) / C(n, k) = 1 - C(3, 2) / C(5, 2) = 1 - 3/10
    return check_value(
        "pass_at_k_by_hand", answer, pass_at_k(5, 2, 2),
        hint="pass@k is the probability that k replies drawn *without replacement* from the n include a correct "
        "one: 1 minus the chance that all k come from the n - c wrong ones, counted with binomial coefficients. "
        "1 - (1 - c/n)^k draws with replacement and is biased.",
    )


# run -> its reading (the notebook gives pass@1 and pass@16 before and after each run)
_SHARPENING = {"run_a": "widens", "run_b": "sharpens", "run_c": "neither"}


@exercise("answer_sharpening", points=2, difficulty="medium", minutes=10, kind="matching")
def check_sharpen_or_widen(answer) -> bool:
    """run_a: pass@1 0.30 -> 0.42, pass@16 0.80 -> 0.91; run_b: 0.30 -> 0.55, 0.80 -> 0.78; run_c: 0.30 -> 0.27,
    0.80 -> 0.70. Each: "sharpens", "widens" or "neither"."""
    name = "sharpen_or_widen"
    if answer is None or answer is ...:
        return report(name, False, "not answered yet")
    if not isinstance(answer, dict) or set(answer) != set(_SHARPENING):
        return report(name, False, f"expected a dict with the keys {sorted(_SHARPENING)}, got {answer!r}",
                      'one word per run, e.g. {"run_a": "sharpens", ...}')
    wrong = sorted(k for k, v in answer.items() if str(v).strip().lower() != _SHARPENING[k])
    return report(name, not wrong, "" if not wrong else f"{len(wrong)} of {len(_SHARPENING)} not right",
                  "pass@16 asks whether a prompt can be solved at all in 16 tries. A policy that only puts more "
                  "probability on answers it could already find raises pass@1 but not pass@16; one that learns to "
                  "solve new prompts raises both. Did every run raise pass@1?")


EXERCISES = {
    "answer_rloo": check_rloo_by_hand,
    "answer_grpo": check_grpo_by_hand,
    "answer_pass_at_k": check_pass_at_k_by_hand,
    "group_advantages": check_group_advantage_fn,
    "answer_aggregation": check_loss_aggregation_choice,
    "answer_sharpening": check_sharpen_or_widen,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_group_advantages(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    from ..critic_free import grpo_advantages

    return hidden_function_check(fn, grpo_advantages, _group_rewards, seed)
