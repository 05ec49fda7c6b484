"""Save and restore a training run (weights, optimizer, schedule, step, RNG) atomically."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


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


def save_checkpoint(path: str | Path, **state: Any) -> Path:
    """``torch.save`` ``state`` to ``path`` via a temp file + ``os.replace`` (never half-written).

    Modules, optimizers and schedulers are stored by their ``state_dict()``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, **targets: Any) -> dict:
    """Load ``path``; each ``targets[k]`` with ``load_state_dict`` gets ``state[k]``. Returns the dict."""
    state = torch.load(Path(path), map_location="cpu", weights_only=False)
    for k, obj in targets.items():
        if k not in state:
            raise KeyError(f"checkpoint {path} has no entry {k!r} (has {sorted(state)})")
        obj.load_state_dict(state[k])
    return state
