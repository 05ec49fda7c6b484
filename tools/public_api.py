"""The public API as text: every name in ``rlhf_book.__all__`` with its signature (and a config's fields).

    python tools/public_api.py > tests/public_api.txt    # after a deliberate change, with a CHANGELOG entry

``tests/test_public_api.py`` compares the library with the committed snapshot, so a change to a public name or
signature cannot land without the snapshot, the CHANGELOG and the version moving with it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys

import rlhf_book  # noqa: F401  (before torch)


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def describe_api() -> list[str]:
    """One line per public name (and per field of a config dataclass), sorted."""
    lines = []
    for name in sorted(rlhf_book.__all__):
        obj = getattr(rlhf_book, name)
        if dataclasses.is_dataclass(obj) and isinstance(obj, type):
            lines.append(f"{name}: dataclass")
            lines += [f"{name}.{f.name} = " + ("(required)" if f.default is dataclasses.MISSING else repr(f.default))
                      for f in dataclasses.fields(obj)]
        elif isinstance(obj, type):
            lines.append(f"{name}{_signature(obj)}")
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    lines.append(f"{name}.{attr}{_signature(member)}")
        elif callable(obj):
            lines.append(f"{name}{_signature(obj)}")
        else:
            lines.append(f"{name}: {type(obj).__name__}")
    return [re.sub(r" at 0x[0-9a-fA-F]+", "", line) for line in lines]  # no memory addresses


if __name__ == "__main__":
    sys.stdout.write("\n".join(describe_api()) + "\n")
