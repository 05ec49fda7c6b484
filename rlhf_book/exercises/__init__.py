"""Coursework with automatic checks.

Each chapter has a module ``rlhf_book.exercises.chNN`` whose ``EXERCISES`` dict maps
the name of something the learner writes (a function, or an answer variable) to a
``check_*`` function. A check compares the learner's object with the library's
reference on fresh random inputs, prints one clear line (pass, or fail with a
hint) and returns ``True``/``False``; it never raises, so a notebook with an
unfinished exercise still runs to the end.

In a notebook::

    def trajectory_logprob(token_logprobs, mask):
        ...  # your code
    check_trajectory_logprob(trajectory_logprob)

Reference solutions live apart, in ``solutions/chNN.py`` at the repository root.
The test suite runs every check against the solutions (must pass) and against the
stubs in the notebooks (must fail).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["report", "check_function", "check_value"]

PASS, FAIL = "PASS", "FAIL"


def report(name: str, ok: bool, detail: str = "", hint: str = "") -> bool:
    """Print one line for an exercise and return ``ok``."""
    if ok:
        print(f"[{PASS}] {name}" + (f": {detail}" if detail else ""))
    else:
        msg = f"[{FAIL}] {name}" + (f": {detail}" if detail else "")
        if hint:
            msg += f"\n       hint: {hint}"
        print(msg)
    return ok


def _close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor):
            a = torch.as_tensor(a, dtype=b.dtype)
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
    hint: str = "",
    trials: int = 5,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> bool:
    """Compare ``learner(*inputs)`` with ``reference(*inputs)`` on ``trials`` random inputs."""
    if not callable(learner):
        return report(name, False, f"expected a function, got {type(learner).__name__}", hint)
    for trial in range(trials):
        g = torch.Generator().manual_seed(1000 + trial)
        inputs = make_inputs(g)
        expected = reference(*inputs)
        try:
            got = learner(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
        except NotImplementedError:  # the untouched stub: no hint before a first attempt
            return report(name, False, "not answered yet")
        except Exception as e:  # the learner's bug, shown rather than raised
            return report(name, False, f"raised {type(e).__name__}: {e}", hint)
        if got is None:
            return report(name, False, "returned None", hint)
        if not _close(got, expected, atol, rtol):
            shape = f" (shape {tuple(got.shape)} vs {tuple(expected.shape)})" if isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor) else ""
            return report(name, False, f"wrong result on random input #{trial + 1}{shape}", hint)
    return report(name, True, f"matches the reference on {trials} random inputs")


def check_value(name: str, answer: Any, expected: Any, hint: str = "", atol: float = 1e-3) -> bool:
    """Check a numeric or multiple-choice answer."""
    if answer is None or answer is ...:  # no hint before a first attempt
        return report(name, False, "not answered yet")
    if isinstance(expected, str):
        ok = isinstance(answer, str) and answer.strip().upper() == expected.upper()
    else:
        ok = _close(answer, expected, atol, 0.0)
    return report(name, ok, "" if ok else f"{answer!r} is not right", hint)


def check_numbers(name: str, answer: Any, expected: torch.Tensor, what: str, hint: str = "", atol: float = 1e-3) -> bool:
    """Check an answer that is a list of numbers against ``expected`` (1-D); ``what`` says which numbers, in order."""
    if answer is None or answer is ...:  # no hint before a first attempt
        return report(name, False, "not answered yet")
    try:
        got = torch.as_tensor(answer, dtype=torch.float64).flatten()
    except Exception:  # noqa: BLE001 (a string, a dict, ragged lists: a check never raises)
        return report(name, False, f"expected {expected.numel()} numbers, got {answer!r}", hint)
    if got.numel() != expected.numel():
        return report(name, False, f"expected {expected.numel()} numbers ({what}), got {got.numel()}", hint)
    ok = torch.allclose(got, expected.to(torch.float64).flatten(), atol=atol, rtol=0.0)
    return report(name, ok, "" if ok else f"{answer!r} is not right", hint)
