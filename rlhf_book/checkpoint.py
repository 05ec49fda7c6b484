"""Save and restore a training run (weights, optimizer, schedule, step, RNG) atomically."""

from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "resume_or_restart", "rng_state", "set_rng_state", "fsync_replace",
           "nonfinite_tensors", "describe_os_error"]


def rng_state() -> dict:
    """Every random state a run depends on (Python, NumPy, torch CPU and CUDA), as tensors, lists and numbers.

    Only types that ``torch.load(weights_only=True)`` reads back: NumPy's key array is stored
    as a list, so a checkpoint never needs the unpickler that can run code.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    """``random.setstate`` wants the tuples ``random.getstate`` gave (a round trip may turn them into lists)."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def nonfinite_tensors(tree, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) dict of tensors that hold a NaN or an infinity."""
    if isinstance(tree, torch.Tensor):
        return [prefix] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    return []


def fsync_replace(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)`` after flushing ``tmp`` to disk, then the directory entry too.

    Without the fsync a power cut soon after the rename can leave ``path`` pointing at an
    empty or partly written file (the rename reached the disk, the data did not).
    """
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename in it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
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
    payload = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        fsync_replace(tmp, path)
    except (OSError, RuntimeError) as e:  # disk full (torch says "unexpected pos"), read-only, not a directory
        if tmp.is_file():
            tmp.unlink()
        raise OSError(f"{path}: the checkpoint could not be written ({describe_os_error(e)}); the previous one, if "
                      f"any, is unchanged. Free disk space or choose another directory, then run again.") from None
    return path


def describe_os_error(e: BaseException) -> str:
    """A short cause for a failed write: the OS error's text, or "no space left on device?" for torch's opaque one."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "unexpected pos" in text or "iostream" in text or "file write failed" in text:
        return f"the write stopped short, most likely no space left on device ({text})"
    return text


def _numpy_array_globals() -> list:
    """What unpickling a plain NumPy array needs (checkpoints of 0.1 hold NumPy's RNG state as one): no code runs."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_NUMPY_ARRAY_GLOBALS = _numpy_array_globals()


def _read(path: Path) -> dict:
    """``torch.load`` of a checkpoint; ValueError naming the file if it cannot be read."""
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):  # 0.1's NumPy RNG state: data, not code
            state = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except pickle.UnpicklingError as e:  # a pickle that asks for something beyond tensors and plain data
        what = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "an object that is not plain data")
        raise ValueError(
            f"{path}: refused: this file asks to run code or build objects a checkpoint of this library never "
            f"contains ({what[:200]}). It was not written by rlhf_book (or by a version before "
            f"0.2.0): nothing in it was executed. Delete it, or start the run in another directory."
        ) from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a checkpoint file; move it away to start over") from None
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
