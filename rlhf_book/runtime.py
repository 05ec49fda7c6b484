"""Device, seeds and threads: the three things every run sets first."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["get_device", "set_seed", "configure_threads"]


def get_device(prefer: str | None = None) -> torch.device:
    """The best available device: CUDA, else Apple MPS, else CPU (or ``prefer`` / $RLHF_BOOK_DEVICE)."""
    prefer = prefer or os.environ.get("RLHF_BOOK_DEVICE")
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); returns a CPU ``torch.Generator`` seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def configure_threads(n: int | None = None) -> int:
    """Use ``n`` intra-op threads (default: all cores, at most 8) and return the number set.

    ``OMP_WAIT_POLICY=PASSIVE`` (set by ``import rlhf_book`` before torch loads) keeps
    idle threads from spinning; this only chooses how many there are.
    """
    n = n or int(os.environ.get("RLHF_BOOK_THREADS", 0)) or min(8, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n
