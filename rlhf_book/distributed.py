"""More than one process: the trainers on Hugging Face Accelerate, and what N processes must share.

Every trainer runs under one ``accelerate.Accelerator`` (given, or made by
:func:`make_accelerator`). With one process nothing changes: the Accelerator is a thin
shell and every function here returns its input. With N processes (``accelerate launch
--num_processes N``, ``torchrun --nproc_per_node N``) one rule makes them compute what one
process computes at the same *global* batch B:

* **contiguous shards.** Process r holds rows [r B/N, (r+1) B/N) of the global batch
  (:func:`shard`): prompts are drawn by a generator seeded alike on every rank, then split;
  gathered rows (:func:`gather_rows`) come back in rank order, which is the one-process order.
* **anything that mixes rows is computed on the gathered batch**: advantage whitening, a
  batch-level std, GRPO's groups, a running baseline, every logged statistic, the KL
  controller's input (:func:`gather_experience`, :func:`local_rows`).
* **losses are global means.** DDP averages gradients over processes, so a loss that is a
  mean over the global batch's tokens (or replies, or pairs) is the local mean times
  N n_local / n_global (:func:`global_share`): the sum of the local parts over the
  global count, whatever the split.

What stays per process: the sampling generator (rank r samples with its own seed,
:func:`rank_seed`; rank 0's is the one-process seed) and minibatch shuffling of the local
rows. So N processes at batch B learn what one process at batch B learns, from other random
samples; with one minibatch per epoch and the same samples the update is the same up to
float summation order (``tests/test_distributed.py`` checks both).

Only what trains is ``prepare``-d (the policy, its value head or critic, the optimizer);
the frozen reference and a model-based reward are moved to the process's device. Sampling
and the experience forwards use the unwrapped modules, so DDP's collectives run only in
the update, the same number of times on every rank.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

__all__ = ["make_accelerator", "finish", "check_data_parallel", "launched_processes", "rank_seed", "local_size", "shard", "gather_rows", "gather_rollout",
           "gather_experience", "local_rows", "global_share", "global_shares", "global_whiten", "mean_across"]


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 for plain ``python``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(device: torch.device | str | None = None):
    """An ``Accelerator`` for the trainers: DDP that tolerates unused parameters and skips buffer broadcasts.

    ``device``: the policy's device in a single process (a CPU there keeps the process on
    the CPU even on a GPU machine). Under a launcher each rank gets its own GPU, or, on a
    machine without CUDA, the CPU with the gloo backend.
    ``find_unused_parameters``: a critic-only step backpropagates through the value head
    alone.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if launched_processes() > 1:
        cpu = not torch.cuda.is_available()
    else:
        cpu = device is not None and torch.device(device).type == "cpu"
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=cpu, kwargs_handlers=[ddp])


def finish() -> None:
    """End a multi-process run: wait for every process, then destroy the process group (one process: nothing).

    Call it last in a launched script (the CLI does). A gloo group left for the interpreter's exit
    to tear down can abort a rank ("terminate called without an active exception", seen on a
    loaded 2-core machine), failing a run that had finished and written everything.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_data_parallel(accelerator) -> None:
    """ValueError unless ``accelerator`` replicates the parameters (one process, DDP on GPUs or CPUs).

    Sampling, the experience step and checkpoints read the policy's full parameters on every
    process; FSDP and DeepSpeed ZeRO-3 shard them, which these trainers do not handle yet.
    """
    kind = str(getattr(accelerator, "distributed_type", "NO")).split(".")[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        raise ValueError(f"the accelerator's distributed_type is {kind}: the trainers run data parallel (DDP, "
                         "a full copy of the models per process) only; use configs/accelerate_ddp.yaml or plain "
                         "`accelerate launch --multi_gpu --num_processes N`")


def rank_seed(seed: int, rank: int) -> int:
    """The sampling seed of process ``rank``: ``seed`` on rank 0 (the one-process run's), distinct on the others."""
    return seed if rank == 0 else seed + 1_000_003 * rank


def local_size(n: int, world: int, what: str = "batch_size") -> int:
    """n / world, each process's share of a global count ``n`` (ValueError naming ``what`` unless it divides)."""
    if n % world:
        raise ValueError(f"{what}={n} must be a multiple of the number of processes ({world}): each process takes "
                         f"an equal share of the global batch")
    return n // world


def shard(n: int, rank: int, world: int, what: str = "batch_size") -> slice:
    """Rows of process ``rank`` in a global batch of ``n``: the contiguous slice [rank n/world, (rank+1) n/world)."""
    b = local_size(n, world, what)
    return slice(rank * b, (rank + 1) * b)


def gather_rows(accelerator, t: torch.Tensor, pad_value: float = 0, pad_first: bool = False) -> torch.Tensor:
    """Concatenate every process's rows of ``t`` (dim 0) in rank order; dim 1 may differ (padded); 1 process: ``t``.

    ``pad_first`` pads dim 1 on the left (left-padded prompts). Processes may hold different
    numbers of rows; the result has exactly their sum.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return t
    sizes = accelerator.gather(torch.tensor([t.size(0)], device=t.device)).tolist()
    if t.dim() > 1:
        t = accelerator.pad_across_processes(t, dim=1, pad_index=pad_value, pad_first=pad_first)
    if len(set(sizes)) > 1:
        t = accelerator.pad_across_processes(t, dim=0, pad_index=pad_value)
    full = accelerator.gather(t.contiguous())
    if len(set(sizes)) > 1:
        m = max(sizes)
        full = torch.cat([full[r * m: r * m + s] for r, s in enumerate(sizes)])
    return full


def gather_rollout(accelerator, ro):
    """The global batch's :class:`~rlhf_book.rollout.Rollout` (ids, masks, log-probs, flags; no texts) on every process."""
    from .rollout import Rollout

    if accelerator is None or accelerator.num_processes == 1:
        return ro
    g = lambda t, **kw: None if t is None else gather_rows(accelerator, t, **kw)  # noqa: E731
    return Rollout(g(ro.prompt_ids, pad_first=True), g(ro.prompt_mask, pad_first=True), g(ro.response_ids),
                   g(ro.response_mask), g(ro.logprobs), g(ro.terminated), None, None, ro.temperature)


def gather_experience(accelerator, exp):
    """The global batch's :class:`~rlhf_book.experience.Experience` on every process (for statistics; no texts)."""
    from dataclasses import fields

    from .experience import Experience

    if accelerator is None or accelerator.num_processes == 1:
        return exp
    out = {}
    for f in fields(exp):
        v = getattr(exp, f.name)
        if f.name == "rollout":
            v = gather_rollout(accelerator, v)
        elif isinstance(v, torch.Tensor):
            v = gather_rows(accelerator, v)
        out[f.name] = v
    return Experience(**out)


def local_rows(accelerator, full: torch.Tensor, n_local: int, width: int | None = None) -> torch.Tensor:
    """This process's rows (and its first ``width`` columns) of a tensor computed on the gathered batch."""
    if accelerator is None or accelerator.num_processes == 1:
        return full
    rows = shard(full.size(0), accelerator.process_index, accelerator.num_processes)
    if rows.stop - rows.start != n_local:
        raise ValueError(f"processes hold unequal shares ({n_local} rows here, {full.size(0)} in all)")
    part = full[rows]
    return part if width is None else part[:, :width]


def global_share(accelerator, n_local: torch.Tensor | float) -> torch.Tensor | float:
    """N n_local / sum_r n_r: the factor that turns a local mean into this process's share of the global mean.

    DDP averages the processes' gradients (divides their sum by N), so a loss
    ``mean_local * global_share`` has the gradient of the mean over the global batch.
    1.0 with one process. The one-part case of :func:`global_shares`.
    """
    return global_shares(accelerator, [n_local])[0]


def global_shares(accelerator, counts: Sequence[torch.Tensor | float] | None, parts: int = 1
                  ) -> list[torch.Tensor | float]:
    """The one loss-scaling rule: N n_k / sum_r sum_k n_{r,k} for each part k of this process's batch.

    A loss is a mean over ``n_k`` items (tokens, replies, pairs) of a micro-batch k; times its
    share it becomes that micro-batch's part of the mean over the *global* batch (all parts of
    all N processes): the gradients summed over micro-batches (accumulation) and averaged over
    processes (DDP) are those of the global mean, whatever the split. 1.0 for one part in one
    process. ``counts=None``: the losses are already normalised by a global count (DAPO's), so
    the share only undoes DDP's division by N (``parts`` entries of N).
    """
    world = 1 if accelerator is None else accelerator.num_processes
    if counts is None:
        return [float(world)] * parts
    if world == 1 and len(counts) == 1:
        return [1.0]
    if world == 1:
        total = sum(counts)
        return [n / total for n in counts]
    device = accelerator.device
    ns = [torch.as_tensor(n, dtype=torch.float32, device=device).detach() for n in counts]
    total = accelerator.reduce(torch.stack(ns).sum(), "sum")
    return [world * n / total for n in ns]


def global_whiten(accelerator, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """:func:`~rlhf_book.advantage.masked_whiten` with the statistics of the global batch (N processes: gathered)."""
    from .advantage import masked_whiten

    if accelerator is None or accelerator.num_processes == 1:
        return masked_whiten(x, mask, shift_mean=shift_mean)
    full = masked_whiten(gather_rows(accelerator, x), gather_rows(accelerator, mask), shift_mean=shift_mean)
    return local_rows(accelerator, full, x.size(0), x.size(1))


def mean_across(accelerator, stats: dict) -> dict:
    """The mean over processes of each float (or 0-d tensor) in ``stats``; others are kept; 1 process: ``stats``."""
    if accelerator is None or accelerator.num_processes == 1:
        return stats
    keys = [k for k, v in stats.items() if isinstance(v, (float, int, torch.Tensor)) and not isinstance(v, bool)]
    if not keys:
        return stats
    vals = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    vals = accelerator.reduce(vals, "mean").tolist()
    return {**stats, **{k: (int(round(v)) if isinstance(stats[k], int) else v) for k, v in zip(keys, vals)}}
