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
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

import torch

__all__ = ["report", "check_function", "check_value", "check_numbers", "check_matching", "not_answered",
           "reset_attempts", "attempts", "NOT_ANSWERED"]

PASS, FAIL = "PASS", "FAIL"
NOT_ANSWERED = "not answered yet"

Hint = Union[str, Sequence[str]]

_ATTEMPTS: dict[str, int] = {}  # exercise name -> wrong attempts so far (this Python session)


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
    print(f"{name}: {NOT_ANSWERED}")
    return False


def _is_unanswered(answer: Any) -> bool:
    return answer is None or answer is ... or (isinstance(answer, str) and not answer.strip())


def report(name: str, ok: bool, detail: str = "", hint: Hint = "") -> bool:
    """Print one line for an exercise (and, after a wrong answer, a hint) and return ``ok``.

    A wrong answer counts as an attempt of the exercise: the first one shows the first hint, later ones the
    stronger hint (``hint`` is a string or a pair of strings). ``detail == NOT_ANSWERED`` prints no hint.
    """
    if ok:
        print(f"[{PASS}] {name}" + (f": {detail}" if detail else ""))
        return True
    if detail == NOT_ANSWERED:
        return not_answered(name)
    key = _exercise(name)
    _ATTEMPTS[key] = _ATTEMPTS.get(key, 0) + 1
    first, stronger = _hints(hint)
    msg = f"[{FAIL}] {name}" + (f": {detail}" if detail else "")
    if _ATTEMPTS[key] == 1 or stronger == first:
        if first:
            msg += f"\n       hint: {first}"
    elif stronger:
        msg += f"\n       stronger hint: {stronger}"
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
