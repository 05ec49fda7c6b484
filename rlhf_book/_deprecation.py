"""The one way a public name or signature is retired: it keeps working, with a warning, for one minor version."""

from __future__ import annotations

import functools
import warnings
from typing import Callable


def warn_deprecated(old: str, new: str, since: str) -> None:
    """Warn once per call site that ``old`` is deprecated since version ``since`` in favour of ``new``."""
    warnings.warn(f"{old} is deprecated since {since} and will be removed in the next minor version: use {new} "
                  f"instead (CHANGELOG.md says how to migrate)", DeprecationWarning, stacklevel=3)


def deprecated_alias(fn: Callable, old: str, new: str, since: str) -> Callable:
    """``fn`` under its retired name ``old``: same behaviour, plus a :class:`DeprecationWarning` naming ``new``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warn_deprecated(old, new, since)
        return fn(*args, **kwargs)

    return wrapper
