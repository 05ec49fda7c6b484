"""Chapter 7 exercises: RLOO and GRPO advantages by hand, a group advantage with degenerate groups, the length
bias of the loss aggregation, pass@k by hand, telling a run that sharpens from one that widens, and a short
experiment with the group size."""

from __future__ import annotations

import torch

from . import check_function, check_numbers, check_value, exercise, hidden_experiment_check, hidden_function_check, report

__all__ = ["EXERCISES", "check_group_advantage_fn", "check_group_size_experiment", "check_grpo_by_hand",
           "check_loss_aggregation_choice", "check_pass_at_k_by_hand", "check_rloo_by_hand", "check_sharpen_or_widen"]

_GROUP = [1.0, 0.0, 0.0, 3.0]  # the group of exercises 7.1 and 7.2: K = 4 rewards of one prompt


@exercise("answer_rloo", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_rloo_by_hand(answer) -> bool:
    """Group rewards [1.0, 0.0, 0.0, 3.0] (K = 4 replies to one prompt): the RLOO advantage of each reply, 4 numbers."""
    from ..critic_free import rloo_advantages

    # baseline of reply i: the mean of the other three, (4 - r_i) / 3 -> [1, 4/3, 4/3, 1/3]; A = [0, -4/3, -4/3, 8/3]
    hint = ("RLOO's baseline for a reply must not depend on that reply (§7.1): which rewards of the group does that "
            "leave to average? One advantage per reply, in the order of the rewards.",
            "reply i's baseline is the mean of the other three rewards, (4 - r_i) / 3 = [1, 4/3, 4/3, 1/3]; its "
            "advantage is r_i minus that baseline (not r_i minus the mean of all four).")
    return check_numbers("answer_rloo", answer, rloo_advantages(torch.tensor([_GROUP]))[0], "one per reply", hint)


@exercise("answer_grpo", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_grpo_by_hand(answer) -> bool:
    """Group rewards [1.0, 0.0, 0.0, 3.0]: the GRPO advantage of the 4th reply, (r - mean) / (std + 1e-4), with the
    unbiased (Bessel-corrected, torch.std's) group std, as ``grpo_advantages(scale="group")``; 2/sqrt(2) is accepted."""
    from ..critic_free import grpo_advantages

    # mean 1; deviations [0, -1, -1, 2], squares sum to 6; unbiased var 6/3 = 2, std sqrt(2); 2 / (sqrt(2) + 1e-4)
    return check_value(
        "answer_grpo", answer, grpo_advantages(torch.tensor([_GROUP]))[0, 3].item(),
        hint=("centre the 4th reward on the group mean, then scale it by the group's spread. Which std does the "
              "question ask for: the sum of squared deviations divided by K, or by K - 1?",
              "the mean is 1, the deviations (0, -1, -1, 2), their squares sum to 6; the unbiased std is "
              "sqrt(6 / 3) = sqrt(2) (torch.std's default), so the 4th reply gets 2 / (sqrt(2) + 1e-4)."),
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
        hint=("three things to get right: the statistics belong to each group (one row of K rewards), the std is "
              "the unbiased one the question names, and a group whose rewards are all equal must come out as 0.0, "
              "not as 0/0.",
              "mean and std over dim 1 with keepdim=True; (r - mean) / (r.std(1, keepdim=True) + 1e-4) (torch.std "
              "divides by K - 1); then torch.where(degenerate, 0.0, adv) with degenerate = "
              "r.amax(1, keepdim=True) == r.amin(1, keepdim=True)."),
    ):
        return False
    hint = ("a group of K equal rewards such as 0.9 still gets a small nonzero advantage from your function. Floats "
            "round: can you tell that a group is degenerate without computing its mean or its std?",
            "the float mean of seven copies of 0.9 is not exactly 0.9, so r - mean and the std come out ~1e-8 and "
            "(r - mean) / (std + 1e-4) leaves a spurious advantage of ~1e-4 (a test std == 0 misses them). Find the "
            "groups with r.amax(1) == r.amin(1), from the rewards themselves, and set their advantages to 0.0.")
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
        "answer_aggregation", answer, "C",
        hint=("write the weight that one token of reply i gets in 1/N sum_i (1/|y_i| sum_t l_it). How does it "
              "change with |y_i|?",
              "one token of reply i weighs 1/(N |y_i|): for a reply with A < 0, every extra token dilutes the push "
              "down on all of its tokens, so long wrong replies are penalised less per token, and the gradient "
              "lengthens them. A normaliser that does not depend on |y_i| (dr_grpo's constant N L, or a token "
              "mean) weighs every token alike (§7.3)."),
    )


@exercise("answer_pass_at_k", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_pass_at_k_by_hand(answer) -> bool:
    """n = 5 samples of which c = 2 are correct: the unbiased estimate of pass@2."""
    from ..critic_free import pass_at_k

    # 1 - C(n - c, k) / C(n, k) = 1 - C(3, 2) / C(5, 2) = 1 - 3/10
    return check_value(
        "answer_pass_at_k", answer, pass_at_k(5, 2, 2),
        hint=("pass@k asks whether at least one of k replies, drawn from the n samples without putting any back, "
              "is correct. It is easier to count the ways this fails.",
              "1 - C(n - c, k) / C(n, k) = 1 - C(3, 2) / C(5, 2): 3 of the 10 pairs of samples are both wrong. "
              "1 - (1 - c/n)^k draws with replacement and is biased."),
    )


# run -> its reading (the notebook gives pass@1 and pass@16 before and after each run)
_SHARPENING = {"run_a": "widens", "run_b": "sharpens", "run_c": "neither"}


@exercise("answer_sharpening", points=2, difficulty="medium", minutes=10, kind="matching")
def check_sharpen_or_widen(answer) -> bool:
    """run_a: pass@1 0.30 -> 0.42, pass@16 0.80 -> 0.91; run_b: 0.30 -> 0.55, 0.80 -> 0.78; run_c: 0.30 -> 0.27,
    0.80 -> 0.70. Each: "sharpens", "widens" or "neither"."""
    name = "answer_sharpening"
    if answer is None or answer is ...:
        return report(name, False, "not answered yet")
    if not isinstance(answer, dict) or set(answer) != set(_SHARPENING):
        return report(name, False, f"expected a dict with the keys {sorted(_SHARPENING)}, got {answer!r}",
                      'one word per run, e.g. {"run_a": "sharpens", ...}')
    wrong = sorted(k for k, v in answer.items() if str(v).strip().lower() != _SHARPENING[k])
    return report(
        name, not wrong, "" if not wrong else f"{len(wrong)} of {len(_SHARPENING)} not right",
        hint=("pass@16 asks whether a prompt can be solved at all in 16 tries, pass@1 how often one try is right. "
              "What must happen to each for a policy that only concentrates on answers it could already find?",
              "sharpening raises pass@1 but not pass@16 (more probability on answers already within reach); "
              "widening raises both (prompts solved that were not before); a run that does not raise pass@1 is "
              "neither. Read each run's two columns against that."),
    )


_KAPPA = 0.75  # exercise 7.7: a reply is correct when its gold reward is at least this


@exercise("answer_group_size_experiment", points=3, difficulty="medium", minutes=15, kind="experiment")
def check_group_size_experiment(answer) -> bool:
    """The experiment of exercise 7.7: degenerate groups of a pass/fail reward (gold >= 0.75) among the same 240
    replies of the base model, grouped by K = 2 and by K = 8 (3 seeds)."""
    # measured with seeds 0-9: 19-24% of the replies correct; 58-74% of the 120 groups of 2 degenerate against
    # 7-23% of the 30 groups of 8 (at least 0.4 apart in every seed); no group of 8 all correct
    return check_value(
        "answer_group_size_experiment", answer, "B",
        hint=("compare the two shares seed by seed. Then work out, for a prompt whose replies are correct with "
              "probability p, the chance that K independent replies all agree.",
              "a group is degenerate when its K replies are all wrong or all right: (1 - p)^K + p^K. With about one "
              "reply in five correct, two replies are both wrong about two times in three, eight replies all wrong "
              "far less often (easy and hard prompts differ, so not exactly (1 - p)^8). The same 240 replies in "
              "groups of 8 leave far fewer of them without a learning signal."),
    )


EXERCISES = {
    "answer_rloo": check_rloo_by_hand,
    "answer_grpo": check_grpo_by_hand,
    "answer_pass_at_k": check_pass_at_k_by_hand,
    "group_advantages": check_group_advantage_fn,
    "answer_aggregation": check_loss_aggregation_choice,
    "answer_sharpening": check_sharpen_or_widen,
    "answer_group_size_experiment": check_group_size_experiment,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_group_advantages(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    from ..critic_free import grpo_advantages

    return hidden_function_check(fn, grpo_advantages, _group_rewards, seed)


def _group_size_reading(shares: dict) -> tuple[str | None, str]:
    """The letter of exercise 7.7 that ``{seed: {2: share, 8: share}}`` shows, and a summary of it."""
    rows = [(s, float(v[2]), float(v[8])) for s, v in sorted(shares.items())]
    shown = None
    if all(max(a, b) == 0.0 for _, a, b in rows):
        shown = "D"  # nothing degenerate
    elif all(a >= 0.5 and b <= a - 0.2 for _, a, b in rows):
        shown = "B"  # most pairs degenerate, far fewer groups of 8
    elif all(b > a for _, a, b in rows):
        shown = "C"
    elif all(abs(a - b) < 0.1 for _, a, b in rows):
        shown = "A"
    summary = "; ".join(f"seed {s}: K = 2 {a:.0%}, K = 8 {b:.0%}" for s, a, b in rows)
    return shown, summary


def hidden_check_answer_group_size_experiment(answer, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    """The experiment of 7.7, against the student's own run: it must be in the notebook, at kappa = 0.75, over three
    seeds, and show the reading answered (B: most groups of 2 degenerate, far fewer groups of 8)."""

    def prerequisites(ns, shares):
        if ns.get("kappa") != _KAPPA:
            return f"the notebook's run is at kappa = {ns.get('kappa')!r}; the question is about kappa = {_KAPPA}"
        return "" if len(shares) >= 3 else "the experiment has fewer than three seeds: run its whole cell"

    return hidden_experiment_check(answer, ns, "degenerate", "counts", prerequisites, _group_size_reading,
                                   "run's degenerate groups")
