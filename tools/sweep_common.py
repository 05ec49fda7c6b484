"""What the chapters' sweeps share: a resumable results file of one JSON line per finished run.

A run already in the file is skipped; a run killed half-way continues from its last checkpoint in
``<results>.runs/<run>/`` (removed, with any folder it leaves empty, once the run is recorded).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from rlhf_book.trainer import append_metrics, read_metrics


class Results:
    """The runs recorded in ``path`` (``done``), a scratch folder per run, and :meth:`record`."""

    def __init__(self, path: Path):
        self.path = path
        self.done = {r["run"] for r in read_metrics(path)} if path.exists() else set()

    def scratch(self, run: str) -> Path:
        return self.path.with_suffix(".runs") / run

    def record(self, run: str, t0: float, **fields) -> None:
        append_metrics({"run": run, **fields, "seconds": round(time.time() - t0, 1),
                        "threads": torch.get_num_threads()}, self.path)
        shutil.rmtree(self.scratch(run), ignore_errors=True)
        root, parent = self.path.with_suffix(".runs"), self.scratch(run).parent
        while parent != root.parent and parent.is_dir() and not any(parent.iterdir()):  # no empty folders left behind
            parent.rmdir()
            parent = parent.parent
        self.done.add(run)
        print(f"{run}: {time.time() - t0:.0f} s", flush=True)
