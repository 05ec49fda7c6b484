"""What the chapters' sweeps share: a resumable results file of one JSON line per finished run.

A run already in the file is skipped; a run killed half-way continues from its last checkpoint in
``<results>.runs/<run>/`` (removed, with any folder it leaves empty, once the run is recorded).

Every record carries ``world``, a digest of the book's world as this machine built it (the cached
base model's weights and the preference data): the world is trained from scratch, and another
CPU's floating point builds a slightly different one (another base model, 3,000 training pairs
instead of 2,999), so a chapter compares only runs of one world. Records from before the digest
have none.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import time
from pathlib import Path

import torch

from rlhf_book.trainer import append_metrics, read_metrics


def compact(history: list[dict], keys, digits: int | None = 4, only: str | None = None, samples: bool = True) -> list[dict]:
    """The rows of ``history`` (those with key ``only``, or all) with ``keys`` (floats to ``digits`` significant digits;
    None: as they are), and (``samples``) the eval samples at the last row."""
    fmt = (lambda v: v) if digits is None else (lambda v: float(f"{v:.{digits}g}") if isinstance(v, float) else v)
    rows = [{k: fmt(h[k]) for k in keys if k in h} for h in history if only is None or only in h]
    if samples and rows and history and "eval_samples" in history[-1]:
        rows[-1]["eval_samples"] = history[-1]["eval_samples"]
    return rows


def ev_trace(history: list[dict]) -> list[float]:
    """The critic's explained variance at every iteration (3 decimals): its median over the run is the check that
    the critic learnt (> 0 beats a constant baseline)."""
    return [round(h["explained_variance"], 3) for h in history if "explained_variance" in h]


@functools.lru_cache(maxsize=None)
def world_digest(preset: str = "cpu") -> str | None:
    """12 hex digits of the cached base model's weights and preference data of ``preset`` (None: not built yet)."""
    from rlhf_book.base_model import base_model_path
    from rlhf_book.cache import cache_dir
    from rlhf_book.preferences import preference_data_key

    files = [base_model_path(preset) / "model.safetensors", cache_dir() / preference_data_key(preset) / "train.jsonl"]
    if not all(f.is_file() for f in files):
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


class Results:
    """The runs recorded in ``path`` (``done``), a scratch folder per run, :meth:`record`, and the book's reward model."""

    def __init__(self, path: Path, world=world_digest):
        self.path, self.world = path, world  # world() -> the digest of the world the runs train in
        self.done = {r["run"] for r in read_metrics(path)} if path.exists() else set()
        self._rm = None

    def book_reward_fn(self):
        """Chapter 2's learned reward model as a reward function (loaded once, on first use)."""
        if self._rm is None:
            from rlhf_book.reward_model import load_reward_model, reward_fn_from_model

            model, tok = load_reward_model("cpu", progress=False)
            self._rm = reward_fn_from_model(model, tok)
        return self._rm

    def scratch(self, run: str) -> Path:
        return self.path.with_suffix(".runs") / run

    def record(self, run: str, t0: float, **fields) -> None:
        append_metrics({"run": run, **fields, "world": self.world(), "seconds": round(time.time() - t0, 1),
                        "threads": torch.get_num_threads()}, self.path)
        shutil.rmtree(self.scratch(run), ignore_errors=True)
        root, parent = self.path.with_suffix(".runs"), self.scratch(run).parent
        while parent != root.parent and parent.is_dir() and not any(parent.iterdir()):  # no empty folders left behind
            parent.rmdir()
            parent = parent.parent
        self.done.add(run)
        print(f"{run}: {time.time() - t0:.0f} s", flush=True)
