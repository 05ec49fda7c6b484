"""Claims: the numbers and comparisons a chapter's prose states, asserted against the values it computed.

A chapter that says "held-out accuracy reaches 0.785" or "RLOO is ahead of GRPO by more than the
spread of the seeds" follows the sentence with a hidden cell (tagged ``claims``; the site drops it)
that checks it against the values computed above::

    claims = Claims("6.5")
    claims.number("held-out accuracy reaches 0.785", accuracy, "0.785")
    claims.ahead("RLOO ends ahead of GRPO by more than the spread", rloo_seeds, grpo_seeds)
    claims.tie("PPO and DPO are level within 2 nats", ppo_seeds, dpo_seeds)
    claims.done()

Each method raises :class:`ClaimError` (an ``AssertionError``, so nbval fails the cell) quoting the
sentence, what it states and what was computed, so a rerun whose numbers drift from the text fails CI
instead of leaving a contradiction on the page. ``done()`` prints one line without numbers (the cell's
output stays the same when the numbers move a little within their rounding). For an author rewriting
a section after a rerun, ``RLHF_BOOK_CLAIMS=all`` in the environment lists every false claim of a
cell at ``done()`` instead of stopping at the first.

How a number matches: it is written as a string, as in the prose (``"0.785"``, ``"-0.38"``, ``"24"``),
and matches a computed value that rounds to it at the precision written (``"0.785"``: within 0.0005;
``"24"``: within 0.5), or within ``tol`` when given (for "about 20 s"-style statements).
Comparisons over seeds take the per-seed values (any sequence of floats) and compare their ranges:
:meth:`Claims.ahead` needs the worst of one above the best of the other; :meth:`Claims.tie` needs the
ranges to overlap (a difference within the spread is called a tie, never a lead).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["ClaimError", "Claims", "matches"]


class ClaimError(AssertionError):
    """A sentence of the text that the computed values contradict."""


def _decimals(stated: str) -> int:
    """Digits after the decimal point of a number as written ("0.785" -> 3, "24" -> 0, "1e-3" -> 3)."""
    s = stated.strip().lstrip("+-")
    if "e" in s.lower():
        mantissa, exp = s.lower().split("e")
        return max(0, _decimals(mantissa) - int(exp))
    return len(s.split(".")[1]) if "." in s else 0


def _float(value) -> float:
    """A Python float of a number, a NumPy scalar or a one-element tensor (detached: no autograd warning)."""
    return float(value.detach()) if hasattr(value, "detach") else float(value)


def matches(value: float, stated: str, tol: float | None = None) -> bool:
    """Whether ``value`` reads as ``stated``: |value - stated| <= tol, or half a unit of its last written digit."""
    value, target = _float(value), float(stated)
    tol = 0.5 * 10 ** -_decimals(stated) + 1e-9 if tol is None else tol
    return abs(value - target) <= tol


def _span(values: Sequence[float]) -> tuple[float, float]:
    vals = [_float(v) for v in values]
    if not vals:
        raise ValueError("a comparison over seeds needs at least one value per arm, got none")
    return min(vals), max(vals)


class Claims:
    """The claims of one section (``where``: e.g. "6.5"), checked as they are stated; ``done()`` reports them."""

    def __init__(self, where: str):
        self.where = where
        self.checked = 0
        self.failures: list[str] = []  # with RLHF_BOOK_CLAIMS=all: every false claim, raised together by done()

    def _fail(self, sentence: str, why: str) -> None:
        message = f"section {self.where}: the text says \"{sentence}\", but {why}"
        if os.environ.get("RLHF_BOOK_CLAIMS") != "all":
            raise ClaimError(message)
        self.failures.append(message)

    def _ok(self) -> None:
        self.checked += 1

    def number(self, sentence: str, value: float, stated: str, tol: float | None = None) -> None:
        """The prose states ``stated`` (a string, as written) for a computed ``value``."""
        if not matches(value, stated, tol):
            within = f"within {tol:g}" if tol is not None else "at the precision written"
            self._fail(sentence, f"the computed value is {_float(value):.6g}, which does not read as {stated} ({within})")
        self._ok()

    def numbers(self, sentence: str, values: Sequence[float], stated: Sequence[str], tol: float | None = None) -> None:
        """Several numbers of one sentence, in order (e.g. a range "0.26-0.47": ``[lo, hi]``, ``["0.26", "0.47"]``)."""
        if len(values) != len(stated):
            raise ValueError(f"{len(values)} values for {len(stated)} stated numbers")
        for v, s in zip(values, stated):
            if not matches(v, s, tol):
                self._fail(sentence, f"the computed value {_float(v):.6g} does not read as {s}")
        self._ok()

    def between(self, sentence: str, value: float, low: float, high: float) -> None:
        """A computed value the prose puts in [low, high] ("about 1 nat", "under 2 nats": pass the bounds meant)."""
        if not low <= _float(value) <= high:
            self._fail(sentence, f"the computed value is {_float(value):.6g}, outside [{low:g}, {high:g}]")
        self._ok()

    def holds(self, sentence: str, condition: bool, computed: str = "") -> None:
        """Any other statement, as a condition on computed values (``computed``: what to print if it fails)."""
        if not bool(condition):
            self._fail(sentence, f"it does not hold{': ' + computed if computed else ''}")
        self._ok()

    def greater(self, sentence: str, a: float, b: float, margin: float = 0.0) -> None:
        """One computed value above another by more than ``margin`` (a single run, or two means)."""
        if not _float(a) > _float(b) + margin:
            self._fail(sentence, f"{_float(a):.6g} is not above {_float(b):.6g}" + (f" by {margin:g}" if margin else ""))
        self._ok()

    def ahead(self, sentence: str, a: Sequence[float], b: Sequence[float]) -> None:
        """Arm ``a`` ahead of arm ``b`` by more than the spread: every seed of ``a`` above every seed of ``b``."""
        (alo, ahi), (blo, bhi) = _span(a), _span(b)
        if not alo > bhi:
            self._fail(sentence, f"the ranges over seeds overlap: [{alo:.4g}, {ahi:.4g}] against [{blo:.4g}, {bhi:.4g}]")
        self._ok()

    def tie(self, sentence: str, a: Sequence[float], b: Sequence[float]) -> None:
        """Two arms level within the spread: their ranges over seeds overlap."""
        (alo, ahi), (blo, bhi) = _span(a), _span(b)
        if alo > bhi or blo > ahi:
            self._fail(sentence, f"the ranges over seeds do not overlap: [{alo:.4g}, {ahi:.4g}] against "
                                 f"[{blo:.4g}, {bhi:.4g}]")
        self._ok()

    def done(self) -> None:
        """Print the one-line report (no numbers, so the output is stable); ClaimError listing the false claims
        collected under ``RLHF_BOOK_CLAIMS=all``."""
        if self.failures:
            raise ClaimError(f"{len(self.failures)} claims of the text are false:\n" + "\n".join(self.failures))
        n = self.checked
        print(f"section {self.where}: {n} claim{'s' if n != 1 else ''} of the text hold{'s' if n == 1 else ''}")
