"""Build-once artifacts (base model, reward model) in a local cache, written atomically.

A build happens in ``<cache>/.<name>.partial`` while holding ``<cache>/.<name>.lock``;
only a finished build is renamed to ``<cache>/<name>`` (``os.rename`` is atomic on
one file system). So a notebook running in parallel either waits for the lock or
loads a complete directory, never half a checkpoint, and a killed build leaves
only the ``.partial`` folder, which the next build resumes from (its trainer
checkpoints there) but nothing ever loads as a model.

The cache lives in ``$RLHF_BOOK_CACHE`` (default ``~/.cache/rlhf_book``). A relative
``$RLHF_BOOK_CACHE`` is resolved once, against the working directory of the first
``import rlhf_book``, and written back to the environment as an absolute path, so the
kernels and workers that process starts (nbval, ``make book``) use the same cache.

An artifact's name is :func:`artifact_key` of its recipe and of its inputs' names:
change anything that went into it (a recipe field, a format version, an upstream
artifact) and the name changes, so a stale artifact is never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from filelock import FileLock

from .checkpoint import fsync_dir

__all__ = ["cache_dir", "cached_artifact", "is_complete", "file_lock", "artifact_key", "resolve_cache_env"]

MARKER = "COMPLETE.json"
ENV = "RLHF_BOOK_CACHE"


def resolve_cache_env() -> None:
    """Make a relative ``$RLHF_BOOK_CACHE`` absolute (against the current directory), in ``os.environ``."""
    value = os.environ.get(ENV)
    if value and not os.path.isabs(os.path.expanduser(value)):
        os.environ[ENV] = str(Path(value).expanduser().resolve())


def cache_dir() -> Path:
    """The cache root: ``$RLHF_BOOK_CACHE`` or ``~/.cache/rlhf_book`` (created if missing), an absolute path."""
    resolve_cache_env()
    root = Path(os.environ.get(ENV) or Path.home() / ".cache" / "rlhf_book").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"the artifact cache {root} (${ENV}) is a file, not a directory: point ${ENV} at a "
                         f"directory") from None
    except OSError as e:
        raise ValueError(f"the artifact cache {root} (${ENV}) cannot be created ({e.strerror}): point ${ENV} at "
                         f"a writable directory") from None
    return root


def _fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the directories) to disk, so a rename after it publishes whole files."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def artifact_key(kind: str, label: str, recipe: dict, upstream: Sequence[str] = ()) -> str:
    """``<kind>-<label>-<hash>``: the one name of an artifact, from everything that determines it.

    ``recipe`` holds every setting and format version of the build (JSON-serialisable);
    ``upstream`` the keys of the artifacts it is built from, so a change anywhere up the
    chain (corpus -> base LM -> preferences -> reward model) changes every key below it.
    ``label`` (e.g. the preset name) only makes the name readable.
    """
    blob = json.dumps({"kind": kind, "recipe": recipe, "upstream": list(upstream)}, sort_keys=True, default=str)
    return f"{kind}-{label}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def is_complete(path: Path) -> bool:
    """True when ``path`` is a finished artifact (it carries the completion marker)."""
    return (Path(path) / MARKER).is_file()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (``filelock``: flock on POSIX, msvcrt on Windows)."""
    with FileLock(str(path)):
        yield


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
        t0 = time.time()
        try:
            work.mkdir(parents=True, exist_ok=True)
            meta = build(work) or {}
            meta = {"name": name, "build_seconds": round(time.time() - t0, 2), **meta}
            _fsync_tree(work)  # the weights reach the disk before the marker that says they are complete
            (work / MARKER).write_text(json.dumps(meta, indent=2))
        except OSError as e:  # disk full, read-only cache: the .partial folder stays and the next build resumes it
            from .checkpoint import describe_os_error

            raise OSError(f"building {name} in {work} failed ({describe_os_error(e)}); free space (or make "
                          f"${ENV} writable) and run again: the build resumes from its last checkpoint") from None
        if final.exists():  # a stale, incomplete directory someone copied in by hand
            shutil.rmtree(final)
        os.rename(work, final)
    return final
