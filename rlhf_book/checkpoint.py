"""Save and restore a training run (weights, optimizer, schedule, step, RNG) atomically."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "resume_or_restart", "rng_state", "set_rng_state", "fsync_replace"]


def rng_state() -> dict:
    """Every random state a run depends on (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_replace(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)`` after flushing ``tmp`` to disk, then the directory entry too.

    Without the fsync a power cut soon after the rename can leave ``path`` pointing at an
    empty or partly written file (the rename reached the disk, the data did not).
    """
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, **state: Any) -> Path:
    """``torch.save`` ``state`` to ``path`` via a temp file, fsync and ``os.replace`` (never half-written).

    Modules, optimizers and schedulers are stored by their ``state_dict()``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    fsync_replace(tmp, path)
    return path


def _read(path: Path) -> dict:
    """``torch.load`` of a checkpoint; ValueError naming the file if it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, zero bytes, not a checkpoint at all
        raise ValueError(
            f"{path}: the checkpoint cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"It was probably cut off while being written (disk full, power loss). Delete it to start over "
            f"from the beginning, or put back a copy of an earlier one."
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint of this library (a {type(state).__name__}, not a dict)")
    return state


def load_checkpoint(path: str | Path, **targets: Any) -> dict:
    """Load ``path``; each ``targets[k]`` with ``load_state_dict`` gets ``state[k]``. Returns the dict.

    An unreadable file raises ValueError naming it and saying how to recover.
    """
    path = Path(path)
    return _restore(_read(path), path, targets)


def _restore(state: dict, path: Path, targets: dict) -> dict:
    for k, obj in targets.items():
        if k not in state:
            raise ValueError(f"checkpoint {path} has no entry {k!r} (has {sorted(state)})")
        obj.load_state_dict(state[k])
    return state


def resume_or_restart(path: str | Path, **targets: Any) -> dict | None:
    """For a build's own checkpoint: :func:`load_checkpoint` if ``path`` exists and is readable, else None.

    An unreadable one (cut off mid-write) is deleted with a warning: a build is
    deterministic, so starting over costs time, never correctness, while keeping the
    file would make every later build fail the same way.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = _read(path)
    except ValueError as e:
        warnings.warn(f"{e} Discarding it and building from the start.", RuntimeWarning, stacklevel=2)
        path.unlink()
        return None
    return _restore(state, path, targets)
