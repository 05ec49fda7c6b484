"""Coursework with automatic checks.

Each chapter has a module ``rlhf_book.exercises.chNN`` whose ``EXERCISES`` dict maps
the name of something the learner writes (a function, or an answer variable) to a
``check_*`` function. A check compares the learner's object with the library's
reference (on fresh random inputs for a function), prints one clear line and returns
``True``/``False``; it never raises, so a notebook with an unfinished exercise still
runs to the end.

What a check prints depends on how far the learner has got:

* **no answer yet** (``None``, ``...``, a blank string, or the untouched stub that
  raises ``NotImplementedError``): ``name: not answered yet`` and nothing else.
  No hint is given before a first attempt, and this does not count as one.
* **a wrong answer**: ``[FAIL] name: what was wrong`` and a hint. The checks count the
  wrong attempts of each exercise (by its name; a suffix in parentheses such as
  ``"kl_k3 (precision)"`` counts for ``kl_k3``). The first wrong attempt shows the first,
  gentle hint, which never gives the answer away; the second and later ones show the
  second, stronger hint. A check's ``hint`` is a string (the same hint every time) or a
  pair ``(first hint, stronger hint)``.
* **a right answer**: ``[PASS] name``.

Running a check cell again with the same wrong answer counts as another attempt, so the
stronger hint is one re-run away. ``reset_attempts()`` forgets the counts (the tests
call it so that their order does not matter).

In a notebook::

    def trajectory_logprob(token_logprobs, mask):
        ...  # your code
    check_trajectory_logprob(trajectory_logprob)

Reference solutions live apart, in ``solutions/chNN.py`` at the repository root.
The test suite runs every check against the solutions (must pass) and against the
stubs in the notebooks (must fail).

**Coursework metadata.** Each check is declared with :func:`exercise`, which gives the exercise its points,
difficulty, expected minutes and kind, once, next to the check::

    @exercise("trajectory_logprob", points=3, difficulty="medium", minutes=15, kind="code")
    def check_trajectory_logprob(fn) -> bool: ...

The first line a check prints carries them (``trajectory_logprob (3 points · medium · ~15 min · code): ...``),
so the student sees them in the chapter. A module may also define ``hidden_check_<name>(answer, seed, ns)``:
the grader (:mod:`rlhf_book.grade`) calls it on instructor-only inputs drawn from its grading seed (``ns`` is
the notebook's namespace, for exercises that are experiments). When ``$RLHF_BOOK_GRADING`` names a file, every
check appends one JSON line to it (exercise, status, hint level, what it printed).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Sequence, Union

import torch

__all__ = ["report", "check_function", "check_value", "check_numbers", "check_matching", "not_answered",
           "reset_attempts", "attempts", "NOT_ANSWERED", "Exercise", "exercise", "outcome", "hidden_function_check",
           "hidden_experiment_check", "DIFFICULTIES", "KINDS"]

PASS, FAIL = "PASS", "FAIL"
NOT_ANSWERED = "not answered yet"

Hint = Union[str, Sequence[str]]

_ATTEMPTS: dict[str, int] = {}  # exercise name -> wrong attempts so far (this Python session)

DIFFICULTIES = ("easy", "medium", "hard")
KINDS = ("code", "numeric", "multiple choice", "matching", "ordering", "diagnosis", "experiment")


@dataclasses.dataclass(frozen=True)
class Exercise:
    """What an instructor (and a student) needs to know about one exercise, besides its check."""

    name: str  # the name the learner defines in the notebook (a function or an answer variable)
    points: int
    difficulty: str  # one of DIFFICULTIES
    minutes: int  # expected time for a student who has read the chapter
    kind: str  # one of KINDS
    chapter: str = ""  # "ch01", ... (filled in from the check's module)

    def __post_init__(self):
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"{self.name}: difficulty {self.difficulty!r} is not one of {DIFFICULTIES}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.points < 1 or self.minutes < 1:
            raise ValueError(f"{self.name}: points and minutes must be positive")

    def label(self) -> str:
        """``3 points · medium · ~15 min · code``: shown on the first line a check prints."""
        points = f"{self.points} point{'s' if self.points != 1 else ''}"
        return f"{points} · {self.difficulty} · ~{self.minutes} min · {self.kind}"


# the check being run: its Exercise, whether its label was printed yet, and what it reported
_CURRENT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rlhf_book_exercise", default=None)
_QUIET_LOG: contextvars.ContextVar[bool] = contextvars.ContextVar("rlhf_book_quiet_log", default=False)


def _shown(name: str) -> str:
    """``name``, followed by the exercise's label on the first line a declared check prints."""
    current = _CURRENT.get()
    if current is None or current["labelled"]:
        return name
    current["labelled"] = True
    return f"{name} ({current['exercise'].label()})"


def _record(name: str, status: str, detail: str, text: str) -> None:
    current = _CURRENT.get()
    if current is not None:
        current["events"].append({"name": name, "status": status, "detail": detail, "text": text,
                                  "attempts": attempts(name)})


def outcome(events: list[dict], ok: bool) -> tuple[str, int]:
    """(status, hint level) of a check from what it reported: status is "correct", "wrong", "raised" (the
    learner's code raised) or "not answered"; the hint level is what the learner saw (0 none, 1 first, 2 stronger)."""
    if ok:
        return "correct", 0
    failed = [e for e in events if e["status"] != "not answered"]
    if not failed:
        return "not answered", 0
    level = max(min(e["attempts"], 2) for e in failed)
    if any(e["detail"].startswith("raised ") for e in failed):
        return "raised", level
    return "wrong", level


def exercise(name: str, *, points: int, difficulty: str, minutes: int, kind: str) -> Callable:
    """Declare the check of exercise ``name`` with its coursework metadata (see the module docstring).

    The decorated check behaves as before (prints its lines, returns True/False, never raises); its first line
    carries the label, ``check.exercise`` is the :class:`Exercise` and ``check.last_events`` what it reported.
    """
    def wrap(check: Callable) -> Callable:
        chapter = check.__module__.rsplit(".", 1)[-1]
        meta = Exercise(name, points, difficulty, minutes, kind, chapter if re.fullmatch(r"ch\d\d", chapter) else "")

        @functools.wraps(check)
        def run(answer: Any) -> bool:
            current = {"exercise": meta, "labelled": False, "events": []}
            token = _CURRENT.set(current)
            try:
                ok = bool(check(answer))
            finally:
                _CURRENT.reset(token)
            run.last_events = current["events"]
            log = os.environ.get("RLHF_BOOK_GRADING")
            if log and not _QUIET_LOG.get():
                status, level = outcome(current["events"], ok)
                line = {"phase": "notebook", "chapter": meta.chapter, "exercise": name, "status": status,
                        "hint_level": level, "output": "\n".join(e["text"] for e in current["events"])}
                try:
                    with open(log, "a", encoding="utf-8") as f:
                        f.write(json.dumps(line) + "\n")
                except OSError:  # grading must not break a student's notebook
                    pass
            return ok

        run.exercise = meta
        run.last_events = []
        return run

    return wrap


def _exercise(name: str) -> str:
    """The exercise a reported name belongs to: ``"kl_k3 (precision)"`` -> ``"kl_k3"``."""
    return re.sub(r"\s*\(.*\)\s*$", "", name).strip()


def attempts(name: str) -> int:
    """How many wrong attempts the exercise ``name`` has had since the last ``reset_attempts``."""
    return _ATTEMPTS.get(_exercise(name), 0)


def reset_attempts(name: str | None = None) -> None:
    """Forget the wrong attempts of exercise ``name`` (of every exercise when ``name`` is None)."""
    if name is None:
        _ATTEMPTS.clear()
    else:
        _ATTEMPTS.pop(_exercise(name), None)


def _hints(hint: Hint) -> tuple[str, str]:
    """(first hint, stronger hint) from a string (used twice) or a sequence of one or two strings."""
    if isinstance(hint, str):
        return hint, hint
    hint = [h for h in hint if h]
    if not hint:
        return "", ""
    return hint[0], hint[min(1, len(hint) - 1)]


def not_answered(name: str) -> bool:
    """Print ``name: not answered yet`` (no FAIL, no hint, not counted as an attempt) and return False.

    A chapter executed without answers (the built book) then shows one quiet line per exercise.
    """
    text = f"{_shown(name)}: {NOT_ANSWERED}"
    _record(name, "not answered", NOT_ANSWERED, text)
    print(text)
    return False


def _is_unanswered(answer: Any) -> bool:
    return answer is None or answer is ... or (isinstance(answer, str) and not answer.strip())


def report(name: str, ok: bool, detail: str = "", hint: Hint = "") -> bool:
    """Print one line for an exercise (and, after a wrong answer, a hint) and return ``ok``.

    A wrong answer counts as an attempt of the exercise: the first one shows the first hint, later ones the
    stronger hint (``hint`` is a string or a pair of strings). ``detail == NOT_ANSWERED`` prints no hint.
    """
    if ok:
        text = f"[{PASS}] {_shown(name)}" + (f": {detail}" if detail else "")
        _record(name, "correct", detail, text)
        print(text)
        return True
    if detail == NOT_ANSWERED:
        return not_answered(name)
    key = _exercise(name)
    _ATTEMPTS[key] = _ATTEMPTS.get(key, 0) + 1
    first, stronger = _hints(hint)
    msg = f"[{FAIL}] {_shown(name)}" + (f": {detail}" if detail else "")
    if _ATTEMPTS[key] == 1 or stronger == first:
        if first:
            msg += f"\n       hint: {first}"
    elif stronger:
        msg += f"\n       stronger hint: {stronger}"
    _record(name, "wrong", detail, msg)
    print(msg)
    return False


def _close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor):
            try:
                a = torch.as_tensor(a, dtype=b.dtype)
            except Exception:  # noqa: BLE001 (a string, a dict, ragged lists: a check never raises)
                return False
        return a.shape == b.shape and torch.allclose(a.to(b.dtype), b, atol=atol, rtol=rtol, equal_nan=False)
    if isinstance(b, (int, float)):
        try:
            return abs(float(a) - float(b)) <= atol + rtol * abs(float(b))
        except (TypeError, ValueError):
            return False
    return a == b


def check_function(
    name: str,
    learner: Callable,
    reference: Callable,
    make_inputs: Callable[[torch.Generator], tuple],
    hint: Hint = "",
    trials: int = 5,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> bool:
    """Compare ``learner(*inputs)`` with ``reference(*inputs)`` on ``trials`` random inputs."""
    if learner is None or learner is ...:
        return not_answered(name)
    if not callable(learner):
        return report(name, False, f"expected a function, got {type(learner).__name__}", hint)
    for trial in range(trials):
        g = torch.Generator().manual_seed(1000 + trial)
        inputs = make_inputs(g)
        expected = reference(*inputs)
        try:
            got = learner(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
        except NotImplementedError:  # the untouched stub: no hint before a first attempt
            return not_answered(name)
        except Exception as e:  # noqa: BLE001 (the learner's bug, shown rather than raised)
            return report(name, False, f"raised {type(e).__name__}: {e}", hint)
        if got is None:
            return report(name, False, "returned None", hint)
        if not _close(got, expected, atol, rtol):
            shape = f" (shape {tuple(got.shape)} vs {tuple(expected.shape)})" if isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor) else ""
            return report(name, False, f"wrong result on random input #{trial + 1}{shape}", hint)
    return report(name, True, f"matches the reference on {trials} random inputs")


def check_value(name: str, answer: Any, expected: Any, hint: Hint = "", atol: float = 1e-3) -> bool:
    """Check a numeric or multiple-choice answer (a letter, any case, surrounding spaces ignored)."""
    if _is_unanswered(answer):  # no hint before a first attempt
        return not_answered(name)
    if isinstance(expected, str):
        ok = isinstance(answer, str) and answer.strip().upper() == expected.upper()
    else:
        ok = _close(answer, expected, atol, 0.0)
    return report(name, ok, "" if ok else f"{answer!r} is not right", hint)


def check_numbers(name: str, answer: Any, expected: torch.Tensor, what: str, hint: Hint = "", atol: float = 1e-3) -> bool:
    """Check an answer that is a list of numbers against ``expected`` (1-D); ``what`` says which numbers, in order."""
    if _is_unanswered(answer):  # no hint before a first attempt
        return not_answered(name)
    try:
        got = torch.as_tensor(answer, dtype=torch.float64).flatten()
    except Exception:  # noqa: BLE001 (a string, a dict, ragged lists: a check never raises)
        return report(name, False, f"expected {expected.numel()} numbers, got {answer!r}", hint)
    if got.numel() != expected.numel():
        return report(name, False, f"expected {expected.numel()} numbers ({what}), got {got.numel()}", hint)
    ok = torch.allclose(got, expected.to(torch.float64).flatten(), atol=atol, rtol=0.0)
    return report(name, ok, "" if ok else f"{answer!r} is not right", hint)


def check_matching(name: str, answer: Any, expected: dict[str, str], hint: Hint = "") -> bool:
    """Check a matching answer: a dict from each item (the keys of ``expected``) to a letter (any case)."""
    if _is_unanswered(answer):  # no hint before a first attempt
        return not_answered(name)
    example = ", ".join(f"{k!r}: 'a'" for k in list(expected)[:2])
    if not isinstance(answer, dict) or set(answer) != set(expected):
        return report(name, False, f"expected a dict with the keys {sorted(expected)}, got {answer!r}",
                      f"one letter per item, e.g. {{{example}, ...}}")
    wrong = sorted(k for k, v in answer.items() if str(v).strip().lower() != expected[k].lower())
    detail = "" if not wrong else f"{len(wrong)} of {len(expected)} not right"
    return report(name, not wrong, detail, hint)


def hidden_function_check(learner: Callable, reference: Callable, make_inputs: Callable[[torch.Generator], tuple],
                          seed: int, trials: int = 5, atol: float = 1e-5, rtol: float = 1e-5) -> tuple[bool, str]:
    """The grader's check of a function exercise: ``learner`` against ``reference`` on ``trials`` inputs drawn from
    the grading ``seed`` (never the visible check's seeds 1000-1004). Prints nothing; returns (ok, detail), the detail
    saying what failed without showing the inputs."""
    if not callable(learner):
        return False, f"expected a function, got {type(learner).__name__}"
    for trial in range(trials):
        s = (int(seed) * 7919 + 104729 * (trial + 1)) % (2**31 - 1)
        s = s + 5000 if 1000 <= s < 1005 else s
        inputs = make_inputs(torch.Generator().manual_seed(s))
        expected = reference(*inputs)
        try:
            got = learner(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
        except Exception as e:  # noqa: BLE001 (the learner's bug)
            return False, f"raised {type(e).__name__} on hidden input #{trial + 1}"
        if got is None or not _close(got, expected, atol, rtol):
            return False, (f"wrong result on hidden input #{trial + 1} (the visible inputs pass: is something "
                           "hard-coded?)")
    return True, f"matches the reference on {trials} hidden inputs"


def hidden_experiment_check(answer: Any, ns: dict | None, key: str, cell: str, prerequisites: Callable[[dict, Any], str],
                            read: Callable[[Any], tuple[str | None, str]], what: str) -> tuple[bool, str]:
    """The grader's check of an experiment exercise, against the student's own runs in their notebook.

    ``ns[key]``: the runs (a non-empty dict, else "run its cell"); ``prerequisites(ns, runs)``: what is
    wrong with how they were run ("" when nothing is: the asked setting, three seeds); ``read(runs)``:
    the letter the runs show (None when they show no clear reading) and a summary of them. The answer
    passes only when it is the letter the student's own runs show.
    """
    runs = (ns or {}).get(key)
    if not isinstance(runs, dict) or not runs:
        return False, f"the experiment's {cell} ({key}) are not in the notebook: run its cell"
    try:
        wrong = prerequisites(ns, runs)
        if wrong:
            return False, wrong
        shown, summary = read(runs)
    except (TypeError, KeyError, ValueError, AttributeError):
        return False, f"the experiment's {cell} ({key}) cannot be read: rerun its whole cell"
    if shown is None or str(answer).strip().upper() != shown:
        return False, f"your {what} ({summary}) do not show your answer"
    return True, f"consistent with your {what} ({summary})"
