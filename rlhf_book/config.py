"""Configs: dataclasses whose fields carry their help text and valid range, declared once.

A field is declared with :func:`option` (TRL-style ``field(metadata=...)``)::

    lr: float = option(1e-4, "Adam learning rate of the policy", "> 0")

and everything else is read from that one declaration: :func:`check_config` (called by
every :class:`Config` on construction) checks the type from the annotation and the range
or choices from the metadata and names the field that is wrong; :func:`describe` lists the
fields for ``rlhf-book options``; :func:`config_from_dict` builds a config from a file's
table, naming an unknown key. A subclass that only wants another default writes
``lr: float = redefault(BaseConfig, "lr", 3e-4)``, keeping the help text and range.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import MISSING, field, fields

__all__ = ["Config", "option", "redefault", "check_config", "check_types", "describe", "config_from_dict",
           "config_changes", "RANGES"]

# the valid ranges a field may declare, each with its test
RANGES: dict[str, typing.Callable[[float], bool]] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "[0, 1]": lambda v: 0 <= v <= 1,
}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def option(default, help: str, range: str | None = None, choices: tuple | None = None):
    """A dataclass field with its ``help`` text and its valid values: a ``range`` of :data:`RANGES` or ``choices``."""
    if range is not None and range not in RANGES:
        raise ValueError(f"range must be one of {list(RANGES)}, got {range!r}")
    return field(default=default, metadata={"help": help, "range": range, "choices": choices})


def redefault(cls, name: str, default):
    """The field ``name`` of config class ``cls`` with another default (same help text and range)."""
    f = next((f for f in fields(cls) if f.name == name), None)
    if f is None:
        raise ValueError(f"{cls.__name__} has no field {name!r}")
    return field(default=default, metadata=f.metadata)


def _allowed(annotation) -> tuple[tuple[type, ...], bool]:
    """(the plain types a field declared as ``annotation`` takes, whether None is allowed)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (annotation,), False


def _fits(value, kinds: tuple[type, ...]) -> bool:
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is str and isinstance(value, str):
            return True
        if kind not in _TYPE_NAMES and isinstance(kind, type) and isinstance(value, kind):
            return True
    return False


def _expected(kinds, none_ok: bool = False) -> str:
    words = [_TYPE_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds]
    return " or ".join(words + (["None"] if none_ok else []))


def check_types(cfg) -> None:
    """Raise ValueError naming the first field of dataclass ``cfg`` whose value does not fit its declared type.

    The declarations are the rule: ``bool`` takes only True/False (so ``"no"`` is not
    silently truthy), ``int`` only integers (not 8.5, "8" or True), ``float`` any finite
    real number (not inf, NaN or "1e-4"), ``X | None`` also None.
    """
    name = type(cfg).__name__
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        kinds, none_ok = _allowed(hints[f.name])
        value = getattr(cfg, f.name)
        if value is None:
            if not none_ok:
                raise ValueError(f"{name}.{f.name} must not be None (expected {_expected(kinds)})")
            continue
        if not _fits(value, kinds):
            raise ValueError(f"{name}.{f.name} must be {_expected(kinds, none_ok)}, got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}.{f.name} must be a finite number, got {value!r}")


def check_config(cfg) -> None:
    """Raise ValueError naming the first field of ``cfg`` of the wrong type, outside its range or not one of its choices."""
    check_types(cfg)
    name, hints = type(cfg).__name__, typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        rng, choices = f.metadata.get("range"), f.metadata.get("choices")
        if rng is not None and not RANGES[rng](value):
            or_none = " or None" if _allowed(hints[f.name])[1] else ""
            raise ValueError(f"{name}.{f.name} must be {rng}{or_none}, got {value!r}")
        if choices is not None and value not in choices:
            raise ValueError(f"{name}.{f.name} must be one of {list(choices)}, got {value!r}")


class Config:
    """Base of the book's config dataclasses: checked on construction; ``check()`` adds cross-field rules."""

    def __post_init__(self):
        check_config(self)
        self.check()

    def check(self) -> None:
        """Rules between fields (a subclass raises ValueError naming them)."""

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a dict (e.g. a config file's table), naming any unknown key."""
        return config_from_dict(cls, d)


def describe(cls) -> list[dict]:
    """One dict per field of config class ``cls``: name, type, default, help, range (or choices)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        kinds, none_ok = _allowed(hints[f.name])
        default = f.default if f.default is not MISSING else None
        valid = f.metadata.get("range") or (
            " | ".join(map(repr, f.metadata["choices"])) if f.metadata.get("choices") else "")
        out.append({"name": f.name, "type": _expected(kinds, none_ok), "default": default,
                    "help": f.metadata.get("help", ""), "valid": valid})
    return out


def config_from_dict(cls, d: dict):
    """``cls(**d)`` for a config dataclass, naming any unknown key (with the closest known one)."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        hints = [f"{u!r} -> {m[0]!r}" for u in unknown if (m := difflib.get_close_matches(u, known, n=1))]
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}"
                         + (f"; did you mean {', '.join(hints)}?" if hints else f"; known: {sorted(known)}"))
    return cls(**d)


def config_changes(saved: dict, current: dict, allowed=frozenset(), defaults: dict | None = None) -> list[str]:
    """``"field: old -> new"`` for every field (outside ``allowed``) whose value differs between two config dicts.

    ``defaults``: a field absent from ``saved`` (added by a later version) counts as its default there.
    """
    keys = sorted((set(saved) | set(current)) - set(allowed))
    missing = object()
    saved = {**{k: v for k, v in (defaults or {}).items() if k in current}, **saved}
    return [f"{k}: {saved.get(k, missing)!r} -> {current.get(k, missing)!r}".replace(repr(missing), "(absent)")
            for k in keys if saved.get(k, missing) != current.get(k, missing)]
