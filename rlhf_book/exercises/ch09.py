"""Chapter 9 exercises: reading replies the way the strict and the lenient verifiers do, the strict extraction rule
in code, process rewards and their group-normalised advantages by hand, diagnosing a run that learnt to exploit a
lenient verifier, which tokens process supervision credits, and a short experiment with the group size and the
difficulty of the problems."""

from __future__ import annotations

import numbers
import random

import torch

from . import (
    check_function,
    check_numbers,
    check_value,
    exercise,
    hidden_experiment_check,
    hidden_function_check,
    report,
)

__all__ = ["EXERCISES", "check_degenerate_experiment", "check_lenient_by_hand", "check_process_advantages_by_hand",
           "check_process_credit_choice", "check_reward_diagnosis", "check_step_rewards_by_hand",
           "check_strict_answer_fn", "check_strict_by_hand"]

_QUESTION = "What is 47 + 85?"  # exercise 9.1: answer 132


def _replies_91() -> list[str]:
    """The four replies of exercise 9.1, (a) to (d)."""
    from ..worlds import arithmetic as A

    reference = A.reference_reply(A.parse_problem(_QUESTION))  # 7 + 5 = 12 / 4 + 8 + 1 = 13 / #### 132
    steps = reference.rsplit("\n", 1)[0]
    return [reference, steps + "\n#### 0132", "7 + 5 = 12\n4 + 8 + 1 = 13\nso 132 it is", "#### 132\n#### 133"]


def _same(got, expected) -> bool:
    """One item of a list answer: None only for None; True/False also as 1/0; a number equal to an int."""
    if expected is None or got is None:
        return got is None and expected is None
    if isinstance(expected, bool):
        return isinstance(got, int) and got in (0, 1) and bool(got) == expected  # bool is an int
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        return False
    return float(got) == float(expected)


def _check_items(name: str, answer, expected: list, what: str, hint) -> bool:
    """Check a list answer item by item (exact: booleans, integers, None)."""
    if answer is None or answer is ... or (isinstance(answer, str) and not answer.strip()):
        return report(name, False, "not answered yet")
    if not isinstance(answer, (list, tuple)) or len(answer) != len(expected):
        return report(name, False, f"expected a list of {len(expected)} items ({what}), got {answer!r}", hint)
    wrong = [i for i, (a, e) in enumerate(zip(answer, expected)) if not _same(a, e)]
    return report(name, not wrong, "" if not wrong else f"{len(wrong)} of {len(expected)} not right", hint)


@exercise("answer_strict", points=1, difficulty="easy", minutes=5, kind="numeric")
def check_strict_by_hand(answer) -> bool:
    """The four replies of 9.1 to "What is 47 + 85?": does the strict verifier accept each? 4 booleans."""
    from ..worlds import arithmetic as A

    # (a) the reference scratchpad: True; (b) 0132 has a leading zero: False; (c) no '#### ' line: False;
    # (d) two lines hold ####: False (and its last one says 133)
    expected = [A.verify(r, A.parse_problem(_QUESTION).answer, "strict") for r in _replies_91()]
    return _check_items(
        "answer_strict", answer, expected, "True or False for (a), (b), (c), (d)",
        hint=(("the strict verifier reads only the reply's last non-blank line, and asks of it an exact format. "
               "What exactly may that line hold, and may another line hold ####?"),
              ("accepted only when the last non-blank line is exactly '#### N', N written canonically (no leading "
               "zero, no '+', not '-0'), and no other line holds ####: (a) passes; (b) writes 0132; (c) has no "
               "#### line at all; (d) has two #### lines (and its last one says 133).")),
    )


@exercise("answer_lenient", points=1, difficulty="easy", minutes=5, kind="numeric")
def check_lenient_by_hand(answer) -> bool:
    """The four replies of 9.1: what extract_answer(reply, "lenient") returns for each, 4 integers (or None)."""
    from ..worlds import arithmetic as A

    # the last integer anywhere, leading zeros allowed: 132, 132 (from 0132), 132 ("so 132 it is"), 133
    expected = [A.extract_answer(r, "lenient") for r in _replies_91()]
    return _check_items(
        "answer_lenient", answer, expected, "an integer or None for (a), (b), (c), (d)",
        hint=(("the lenient rule ignores the format and the #### marker: it takes one number from anywhere in the "
               "reply. Which one, and how does it read a number written with a leading zero?"),
              ("it is the last integer in the reply (a run of digits with an optional minus), leading zeros allowed: "
               "0132 reads as 132, 'so 132 it is' ends its last number with 132, and in (d) the last number is 133.")),
    )


# ---------------------------------------------------------------------------------------------- 9.2
_DIFFICULTIES_92 = ("add1", "add2", "add3", "mul2", "chain3", "chain5")


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(1, 10)) + "".join(str(rng.randrange(10)) for _ in range(n - 1))


def _answer_line(kind: str, n: int, rng: random.Random) -> str:
    """The last part of a reply of ``kind`` for the answer ``n``: well-formed or broken in one way."""
    from ..worlds.arithmetic import MAX_DIGITS

    full_width = "".join(chr(0xFF10 + int(c)) if c.isdigit() else c for c in str(n))
    lines = {
        "plain": f"#### {n}",
        "negative": f"#### {-abs(n) if n else -7}",
        "zero": "#### 0",
        "spaces": rng.choice([f"   #### {n}  ", f"\t#### {n}", f"#### {n}\n\n  \n", f"#### {n}\t\n"]),
        "leading zero": rng.choice([f"#### 0{n}", f"#### 00{abs(n)}", "#### 00", f"#### -0{abs(n) or 5}"]),
        "minus zero": "#### -0",
        "plus": f"#### +{abs(n)}",
        "two markers": rng.choice([f"#### {n}\n#### {n}", f"#### {n + 1}\n#### {n}", f"so #### {n}\n#### {n}",
                                   f"#### {n}\n##### {n}"]),
        "trailing text": rng.choice([f"#### {n} apples", f"#### {n}\nthat is all", f"#### {n}.", f"#### {n}!",
                                     f"#### {n} = {n}"]),
        "no space": rng.choice([f"####{n}", f"####  {n}", f"####\t{n}", f"#### - {abs(n) or 3}"]),
        "hashes": rng.choice([f"### {n}", f"##### {n}", f"# {n}", f"#{n}"]),
        "letters": rng.choice([f"#### {n}a", f"#### x{n}", "#### abc", f"#### {n}e2", f"#### {abs(n)}.0",
                               f"#### 1,{abs(n):03d}", f"#### {n} {n}"]),
        "other digits": f"#### {rng.choice(['', '-'])}{rng.randrange(1, 10)}{full_width.lstrip('-')}",  # 1２３
        "forty digits": f"#### {rng.choice(['', '-'])}{_digits(rng, MAX_DIGITS)}",
        "long": rng.choice([f"#### {_digits(rng, MAX_DIGITS + 1)}", f"#### -{_digits(rng, MAX_DIGITS + 1)}",
                            f"#### {_digits(rng, MAX_DIGITS + 5)}"]),
    }
    return lines[kind]


_KINDS_92 = ("plain", "negative", "zero", "spaces", "leading zero", "minus zero", "plus", "two markers",
             "trailing text", "no space", "hashes", "letters", "other digits", "forty digits", "long", "no answer",
             "answer first", "crlf", "empty")


def _reply(kind: str, rng: random.Random) -> str:
    """A reply of ``kind``: a scratchpad of a random problem, right or slipped, whose answer part is ``kind``."""
    from ..worlds import arithmetic as A

    problem = A.sample_problem(rng, rng.choice(_DIFFICULTIES_92))
    steps, answer = A.solve(problem)
    if rng.random() < 0.4:  # a careless scratchpad: one slipped step and a wrong answer
        steps, answer = A.solve(problem, (rng.randrange(len(steps)), rng.choice((-2, -1, 1, 2))))
    scratch = [s.text for s in steps]
    if kind == "no answer":
        return "\n".join(scratch) + rng.choice(["", "\n", f"\nthe answer is {answer}"])
    if kind == "answer first":
        return "\n".join([f"#### {answer}", *scratch])
    if kind == "crlf":
        return "\r\n".join([*scratch, f"#### {answer}"]) + rng.choice(["", "\r\n"])
    if kind == "empty":
        return rng.choice(["", "   ", "\n\n", " \t\n "])
    return "\n".join([*scratch, _answer_line(kind, answer, rng)])


def _replies(g: torch.Generator) -> tuple:
    """(replies,): every kind once, then well-formed ones or any kind, 40 replies in a random order."""
    rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    kinds = list(_KINDS_92) + [rng.choice(_KINDS_92) if rng.random() < 0.5 else "plain"
                               for _ in range(40 - len(_KINDS_92))]
    rng.shuffle(kinds)
    return ([_reply(kind, rng) for kind in kinds],)


def _as_answer(x):
    """What a learner's function returned, comparable with an int or None (anything else never equals them)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if x is None or (isinstance(x, numbers.Integral) and not isinstance(x, bool)):
        return None if x is None else int(x)
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**53:
        return int(x)
    return f"<{type(x).__name__} {x!r:.60}>"


def _each(fn):
    """``fn`` (one reply -> int or None) applied to each reply of a list: what check_function compares."""
    def run(replies):
        return [_as_answer(fn(reply)) for reply in replies]

    return run


def _reference_strict(replies):
    from ..worlds.arithmetic import extract_answer

    return [extract_answer(reply, "strict") for reply in replies]


def _first_difference(fn) -> str:
    """Where ``fn`` first differs from the strict verifier on the visible inputs, as a sentence ("" if nowhere)."""
    for trial in range(5):
        (replies,) = _replies(torch.Generator().manual_seed(1000 + trial))
        for reply, expected in zip(replies, _reference_strict(replies)):
            try:
                got = fn(reply)
            except Exception:  # noqa: BLE001 (check_function reports it)
                return ""
            if _as_answer(got) != expected:
                return f" For instance, your function returns {got!r:.60} for the reply {reply!r}."
    return ""


@exercise("strict_answer", points=4, difficulty="medium", minutes=25, kind="code")
def check_strict_answer_fn(fn) -> bool:
    """fn(reply) -> int or None: the strict rule of extract_answer(reply, "strict"), on 5 x 40 random replies: right
    and slipped scratchpads whose answer part is well-formed or broken (leading zeros, -0, +5, two #### lines, trailing
    text, whitespace around, a missing or doubled space, letters, non-ASCII digits, more than MAX_DIGITS digits, no
    answer, the answer first, Windows line ends, an empty reply)."""
    name = "strict_answer"
    hint = (("four things decide: which line is read (blank lines and the whitespace around a line do not count), "
             "the exact format of that line (one space, how the number may be written: which characters count as "
             "digits, the sign, leading zeros), how many lines may hold ####, and how long the number may be."),
            ("lines = [l.strip() for l in reply.splitlines() if l.strip()]; None when there are none or when "
             "sum('####' in l for l in lines) != 1; then re.fullmatch(r'#### (-?(?:0|[1-9][0-9]*))', lines[-1]) (a "
             "whole-line match; [0-9], not \\d, which also matches other scripts' digits); None when it fails, when "
             "the number is '-0' or when it has more than MAX_DIGITS (40) digits; else int of it."))
    example = _first_difference(fn) if callable(fn) else ""
    if example:
        hint = tuple(h + example for h in hint)
    return check_function(name, _each(fn) if callable(fn) else fn, _reference_strict, _replies, hint=hint)


# ---------------------------------------------------------------------------------------------- 9.3
_QUESTION_93 = "What is 347 + 285?"  # reference: 7 + 5 = 12 / 4 + 8 + 1 = 13 / 3 + 2 + 1 = 6 / #### 632
_SLIPPED_93 = "7 + 5 = 12\n4 + 8 + 1 = 14\n3 + 2 + 1 = 6\n#### 642"


@exercise("answer_step_rewards", points=2, difficulty="medium", minutes=10, kind="numeric")
def check_step_rewards_by_hand(answer) -> bool:
    """A.process_steps of the slipped reply 7 + 5 = 12 / 4 + 8 + 1 = 14 / 3 + 2 + 1 = 6 / #### 642 to "What is
    347 + 285?": the reward of each of its 4 lines."""
    from ..worlds import arithmetic as A

    # 3 reference steps -> each line can earn 1/4; line 2 slipped (14, not 13): 0; line 3 is still the reference's
    # step (the carry is 1 from 13 and from 14): 1/4; 642 is wrong: 0. -> [0.25, 0, 0.25, 0]
    expected = torch.tensor([v for _, v in A.process_steps(_QUESTION_93, _SLIPPED_93)])
    return check_numbers(
        "answer_step_rewards", answer, expected, "one per line, the answer line last",
        hint=(("what can one line earn, given how many steps the reference scratchpad of 347 + 285 has? Then check "
               "each line against the reference's line at the same place, not only its arithmetic."),
              ("the reference has 3 steps (7 + 5 = 12, 4 + 8 + 1 = 13, 3 + 2 + 1 = 6), so each of the 4 lines can "
               "earn 1/4. The slipped line earns 0; the line after it is the reference's step all the same (14 "
               "carries 1, as 13 does); the answer 642 is wrong and earns 0.")),
    )


def _process_group() -> tuple:
    """9.3's group of K = 2 replies in a (2, 8) layout: steps end at columns 2, 5 and 7 (the answer) of each."""
    values = torch.tensor([[0.0, 0.0, 1 / 3, 0.0, 0.0, 1 / 3, 0.0, 1 / 3],   # both steps right, answer right
                           [0.0, 0.0, 1 / 3, 0.0, 0.0, 0.0, 0.0, 0.0]])      # first step right, second wrong, wrong
    ends = torch.zeros(2, 8, dtype=torch.bool)
    ends[:, [2, 5, 7]] = True
    return values, ends, torch.ones(2, 8)


@exercise("answer_process_advantages", points=2, difficulty="medium", minutes=15, kind="numeric")
def check_process_advantages_by_hand(answer) -> bool:
    """One group of K = 2 replies; step rewards (1/3, 1/3, answer 1/3) and (1/3, 0, answer 0): the advantage
    process_advantages gives the first token of each reply (eps = 1e-4; eps = 0, +-sqrt(15)/2, is accepted too)."""
    from ..advantage import process_advantages

    # six step rewards (1/3 x4, 0 x2): mean 2/9, deviations +1/9 and -2/9, squares sum 12/81, unbiased var 12/405,
    # std 0.1721; normalised +0.6455 and -1.2910 (eps 1e-4: +0.6451, -1.2902). A first token sums its reply's three
    # steps: 3 x 0.6451 = +1.9354 and 0.6451 - 2 x 1.2902 = -1.9354 (+-1.9365 = +-sqrt(15)/2 with eps = 0)
    adv = process_advantages(*_process_group(), group_size=2)
    return check_numbers(
        "answer_process_advantages", answer, adv[:, 0], "reply 1's first token, then reply 2's",
        hint=(("normalise each step reward by the mean and the std of all the step rewards of the group (both "
               "replies, answer steps included, unbiased std), then sum the normalised rewards a token is credited "
               "with. Which steps does a reply's first token get credit for?"),
              ("the six step rewards (1/3, 1/3, 1/3, 1/3, 0, 0) have mean 2/9 and unbiased std sqrt(12/405) = 0.172; "
               "they normalise to +0.645 and -1.291. A token is credited with the steps that end at or after it, so "
               "a first token with all three of its reply's: 3 x 0.645 for reply 1, 0.645 - 2 x 1.291 for reply 2.")),
        atol=2e-3,
    )


@exercise("answer_reward_diagnosis", points=2, difficulty="medium", minutes=10, kind="diagnosis")
def check_reward_diagnosis(answer) -> bool:
    """A GRPO run on the arithmetic world: training reward 0.75 -> 0.85, held-out strict accuracy on chain3 flat, and
    replies with right steps whose last line drops the minus sign. Which reward was it trained on (A-D)?"""
    return check_value(
        "answer_reward_diagnosis", answer, "D",
        hint=(("score the reply `3 - 4 = -1`, `-1 - 8 = -9`, `#### 9` (the answer is -9) with each of the four rewards: "
               "which of them pays it, and with which could the training reward rise from 0.75?"),
              ("the strict verifier scores that reply 0, so training on it would fix the sign, not lose it; the format "
               "reward pays almost every reply of the base policy already (its training reward starts near 1, not "
               "0.75); a coin stays near 0.5. The any-number verifier pays the reply for the -9 of its second step: "
               "once a step holds the answer, the last line no longer matters, and nothing keeps its sign right.")),
    )


@exercise("answer_process_credit", points=2, difficulty="medium", minutes=10, kind="multiple choice")
def check_process_credit_choice(answer) -> bool:
    """9.3's group under process_advantages: how are the tokens of reply 2 (first step right, second step and
    answer wrong) pushed (A-D)?"""
    # process_advantages(*_process_group(), group_size=2)[1], reply 2's tokens: first step -1.935, second step
    # -2.580, answer -1.290 (tests/test_exercises.py checks these): every token pushed down, the wrong step's the most;
    # an outcome reward (1 vs 0, K = 2, GRPO) gives each of its tokens the same -0.707
    return check_value(
        "answer_process_credit", answer, "A",
        hint=(("write down the three normalised step rewards of reply 2, then for a token in each part of the reply "
               "which of them its advantage sums."),
              ("reply 2's steps normalise to +0.645 (its right first step), -1.291 (its wrong step) and -1.291 (its "
               "wrong answer). A token sums those of the steps ending at or after it: -1.94 on the first step's "
               "tokens, -2.58 on the second step's, -1.29 on the answer's. The right first step is still pushed down: "
               "what follows it failed. Only an outcome reward gives every token the same advantage.")),
    )


# ---------------------------------------------------------------------------------------------- 9.6
_TEMPERATURE = 1.0  # exercise 9.6: the sampling temperature the question is about
_SETTINGS = tuple((d, K) for d in ("add2", "mul2") for K in (2, 8))


@exercise("answer_degenerate_experiment", points=3, difficulty="medium", minutes=15, kind="experiment")
def check_degenerate_experiment(answer) -> bool:
    """The experiment of exercise 9.6: the share of degenerate groups (all K replies right or all wrong under the
    strict reward) of the base policy on 80 held-out add2 and mul2 problems, at K = 2 and K = 8 (3 seeds)."""
    # measured with seeds 0-2 (temperature 1): add2 62-69% at K = 2 -> 12-20% at K = 8 (nearly all of them all right);
    # mul2 76-79% -> 30-38% (nearly all of them all wrong); at K = 8 mul2 more than add2 by 0.13-0.24 in every seed
    return check_value(
        "answer_degenerate_experiment", answer, "C",
        hint=(("read each difficulty's K = 2 against its K = 8, seed by seed, then the two difficulties at K = 8. "
               "For a problem solved with probability p, what is the chance that K replies all agree?"),
              ("a group is degenerate with probability p^K + (1 - p)^K, which falls with K unless p is 0 or 1. On "
               "add2 most problems have p near 0.8, and eight replies rarely all agree (12-20% of the groups). mul2 "
               "has many problems the policy (almost) never solves, p near 0: their groups stay all wrong at any K "
               "(30-38% at K = 8). Larger groups rescue the problems of middling p, not the hopeless ones.")),
    )


EXERCISES = {
    "answer_strict": check_strict_by_hand,
    "answer_lenient": check_lenient_by_hand,
    "strict_answer": check_strict_answer_fn,
    "answer_step_rewards": check_step_rewards_by_hand,
    "answer_process_advantages": check_process_advantages_by_hand,
    "answer_reward_diagnosis": check_reward_diagnosis,
    "answer_process_credit": check_process_credit_choice,
    "answer_degenerate_experiment": check_degenerate_experiment,
}


# Hidden checks: the grader (rlhf_book.grade) calls hidden_check_<name>(answer, seed, ns) on inputs drawn from its
# grading seed, never printed in the notebook; each returns (ok, detail). See rlhf_book/exercises/__init__.py.


def hidden_check_strict_answer(fn, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    if not callable(fn):
        return False, f"expected a function, got {type(fn).__name__}"
    return hidden_function_check(_each(fn), _reference_strict, _replies, seed)


def _degenerate_reading(shares: dict) -> tuple[str | None, str]:
    """The letter of exercise 9.6 that ``{seed: {(difficulty, K): share}}`` shows, and a summary of it."""
    rows = [(s, *(float(v[key]) for key in _SETTINGS)) for s, v in sorted(shares.items())]  # a2, a8, m2, m8
    falls = all(a8 <= a2 - 0.1 and m8 <= m2 - 0.1 for _, a2, a8, m2, m8 in rows)
    shown = None
    if falls and all(m8 >= a8 + 0.05 for _, a2, a8, m2, m8 in rows):
        shown = "C"  # fewer degenerate groups at K = 8, and more of them on mul2 (all wrong)
    elif falls and all(a8 >= m8 + 0.05 for _, a2, a8, m2, m8 in rows):
        shown = "B"
    elif all(a8 <= a2 - 0.1 and abs(m8 - m2) < 0.1 for _, a2, a8, m2, m8 in rows):
        shown = "D"
    elif all(abs(a8 - a2) < 0.1 and abs(m8 - m2) < 0.1 for _, a2, a8, m2, m8 in rows):
        shown = "A"
    summary = "; ".join(f"seed {s}: add2 {a2:.0%} at K = 2, {a8:.0%} at K = 8, mul2 {m2:.0%}, {m8:.0%}"
                        for s, a2, a8, m2, m8 in rows)
    return shown, summary


def hidden_check_answer_degenerate_experiment(answer, seed: int, ns: dict | None = None) -> tuple[bool, str]:
    """The experiment of 9.6, against the student's own runs: they must be in the notebook, at temperature 1, over
    three seeds with add2 and mul2 at K = 2 and 8, and show the reading answered (C: the share falls with K at both
    difficulties and, at K = 8, more mul2 groups than add2 groups are degenerate)."""

    def prerequisites(ns, shares):
        if ns.get("temperature") != _TEMPERATURE:
            return (f"the notebook's runs are at temperature = {ns.get('temperature')!r}; the question is about "
                    f"temperature = {_TEMPERATURE}")
        if len(shares) < 3:
            return "the experiment has fewer than three seeds: run its whole cell"
        missing = sorted({key for v in shares.values() for key in _SETTINGS if key not in v})
        if missing:
            return f"the experiment's runs lack the settings {missing}: run its whole cell"
        return ""

    return hidden_experiment_check(answer, ns, "degenerate", "runs", prerequisites, _degenerate_reading,
                                   "runs' degenerate groups")
