"""The book's second world: arithmetic problems whose answers a program checks (RL with verifiable rewards).

A *problem* is a short expression with a difficulty knob (:data:`DIFFICULTIES`: column addition of
1 to 4 digits, a multi-digit number times one digit, chains of + and -). Its prompt asks
``What is 347 + 285?``; its reply is a scratchpad of steps, each one line ``expression = value``
that a program can check, then the final answer on a last line in a fixed format::

    7 + 5 = 12
    4 + 8 + 1 = 13
    3 + 2 + 1 = 6
    #### 632

The parts, each a small pure function:

* the generator: :func:`generate_problems` (seeded; problems are split into train and held-out
  by a hash of their text, :func:`split_of`, so a held-out problem is never in the traces nor in the
  RL prompts) and :func:`heldout_problems` (a held-out set per difficulty);
* the scratchpad: :func:`solve` (the steps, optionally with one arithmetic slip that propagates
  to a wrong answer) and :func:`generate_traces`, the corpus the policy learns from, with a
  controlled share of wrong traces so that supervised training leaves room for RL;
* the verifier: :func:`extract_answer` / :func:`verify` in three modes (``"strict"``: exactly
  the fixed format on the last line; ``"lenient"``: the last number anywhere; ``"any"``: any number
  anywhere, which a policy exploits by printing many numbers), :func:`is_well_formed` (the format
  alone) and :func:`check_steps` (each scratchpad step on its own, for process rewards);
* rewards: :func:`make_reward_fn` (and the ready-made :func:`strict_reward`, :func:`lenient_reward`,
  :func:`any_number_reward`, :func:`format_reward`, and the per-step :data:`process_reward`,
  :func:`process_steps`) with the library's reward signature
  ``(prompts, responses, terminated) -> (B,)``; the answer is read from the prompt itself
  (:func:`parse_problem`), so a reward is a pure function of the prompt and the reply;
* the build: a byte-level BPE tokenizer that keeps every digit a token of its own and a small GPT
  trained from scratch on the traces with :func:`rlhf_book.base_model.train_base_model`, cached
  atomically with :func:`rlhf_book.cache.cached_artifact` like the reviews world's base LM
  (:func:`build`, :func:`load_policy`, :data:`PRESETS`).

:data:`WORLD` bundles them for the registry (``rlhf_book.worlds.get_world("arithmetic")``).

The ``cpu`` preset (2 layers x 128, 0.44M parameters, 1500 steps of 64 traces of the five
:data:`TRAINED` difficulties, 20% of them wrong) took 262 s of CPU time on one thread (peak
memory 1 GB; 17 min of wall time on two cores shared with other jobs). Its held-out accuracy,
greedy / sampled at temperature 1: add1 1.00 / 0.78, add2 1.00 / 0.80, add3 0.99 / 0.78,
mul2 0.66 / 0.44, chain3 0.92 / 0.67, and at most 0.05 on the longer add4, mul3 and chain5
it never saw. A first build whose traces differed only in a few slips gave mul2 0.36 / 0.30 and
chain3 0.77 / 0.52: compare policies over several build seeds.

Nothing here is random at import time: every sample comes from a ``random.Random(seed)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..base_model import Preset, load_base_model, train_base_model
from ..cache import artifact_key, cache_dir, cached_artifact
from ..config import Config, option
from ..export import save_model
from ..rewards import StepReward, reward_fn_from_verifier
from ..runtime import get_device
from ..tokenizer import EOS, PAD, format_prompt, prompt_as_text, prompt_format_tag, save_tokenizer
from . import World

__all__ = [
    "ANSWER_PREFIX",
    "DIFFICULTIES",
    "MAX_DIGITS",
    "MODES",
    "PRESETS",
    "TRAINED",
    "WORLD",
    "WORLD_VERSION",
    "ArithmeticPreset",
    "Difficulty",
    "Problem",
    "Step",
    "StepCheck",
    "accuracy",
    "any_number_reward",
    "build",
    "build_policy",
    "check_steps",
    "evaluate",
    "extract_answer",
    "format_reply",
    "format_reward",
    "generate_problems",
    "generate_traces",
    "heldout_problems",
    "heldout_sets",
    "is_well_formed",
    "lenient_reward",
    "load_policy",
    "make_reward_fn",
    "parse_problem",
    "policy_key",
    "policy_metadata",
    "policy_path",
    "process_reward",
    "process_steps",
    "prompts",
    "reference_reply",
    "reward_fn",
    "sample_problem",
    "solve",
    "split_of",
    "strict_reward",
    "train_digit_tokenizer",
    "verify",
]

WORLD_VERSION = 1  # bump when the problems, the trace format, the tokenizer or the build changes
ANSWER_PREFIX = "#### "  # the final answer's line: "#### 632" (GSM8K's marker)
MAX_DIGITS = 40  # a longer number is no answer and no step (and never reaches int(), whose limit is 4300 digits)
HELDOUT_PERCENT = 20  # share of each difficulty's problems held out (by a hash of the problem's text)
PROMPT_TEMPLATE = "What is {}?"


# ------------------------------------------------------------------ problems
@dataclass(frozen=True)
class Difficulty:
    """One setting of the knob: the operation, the digits of the first operand and the number of terms."""

    op: str  # "add": a + b column by column; "mul": a * b with b one digit; "chain": a +- b +- c ... left to right
    digits: int
    terms: int = 2


DIFFICULTIES: dict[str, Difficulty] = {
    "add1": Difficulty("add", 1),  # 7 + 5: one step
    "add2": Difficulty("add", 2),  # 47 + 85: two column steps with a carry
    "add3": Difficulty("add", 3),
    "add4": Difficulty("add", 4),
    "mul2": Difficulty("mul", 2),  # 47 * 6
    "mul3": Difficulty("mul", 3),  # 347 * 6
    "chain3": Difficulty("chain", 1, 3),  # 8 + 5 - 3: running results, which can be negative
    "chain5": Difficulty("chain", 1, 5),
}
# what the presets train on; add4, mul3 and chain5 are longer than anything in the traces (held out whole)
TRAINED = ("add1", "add2", "add3", "mul2", "chain3")


@dataclass(frozen=True)
class Problem:
    """An expression: ``numbers[0] ops[0] numbers[1] ...`` (``*`` before ``+`` and ``-``), and its difficulty."""

    numbers: tuple[int, ...]
    ops: tuple[str, ...]
    difficulty: str | None = None

    @property
    def text(self) -> str:
        """``347 + 285``: the expression as the prompt writes it."""
        out = str(self.numbers[0])
        for op, x in zip(self.ops, self.numbers[1:]):
            out += f" {op} {x}"
        return out

    @property
    def prompt(self) -> str:
        """``What is 347 + 285?``"""
        return PROMPT_TEMPLATE.format(self.text)

    @property
    def answer(self) -> int:
        return evaluate(self.numbers, self.ops)


def evaluate(numbers, ops) -> int:
    """The value of ``numbers[0] ops[0] numbers[1] ...`` with ``*`` binding tighter than ``+`` and ``-``."""
    terms, signs = [numbers[0]], [1]
    for op, x in zip(ops, numbers[1:]):
        if op == "*":
            terms[-1] *= x
        elif op in "+-":
            terms.append(x)
            signs.append(1 if op == "+" else -1)
        else:
            raise ValueError(f"unknown operator {op!r}: use +, - or *")
    return sum(s * t for s, t in zip(signs, terms))


def _number(rng: random.Random, digits: int) -> int:
    """A number of exactly ``digits`` digits (one digit: 0 to 9)."""
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10**digits)


def _difficulty(name: str) -> Difficulty:
    if name not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {name!r}; known: {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[name]


def sample_problem(rng: random.Random, difficulty: str) -> Problem:
    """One problem of ``difficulty`` (a name of :data:`DIFFICULTIES`) drawn with ``rng``."""
    d = _difficulty(difficulty)
    if d.op == "add":
        return Problem((_number(rng, d.digits), _number(rng, d.digits)), ("+",), difficulty)
    if d.op == "mul":
        return Problem((_number(rng, d.digits), rng.randrange(2, 10)), ("*",), difficulty)
    numbers = (_number(rng, d.digits), *(rng.randrange(10) for _ in range(d.terms - 1)))
    return Problem(numbers, tuple(rng.choice("+-") for _ in range(d.terms - 1)), difficulty)


def split_of(problem: Problem) -> str:
    """``"eval"`` for the held-out share of problems (:data:`HELDOUT_PERCENT`, by a hash of the text), else ``"train"``."""
    h = int(hashlib.sha256(problem.text.encode()).hexdigest()[:8], 16)
    return "eval" if h % 100 < HELDOUT_PERCENT else "train"


def _check_names(difficulties) -> tuple[str, ...]:
    if isinstance(difficulties, str):
        difficulties = (difficulties,)
    names = tuple(difficulties)
    if not names:
        raise ValueError("difficulties is empty: name at least one of " + ", ".join(DIFFICULTIES))
    for name in names:
        _difficulty(name)
    return names


def generate_problems(n: int, seed: int = 0, difficulties=tuple(DIFFICULTIES), split: str = "train") -> list[Problem]:
    """``n`` problems of ``split`` ("train" or "eval"), difficulties in turn; deterministic for a seed (repeats allowed)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    names = _check_names(difficulties)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        while True:  # rejection: every difficulty has problems in both splits
            p = sample_problem(rng, names[i % len(names)])
            if split_of(p) == split:
                break
        out.append(p)
    return out


def heldout_problems(difficulty: str, n: int = 200, seed: int = 0) -> list[Problem]:
    """Up to ``n`` distinct held-out problems of one difficulty (fewer when it has fewer, e.g. add1's ~20)."""
    rng, seen, out = random.Random(f"heldout-{difficulty}-{seed}"), set(), []
    for _ in range(50 * n):
        p = sample_problem(rng, difficulty)
        if split_of(p) == "eval" and p.text not in seen:
            seen.add(p.text)
            out.append(p)
            if len(out) == n:
                break
    return out


def heldout_sets(n: int = 200, seed: int = 0, difficulties=tuple(DIFFICULTIES)) -> dict[str, list[Problem]]:
    """``{difficulty: held-out problems}`` for each difficulty (see :func:`heldout_problems`)."""
    return {name: heldout_problems(name, n, seed) for name in _check_names(difficulties)}


_PROMPT_RE = re.compile(r"What is (.+?)\?")
_EXPR_RE = re.compile(r"(-?[0-9]+)((?:\s*[-+*]\s*-?[0-9]+)*)")
_TAIL_RE = re.compile(r"\s*([-+*])\s*(-?[0-9]+)")


def _parse_expression(text: str) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    """(numbers, operators) of ``text`` if it is exactly an expression of integers and + - * (else None)."""
    m = _EXPR_RE.fullmatch(text.strip())
    if m is None:
        return None
    parts = [m.group(1)] + [x for _, x in _TAIL_RE.findall(m.group(2))]
    if any(len(x.lstrip("-")) > MAX_DIGITS for x in parts):
        return None
    return tuple(int(x) for x in parts), tuple(op for op, _ in _TAIL_RE.findall(m.group(2)))


def parse_problem(prompt) -> Problem:
    """The problem a prompt asks (``... What is <expression>? ...``; a string or chat messages); ValueError if none."""
    text = prompt_as_text(prompt) if isinstance(prompt, (list, tuple)) else prompt
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string or chat messages, got {type(prompt).__name__}")
    m = _PROMPT_RE.search(text)
    parsed = _parse_expression(m.group(1)) if m else None
    if parsed is None:
        raise ValueError(f"prompt {text[:80]!r} holds no arithmetic problem: the arithmetic world's prompts read "
                         f"{PROMPT_TEMPLATE.format('<expression>')!r}, e.g. {Problem((347, 285), ('+',)).prompt!r}")
    return Problem(*parsed)


# ------------------------------------------------------------------ the scratchpad
@dataclass(frozen=True)
class Step:
    """One line of the scratchpad, ``expression = value`` (a slipped step's value is wrong)."""

    expression: str
    value: int

    @property
    def text(self) -> str:
        return f"{self.expression} = {self.value}"


def solve(problem: Problem, slip: tuple[int, int] | None = None) -> tuple[list[Step], int]:
    """(the scratchpad steps, the final answer) of ``problem``; ``slip = (step, delta)`` adds ``delta`` to one step.

    Addition and multiplication by a digit go column by column from the ones, with the carry
    as a third term (``4 + 8 + 1 = 13``); the answer is assembled from the columns. A chain is
    evaluated left to right. A slip propagates as a person's would: later steps use the wrong
    value, so the answer is off by ``delta`` times the column's place value (a column's value is
    kept >= 0). Without a slip the answer is ``problem.answer``.
    """
    numbers, ops = problem.numbers, problem.ops
    column = len(ops) == 1 and ops[0] in "+*" and min(numbers) >= 0 and (ops[0] == "+" or numbers[1] < 10)
    steps: list[Step] = []

    def record(expression: str, value: int) -> int:
        if slip is not None and slip[0] == len(steps):
            value = max(0, value + slip[1]) if column else value + slip[1]
        steps.append(Step(expression, value))
        return value

    if column:
        a, b = numbers
        da = [int(c) for c in reversed(str(a))]
        db = [int(c) for c in reversed(str(b))] if ops[0] == "+" else []
        carry, digits = 0, []
        for i in range(max(len(da), len(db))):
            x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
            expr = f"{x} * {b}" if ops[0] == "*" else f"{x} + {y}"
            exact = x * b + carry if ops[0] == "*" else x + y + carry
            value = record(expr + (f" + {carry}" if carry else ""), exact)
            digits.append(value % 10)
            carry = value // 10
        return steps, sum(d * 10**i for i, d in enumerate(digits)) + carry * 10 ** len(digits)
    numbers, ops = list(numbers), list(ops)
    while "*" in ops and len(ops) > 1:  # products first (precedence), each a step of its own
        i = ops.index("*")
        numbers[i: i + 2] = [record(f"{numbers[i]} * {numbers[i + 1]}", numbers[i] * numbers[i + 1])]
        del ops[i]
    value = numbers[0]
    for op, x in zip(ops, numbers[1:]):  # then left to right
        value = record(f"{value} {op} {x}", evaluate((value, x), (op,)))
    return steps, value


def format_reply(steps: list[Step], answer: int) -> str:
    """The reply's text: one line per step, then ``#### <answer>``."""
    return "\n".join([s.text for s in steps] + [f"{ANSWER_PREFIX}{answer}"])


def reference_reply(problem: Problem) -> str:
    """The correct scratchpad and answer of ``problem``."""
    return format_reply(*solve(problem))


def _slipped(problem: Problem, rng: random.Random) -> str:
    """A reply with one arithmetic slip in a random step (so a wrong final answer)."""
    step, delta = rng.randrange(len(solve(problem)[0])), rng.choice((-2, -1, 1, 2))
    steps, wrong = solve(problem, (step, delta))
    if wrong == problem.answer:  # a column worth 0 cannot go down (values stay >= 0): slip up instead
        steps, wrong = solve(problem, (step, abs(delta)))
    return format_reply(steps, wrong)


def generate_traces(n: int, seed: int = 0, difficulties=tuple(DIFFICULTIES), wrong_share: float = 0.2) -> list[dict]:
    """``n`` training records ``{"prompt", "response", "difficulty", "correct"}`` of train-split problems.

    A share ``wrong_share`` of them (exactly ``round(n * wrong_share)``, at seeded places) has one
    slipped step and a wrong answer, as a careless tutor writes: supervised training on them
    leaves the policy imperfect, with room for RL.
    """
    if not 0 <= wrong_share <= 1:
        raise ValueError(f"wrong_share must be in [0, 1], got {wrong_share}")
    problems = generate_problems(n, seed, difficulties, "train")
    rng = random.Random(seed + 7919)
    wrong = set(rng.sample(range(n), round(n * wrong_share)))
    return [{"prompt": p.prompt, "response": _slipped(p, rng) if i in wrong else reference_reply(p),
             "difficulty": p.difficulty, "correct": i not in wrong} for i, p in enumerate(problems)]


# ------------------------------------------------------------------ the verifier
MODES = ("strict", "lenient", "any")
_INT = r"-?[0-9]+"
_STRICT_RE = re.compile(r"#### (-?(?:0|[1-9][0-9]*))")
_NUMBER_RE = re.compile(r"(?<![0-9])" + _INT)
_STEP_RE = re.compile(r"(.+?)=\s*(" + _INT + r")")


def _to_int(text: str) -> int | None:
    """``int(text)``, or None when the number has more than :data:`MAX_DIGITS` digits."""
    return None if len(text.lstrip("-")) > MAX_DIGITS else int(text)


def _lines(reply: str) -> list[str]:
    """The reply's non-blank lines, each stripped of surrounding whitespace."""
    return [line.strip() for line in reply.splitlines() if line.strip()]


def extract_answer(reply: str, mode: str = "strict") -> int | None:
    """The final answer a reply gives, or None; ``mode`` "strict" or "lenient".

    strict: the last non-blank line (surrounding whitespace ignored) is exactly ``#### N``, one
    space, N an integer written canonically (an optional minus, no leading zeros, no ``+``, not
    ``-0``, ASCII digits, at most :data:`MAX_DIGITS` of them), and no other line holds ``####``.
    lenient: the last integer anywhere in the reply (leading zeros allowed), whatever the format.
    """
    if not isinstance(reply, str):
        raise ValueError(f"reply must be a string, got {type(reply).__name__}")
    if mode == "strict":
        lines = _lines(reply)
        if not lines or sum("####" in line for line in lines) != 1:
            return None
        m = _STRICT_RE.fullmatch(lines[-1])
        if m is None or m.group(1) == "-0":
            return None
        return _to_int(m.group(1))
    if mode == "lenient":
        numbers = _NUMBER_RE.findall(reply)
        return _to_int(numbers[-1]) if numbers else None
    raise ValueError(f"mode must be 'strict' or 'lenient' (or 'any' for verify), got {mode!r}")


def verify(reply: str, answer: int, mode: str = "strict") -> bool:
    """Whether ``reply`` answers ``answer``: :func:`extract_answer` in ``mode``, or "any": some integer in it equals it.

    "any" is the sloppiest verifier a reward can have: a policy that prints many numbers is
    rewarded whenever one of them is right (chapter 9 shows the exploit).
    """
    if mode == "any":
        if not isinstance(reply, str):
            raise ValueError(f"reply must be a string, got {type(reply).__name__}")
        return any(_to_int(x) == answer for x in _NUMBER_RE.findall(reply))
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    return extract_answer(reply, mode) == answer


def is_well_formed(reply: str) -> bool:
    """Whether the reply has the strict format (a final ``#### N`` line), right or wrong: the format reward."""
    return extract_answer(reply, "strict") is not None


@dataclass(frozen=True)
class StepCheck:
    """One scratchpad line checked on its own.

    ``is_step``: it reads ``expression = value`` (integers and + - *); ``correct``: and the
    arithmetic holds; ``on_path``: it is the reference solution's step at the same place
    (None without a problem); ``start``, ``end``: its characters in the reply (for per-token rewards).
    """

    text: str
    is_step: bool
    correct: bool
    on_path: bool | None
    start: int
    end: int


def check_steps(reply: str, problem: Problem | None = None) -> list[StepCheck]:
    """Every non-blank line of ``reply`` before its answer line (lines holding ``####`` are not steps), checked.

    A correct step may still be useless (``1 + 1 = 2``): ``on_path`` compares it with the
    reference scratchpad of ``problem``, which a process reward can require.
    """
    if not isinstance(reply, str):
        raise ValueError(f"reply must be a string, got {type(reply).__name__}")
    reference = [s.text for s in solve(problem)[0]] if problem is not None else None
    out, pos = [], 0
    for raw in reply.splitlines(keepends=True):
        line, start = raw.strip(), pos + len(raw) - len(raw.lstrip())
        pos += len(raw)
        if not line or "####" in line:
            continue
        m = _STEP_RE.fullmatch(line)
        parsed = _parse_expression(m.group(1)) if m else None
        value = _to_int(m.group(2)) if m else None
        is_step = parsed is not None and value is not None
        correct = is_step and evaluate(*parsed) == value
        on_path = None
        if reference is not None:
            k = len(out)
            canonical = f"{Problem(*parsed).text} = {value}" if is_step else None
            on_path = k < len(reference) and canonical == reference[k]
        out.append(StepCheck(line, is_step, correct, on_path, start, start + len(line)))
    return out


# ------------------------------------------------------------------ rewards
def _answer_of(prompt) -> int:
    """The answer to the problem a prompt asks, read from its text: a reward needs nothing but the prompt."""
    return parse_problem(prompt).answer


def make_reward_fn(mode: str = "strict", require_eos: bool | None = None):
    """A reward function ``(prompts, responses, terminated) -> (B,)``: 1.0 for a reply the verifier accepts, else 0.0.

    ``mode``: "strict", "lenient" or "any" (:func:`verify`, against the answer of the problem
    parsed from the prompt), or "format" (:func:`is_well_formed`: the format alone, right or
    wrong). ``require_eos``: a reply cut off before EOS scores 0 (default: True for "strict" and
    "format", False for the loose modes, which read whatever is there).
    """
    if mode not in (*MODES, "format"):
        raise ValueError(f"mode must be one of {[*MODES, 'format']}, got {mode!r}")
    eos = mode in ("strict", "format") if require_eos is None else bool(require_eos)
    if mode == "format":
        def check(prompt, reply) -> bool:
            return is_well_formed(reply)
    else:
        def check(prompt, reply) -> bool:
            return verify(reply, _answer_of(prompt), mode)
    check.__name__ = f"arithmetic_{mode}_verifier"
    return reward_fn_from_verifier(check, name=f"{mode}_reward", require_eos=eos)


def process_steps(prompt, reply: str, terminated: bool = True) -> list[tuple[int, float]]:
    """Process rewards of a reply: ``[(char_end, reward), ...]``, one per scratchpad line, then one for the answer.

    With n the reference scratchpad's steps, a line earns 1/(n+1) where it is the reference's step at
    its place (:func:`check_steps`: right *and* on the path; a true but useless ``1 + 1 = 2`` earns
    0), and the answer line earns 1/(n+1) when the strict verifier accepts the reply (and it ended):
    a correct reply's steps sum to 1, the outcome reward's value, spread over where it was earned.
    """
    problem = parse_problem(prompt)
    w = 1.0 / (len(solve(problem)[0]) + 1)
    out = [(c.end, w if c.on_path else 0.0) for c in check_steps(reply, problem)]
    right = bool(terminated) and verify(reply, problem.answer, "strict")
    return [*out, (len(reply), w if right else 0.0)]


strict_reward = make_reward_fn("strict")  # [reward] source = "rlhf_book.worlds.arithmetic:strict_reward"
lenient_reward = make_reward_fn("lenient")
any_number_reward = make_reward_fn("any")
format_reward = make_reward_fn("format")
process_reward = StepReward(process_steps, name="process_reward")  # per-step rewards (chapter 9, section 9.6)


# ------------------------------------------------------------------ the tokenizer and the build
def train_digit_tokenizer(texts, vocab_size: int = 320):
    """Byte-level BPE on ``texts`` whose merges never join digits (each digit one token); PAD (0) != EOS (1).

    Digits that merge ("12" as one token) would make a small model learn every pair of digits
    as a fact; kept apart, column arithmetic is the same few steps at every place.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    fast.padding_side = "left"
    return fast


_CPU_MODEL = Preset(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab_size=320, steps=1500, batch_size=64, lr=3e-3,
                    warmup=30, eval_every=250, checkpoint_every=100)


@dataclass(frozen=True)
class ArithmeticPreset(Config):
    """The arithmetic world's policy: the GPT (architecture and steps) and the traces it learns from."""

    model: Preset = option(_CPU_MODEL, "architecture and training recipe (rlhf_book.base_model.Preset); "  # noqa: RUF009
                                       "it trains on model.steps * model.batch_size fresh traces")
    difficulties: tuple = option(TRAINED, "names of DIFFICULTIES the traces mix, in equal shares")
    wrong_share: float = option(0.2, "share of traces with one slipped step and a wrong answer", "[0, 1]")
    n_val: int = option(256, "held-out traces (correct ones) for the validation loss", ">= 1")
    seed: int = option(0, "seeds the traces and the initialisation")

    def check(self) -> None:
        _check_names(self.difficulties)


PRESETS: dict[str, ArithmeticPreset] = {
    # tests: seconds; writes the format, rarely the right answer
    "tiny": ArithmeticPreset(Preset(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=320, steps=40,
                                    batch_size=16, lr=5e-3, warmup=5, eval_every=20, checkpoint_every=10)),
    # the chapter's: 0.44M parameters, about 4.5 minutes of one CPU thread (module docstring)
    "cpu": ArithmeticPreset(_CPU_MODEL),
}


def _preset(preset) -> ArithmeticPreset:
    if isinstance(preset, ArithmeticPreset):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return PRESETS[preset]
    raise ValueError(f"arithmetic preset must be one of {', '.join(map(repr, PRESETS))} or an ArithmeticPreset, "
                     f"got {preset!r}")


def policy_key(preset: str | ArithmeticPreset = "cpu", label: str | None = None) -> str:
    """Cache key of the arithmetic policy: the whole recipe and the world's version (any change makes a new one)."""
    recipe = _preset(preset)
    label = label or (preset if isinstance(preset, str) else "custom")
    key = {"recipe": asdict(recipe), "world": WORLD_VERSION}
    if prompt_format_tag() is not None:  # set_prompt_format changes the training text
        key["prompt_format"] = prompt_format_tag()
    return artifact_key("arithmetic", label, key)


def policy_path(preset: str = "cpu") -> Path:
    """Where the cached policy of ``preset`` lives (it may not be built yet)."""
    return cache_dir() / policy_key(preset)


def _tokenizer(workdir: Path, texts: list[str], vocab_size: int, n_positions: int):
    """The build's tokenizer: resumed from ``workdir/tokenizer`` if a killed build saved it whole, else trained."""
    tok_dir = workdir / "tokenizer"
    if tok_dir.exists():
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(tok_dir)
        except Exception:  # noqa: BLE001  (cut off by a kill, whatever the error: train again, deterministic)
            shutil.rmtree(tok_dir, ignore_errors=True)
    tok = train_digit_tokenizer(texts, vocab_size)
    tmp = workdir / "tokenizer.tmp"  # written whole, then renamed: "tokenizer/" exists only when complete
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(tok, tmp, n_positions)
    os.rename(tmp, tok_dir)
    return tok


def _tokenizer_texts(seed: int) -> list[str]:
    """What every preset's tokenizer learns from: traces of *all* difficulties, so a prompt is tokenized the same
    whichever difficulties the policy trained on."""
    return [format_prompt(r["prompt"]) + r["response"] for r in generate_traces(20_000, seed + 31, tuple(DIFFICULTIES))]


def _finished(workdir: Path) -> dict | None:
    """The metadata of a build that saved everything but was killed before the cache marker, else None."""
    try:
        meta = json.loads((workdir / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in meta.items() if k != "history"}


def build_policy(preset: str | ArithmeticPreset, workdir: Path, device=None, progress: bool = True) -> dict:
    """Train the policy of ``preset`` on fresh traces into ``workdir`` (resuming a killed build); returns metadata.

    The same chain as the reviews world's base LM: the tokenizer directory appears only when
    complete, the trainer checkpoints into ``workdir`` and resumes, and ``metadata.json`` is
    written last (its presence means the model is saved, so a finished build is not repeated).
    """
    recipe, name = _preset(preset), preset if isinstance(preset, str) else None
    device = torch.device(device) if device is not None else get_device()
    workdir = Path(workdir)
    done = _finished(workdir)
    if done is not None:
        return done
    m = recipe.model
    traces = generate_traces(m.steps * m.batch_size, recipe.seed, recipe.difficulties, recipe.wrong_share)
    val = [{"prompt": p.prompt, "response": reference_reply(p)}
           for p in generate_problems(recipe.n_val, recipe.seed + 1, recipe.difficulties, "eval")]
    t0 = time.time()
    tok = _tokenizer(workdir, _tokenizer_texts(recipe.seed), m.vocab_size, m.n_positions)
    model, tok, history = train_base_model([{"prompt": r["prompt"], "response": r["response"]} for r in traces], m,
                                           tokenizer=tok, device=device, progress=progress, checkpoint_dir=workdir,
                                           val_texts=val, seed=recipe.seed)
    save_model(model, tok, workdir, title="rlhf_book arithmetic policy" + (f", preset {name!r}" if name else ""),
               description=(f"A GPT-2 ({m.n_layer} layers x {m.n_embd}, context {m.n_positions}) trained from scratch "
                            f"on scratchpad traces of arithmetic problems ({', '.join(recipe.difficulties)}; "
                            f"{recipe.wrong_share:.0%} of them wrong): the base policy of chapter 9."))
    shutil.rmtree(workdir / "tokenizer", ignore_errors=True)
    meta = {"preset": asdict(recipe), "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tok), "final_val_loss": [r for r in history if "val_loss" in r][-1]["val_loss"],
            "train_seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(), "device": str(device),
            "history": history, "world_version": WORLD_VERSION}
    tmp = workdir / "metadata.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, workdir / "metadata.json")  # last: its presence means the model and tokenizer are saved
    (workdir / "train_state.pt").unlink(missing_ok=True)
    return {k: v for k, v in meta.items() if k != "history"}


def build(preset: str = "cpu", device=None, progress: bool = True) -> dict:
    """Build (once) and cache everything the world needs; ``{"policy": path}``."""
    key = policy_key(preset)
    path = cached_artifact(key, lambda d: build_policy(preset, d, device, progress))
    return {"policy": path}


def load_policy(preset: str = "cpu", device=None, progress: bool = True, dtype="auto"):
    """``(model, tokenizer)`` of the arithmetic policy of ``preset``, built and cached on first use; eval mode."""
    path = build(preset, device, progress)["policy"]
    return load_base_model(str(path), device=device, progress=progress, dtype=dtype)


def policy_metadata(preset: str = "cpu") -> dict:
    """Training record of a built preset (parameters, loss history, seconds); builds it if needed."""
    return json.loads((build(preset, "cpu", progress=False)["policy"] / "metadata.json").read_text())


def prompts(split: str = "train", n: int | None = None, seed: int = 0, difficulties=TRAINED) -> list[str]:
    """Prompts of ``split``: "train" (``n``, default 2048, train-split problems) or "eval" (held out; ``n``, default 64).

    Difficulties take turns (default: the ones the presets train on). For a held-out set per
    difficulty use :func:`heldout_sets`.
    """
    if split == "train":
        return [p.prompt for p in generate_problems(2048 if n is None else n, seed + 104_729, difficulties)]
    if split == "eval":
        n = 64 if n is None else n
        names = _check_names(difficulties)
        sets = [heldout_problems(name, -(-n // len(names)), seed) for name in names]
        mixed = [s[i].prompt for i in range(max(map(len, sets))) for s in sets if i < len(s)]
        return mixed[:n]
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


_REWARDS = {"strict": strict_reward, "lenient": lenient_reward, "any": any_number_reward, "format": format_reward,
            "process": process_reward}


def reward_fn(preset: str | None = None, kind: str = "strict", device=None, progress: bool = True):
    """The world's reward ``kind`` ("strict", "lenient", "any", "format", "process"); the same for every preset."""
    if kind not in _REWARDS:
        raise ValueError(f"the arithmetic world's rewards are {list(_REWARDS)}, got {kind!r}")
    return _REWARDS[kind]


@torch.no_grad()
def accuracy(model, tokenizer, problems, mode: str = "strict", samples: int = 1, greedy: bool = True,
             temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 0) -> float:
    """Share of replies that ``verify`` accepts: greedy (one per problem) or ``samples`` sampled per problem."""
    from ..rollout import generate

    texts = [p.prompt if isinstance(p, Problem) else p for p in problems]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    ro = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                  generator=gen, samples_per_prompt=1 if greedy else samples)
    k = 1 if greedy else samples
    ok = [verify(r, _answer_of(texts[i // k]), mode) and (bool(t) or mode not in ("strict",))
          for i, (r, t) in enumerate(zip(ro.responses, ro.terminated.tolist()))]
    return sum(ok) / len(ok)


WORLD = World(
    name="arithmetic",
    description="arithmetic problems with a checkable scratchpad and a final '#### N' answer (chapter 9, RLVR)",
    presets=tuple(PRESETS), rewards=tuple(_REWARDS), build=build, load_policy=load_policy, prompts=prompts,
    reward_fn=reward_fn, gold_fn=strict_reward, modules=("rlhf_book.worlds.arithmetic",),
)
