"""Build-once artifacts (base model, reward model) in a local cache, written atomically.

A build happens in ``<cache>/.<name>.partial`` while holding ``<cache>/.<name>.lock``;
only a finished build is renamed to ``<cache>/<name>`` (``os.rename`` is atomic on
one file system). So a notebook running in parallel either waits for the lock or
loads a complete directory, never half a checkpoint, and a killed build leaves
only the ``.partial`` folder, which the next build resumes from (its trainer
checkpoints there) but nothing ever loads as a model.

The cache lives in ``$RLHF_BOOK_CACHE`` (default ``~/.cache/rlhf_book``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["cache_dir", "cached_artifact", "is_complete", "file_lock"]

MARKER = "COMPLETE.json"


def cache_dir() -> Path:
    """The cache root: ``$RLHF_BOOK_CACHE`` or ``~/.cache/rlhf_book`` (created if missing)."""
    root = Path(os.environ.get("RLHF_BOOK_CACHE") or Path.home() / ".cache" / "rlhf_book").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def is_complete(path: Path) -> bool:
    """True when ``path`` is a finished artifact (it carries the completion marker)."""
    return (Path(path) / MARKER).is_file()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_artifact(name: str, build: Callable[[Path], dict | None], root: Path | None = None) -> Path:
    """Return ``<cache>/<name>``, calling ``build(workdir)`` first if it does not exist yet.

    ``build`` writes everything into ``workdir`` (which may hold a checkpoint from
    an interrupted earlier build) and may return a dict of metadata, stored in the
    completion marker together with the build time.
    """
    root = Path(root) if root is not None else cache_dir()
    final = root / name
    if is_complete(final):
        return final
    with file_lock(root / f".{name}.lock"):
        if is_complete(final):  # another process finished it while we waited
            return final
        work = root / f".{name}.partial"
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        meta = build(work) or {}
        meta = {"name": name, "build_seconds": round(time.time() - t0, 2), **meta}
        (work / MARKER).write_text(json.dumps(meta, indent=2))
        if final.exists():  # a stale, incomplete directory someone copied in by hand
            shutil.rmtree(final)
        os.rename(work, final)
    return final
