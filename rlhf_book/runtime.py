"""Device, seeds and threads (the three things every run sets first), and the speed switches.

The switches: bf16 autocast on GPUs (:func:`autocast`), TF32 matmuls
(:func:`enable_tf32`), the fused Adam kernel (:func:`adam`) and a thread count for
token-by-token sampling on CPUs (:func:`intra_op_threads`). ``benchmarks/`` measures each.

**Dtypes: one policy for every trainer** (as TRL does it):

* *Weights stay as the caller loaded them.* :func:`rlhf_book.load_base_model` and
  :func:`rlhf_book.reward_model.load_reward_model` take ``dtype`` (:func:`resolve_dtype`;
  default ``"auto"``: the checkpoint's own dtype, fp32 for the book's presets), and a frozen
  weight (the reference, the base weights under a LoRA adapter) is never cast.
* *Trainable parameters, and so Adam's state, are held in fp32*
  (``TrainerConfig.trainable_dtype="float32"``, :func:`hold_trainable`): a bf16 master weight
  rounds most lr = 1e-5 steps away. ``trainable_dtype="keep"`` opts into pure bf16 training
  (half the memory of the trainable weights and their Adam state, coarser steps).
* *Forwards use autocast* (``precision``, :func:`autocast`) as before; value heads read
  the trunk's hidden states cast to their own dtype, so a critic on a bf16 trunk runs.
* *log pi_old is recomputed* by a teacher-forced forward whenever sampling and training
  round differently: under bf16 autocast, or when any policy parameter is not fp32
  (:func:`mixed_numerics`); in fp32 the sampler's log-probs are used as they are.
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
    "intra_op_threads", "PRECISIONS", "DTYPES", "TRAINABLE_DTYPES", "resolve_dtype", "dtype_kwargs", "hold_trainable",
    "mixed_numerics",
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


# ---------------------------------------------------------------------------- dtypes (the policy: module docstring)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TRAINABLE_DTYPES = ("float32", "keep")


def resolve_dtype(dtype, argument: str = "dtype"):
    """``"auto"`` (the checkpoint's own dtype), a name in :data:`DTYPES` or a floating ``torch.dtype`` -> that
    ``torch.dtype``, or the string ``"auto"``; a ValueError naming ``argument`` otherwise."""
    if dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"{argument} must be 'auto', one of {', '.join(repr(k) for k in DTYPES)} or a floating "
                     f"torch.dtype, got {dtype!r}")


def dtype_kwargs(dtype, argument: str = "dtype") -> dict:
    """The ``from_pretrained`` keyword for ``dtype`` under the installed transformers: ``dtype`` (>= 4.56) or
    ``torch_dtype`` (4.53-4.55, which also defaults to fp32 where 5.x defaults to ``"auto"``: so pass it always)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: resolve_dtype(dtype, argument)}


def hold_trainable(module: torch.nn.Module | None, trainable_dtype: str = "float32") -> int:
    """Cast ``module``'s trainable floating parameters to fp32 in place (``"float32"``), or leave them (``"keep"``).

    Frozen parameters (a reference, the base weights under a LoRA adapter) keep their dtype.
    Call it before the optimizer is built (Adam's state takes the parameters' dtype). Returns
    the number of parameters cast.
    """
    if trainable_dtype not in TRAINABLE_DTYPES:
        raise ValueError(f"trainable_dtype must be one of {TRAINABLE_DTYPES}, got {trainable_dtype!r}")
    if module is None or trainable_dtype == "keep":
        return 0
    n = 0
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def mixed_numerics(module: torch.nn.Module, precision: str) -> bool:
    """Whether sampling and teacher forcing round differently for this policy: bf16 autocast, or any floating
    parameter that is not fp32 (then log pi_old is recomputed, see the module docstring)."""
    return precision == "bf16" or any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters())


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
