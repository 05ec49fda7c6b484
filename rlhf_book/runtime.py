"""Device, seeds and threads (the three things every run sets first), and the speed switches.

The switches: bf16 autocast on GPUs (:func:`autocast`), TF32 matmuls
(:func:`enable_tf32`), the fused Adam kernel (:func:`adam`) and a thread count for
token-by-token sampling on CPUs (:func:`intra_op_threads`). ``benchmarks/`` measures each.
"""

from __future__ import annotations

import contextlib
import os
import time
import random

import numpy as np
import torch

__all__ = [
    "timed",
    "get_device", "check_device", "set_seed", "configure_threads", "resolve_precision", "autocast", "enable_tf32", "adam",
    "intra_op_threads", "PRECISIONS",
]


def get_device(prefer: str | None = None) -> torch.device:
    """The best available device: CUDA, else Apple MPS, else CPU (or ``prefer`` / $RLHF_BOOK_DEVICE)."""
    prefer = prefer or os.environ.get("RLHF_BOOK_DEVICE")
    if prefer:
        return check_device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(name: str, available: bool = True) -> torch.device:
    """``torch.device(name)``; ValueError unless it names a device (and, with ``available``, one this machine has)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {name!r} is not a torch device ({e})") from None
    if available and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this torch build has no CUDA device available")
    if available and dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r}: MPS is not available here")
    return dev


def set_seed(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); returns a CPU ``torch.Generator`` seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def configure_threads(n: int | None = None) -> int:
    """Use ``n`` intra-op threads (default: all cores, at most 8; with N processes on one machine, its share) and
    return the number set.

    ``OMP_WAIT_POLICY=PASSIVE`` (set by ``import rlhf_book`` before torch loads) keeps
    idle threads from spinning; this only chooses how many there are.
    """
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # processes on this machine (torchrun, accelerate)
    n = n or int(os.environ.get("RLHF_BOOK_THREADS", 0)) or max(1, min(8, (os.cpu_count() or 1) // local))
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------- speed: GPU and CPU
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bf16"`` on a CUDA GPU that supports bfloat16, else ``"fp32"``; others pass through."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device | str, precision: str = "auto"):
    """Context for forward passes: bfloat16 autocast when ``precision`` resolves to bf16, else a no-op.

    Under autocast the matmuls run in bf16 while softmax, log-softmax and the losses
    stay in fp32 (the library also casts logits to fp32 before every log-prob). bf16
    has fp32's exponent range, so no loss scaling is needed. On a CPU, ``"bf16"`` works
    too (slowly unless the CPU has bf16 units); ``"auto"`` keeps CPUs in fp32.
    """
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_tf32(device: torch.device | str) -> bool:
    """On CUDA, let fp32 matmuls use TF32 tensor cores (``set_float32_matmul_precision("high")``); returns whether set.

    A process-wide torch setting (not a setting of the card): ~8x the fp32 matmul
    throughput on Ampere and later, with a 10-bit mantissa in the products.
    """
    if torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def adam(
    params, lr: float, eps: float = 1e-8, weight_decay: float = 0.0, betas=(0.9, 0.999), fused: bool = True
) -> torch.optim.Optimizer:
    """Adam (AdamW when ``weight_decay`` > 0) with the fused kernel when torch has one for these tensors.

    The fused step is one kernel over all parameters instead of a dozen per tensor
    (measured in benchmarks/README.md) and the standard choice on GPUs. Same update rule; results differ only in rounding.
    ``fused=False`` gives torch's default implementation.
    """
    params = list(params)
    cls = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    kwargs = dict(lr=lr, eps=eps, betas=betas, weight_decay=weight_decay)
    if not fused:
        return cls(params, **kwargs)
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return cls(params, **kwargs)


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """Run the block with ``n`` intra-op CPU threads, then restore the previous number (None: leave as is).

    Sampling a small batch token by token is hundreds of tiny ops per token; waking a
    second thread for each costs more than it saves (measured in benchmarks/README.md). Results are
    the same: matmuls are bitwise identical, other ops agree to ~1e-6.
    """
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def timed(timings: dict | None, key: str, device: torch.device):
    """Add the seconds the block takes to ``timings[key]`` (after a CUDA sync, so GPU work is counted); None: no timing."""
    if timings is None:
        yield
        return
    sync = device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    yield
    if sync:
        torch.cuda.synchronize(device)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
