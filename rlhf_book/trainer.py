"""The loop every on-policy trainer of the book shares (A2C, PPO).

One iteration = draw a batch of distinct prompts, ``step`` on them (rollout, rewards,
advantages, updates), sometimes ``evaluate`` on held-out prompts, append the stats to
``history``, checkpoint. A subclass supplies ``step``, ``evaluate``, ``state_dict`` and
``load_state_dict``; everything here is the bookkeeping that makes a run resumable
bit for bit (at the same CPU thread count: sums over 1 and 2 threads differ at ~1e-7),
refuses to mix two configs in one run, streams metrics to disk and exports the policy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import types
import typing
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import fsync_replace, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .export import save_model
from .rollout import Rollout, generate, prompt_texts, response_logprobs
from .runtime import PRECISIONS, autocast, enable_tf32, resolve_precision

__all__ = ["OnPolicyTrainer", "SpeedConfig", "check_config", "check_types", "config_from_dict", "config_changes",
           "RESUMABLE_FIELDS", "METRICS_NAME", "append_metrics", "write_metrics", "read_metrics"]

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _allowed(annotation) -> tuple[tuple[type, ...], bool]:
    """(the plain types a field declared as ``annotation`` takes, whether None is allowed)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (annotation,), False


def _fits(value, kinds: tuple[type, ...]) -> bool:
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is str and isinstance(value, str):
            return True
        if kind not in _TYPE_NAMES and isinstance(kind, type) and isinstance(value, kind):
            return True
    return False


def check_types(cfg) -> None:
    """Raise ValueError naming the first field of dataclass ``cfg`` whose value does not fit its declared type.

    The declarations are the rule: ``bool`` takes only True/False (so ``"no"`` is not
    silently truthy), ``int`` only integers (not 8.5, "8" or True), ``float`` any finite
    real number (not inf, NaN or "1e-4"), ``X | None`` also None.
    """
    name = type(cfg).__name__
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        kinds, none_ok = _allowed(hints[f.name])
        value = getattr(cfg, f.name)
        if value is None:
            if not none_ok:
                raise ValueError(f"{name}.{f.name} must not be None (expected {_expected(kinds)})")
            continue
        if not _fits(value, kinds):
            raise ValueError(f"{name}.{f.name} must be {_expected(kinds, none_ok)}, got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}.{f.name} must be a finite number, got {value!r}")


def _expected(kinds, none_ok: bool = False) -> str:
    words = [_TYPE_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds]
    return " or ".join(words + (["None"] if none_ok else []))


def check_config(cfg, positive=(), positive_or_none=(), nonnegative=(), unit_interval=(), types: bool = True) -> None:
    """Raise ValueError naming the first field of dataclass ``cfg`` of the wrong type or outside its allowed range.

    ``types=False`` skips :func:`check_types` (for a second range check on a config whose types were checked).
    """
    if types:
        check_types(cfg)
    name = type(cfg).__name__
    for f in positive:
        if not getattr(cfg, f) > 0:
            raise ValueError(f"{name}.{f} must be > 0, got {getattr(cfg, f)!r}")
    for f in positive_or_none:
        v = getattr(cfg, f)
        if v is not None and not v > 0:
            raise ValueError(f"{name}.{f} must be > 0 or None, got {v!r}")
    for f in nonnegative:
        if getattr(cfg, f) < 0:
            raise ValueError(f"{name}.{f} must be >= 0, got {getattr(cfg, f)!r}")
    for f in unit_interval:
        if not 0.0 <= getattr(cfg, f) <= 1.0:
            raise ValueError(f"{name}.{f} must be in [0, 1], got {getattr(cfg, f)!r}")


@dataclass
class SpeedConfig:
    """The speed switches every on-policy trainer's config has (each measured in benchmarks/README.md)."""

    precision: str = "auto"  # "auto": bf16 autocast on a GPU that supports it, else fp32; or "fp32" / "bf16"
    tf32: bool = True  # on CUDA, let fp32 matmuls use TF32 tensor cores
    compile: bool = False  # torch.compile the teacher-forced forwards (worth it on GPUs; a CPU needs a C++ compiler)
    generation_threads: int | None = 1  # CPU threads while sampling token by token (None: the process setting)

    def check_speed(self) -> None:
        """Raise ValueError naming a speed field outside its allowed values (after the subclass's check_config)."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"{type(self).__name__}.precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_config(self, positive_or_none=("generation_threads",), types=False)


# Fields that may change between a run and its resumption: they change what is shown or saved, not what is learnt.
RESUMABLE_FIELDS = frozenset({"progress", "checkpoint_every", "eval_every"})


def config_changes(saved: dict, current: dict, allowed=RESUMABLE_FIELDS) -> list[str]:
    """``"field: old -> new"`` for every field (outside ``allowed``) whose value differs between two config dicts."""
    keys = sorted((set(saved) | set(current)) - set(allowed))
    missing = object()
    return [f"{k}: {saved.get(k, missing)!r} -> {current.get(k, missing)!r}".replace(repr(missing), "(absent)")
            for k in keys if saved.get(k, missing) != current.get(k, missing)]


def config_from_dict(cls, d: dict):
    """``cls(**d)`` for a config dataclass, naming any unknown key (e.g. a typo in a config file)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


class OnPolicyTrainer:
    """Base class. Subclasses set ``config`` (a dataclass with batch_size, eval_every,
    checkpoint_every, progress, max_new_tokens, temperature, seed), ``model`` (what is trained),
    ``lm`` (the causal LM that samples), ``ref``, ``tokenizer``, ``critic`` (or None),
    ``generator``, ``device``, ``iteration`` and ``history``, and implement ``step``,
    ``evaluate`` and ``stateful`` (optimizers, controllers: whatever else a checkpoint needs).
    The config is a :class:`SpeedConfig`; subclasses call :meth:`setup_speed` once."""

    name = "RL"  # shown on the progress bar
    checkpoint_name = "state.pt"  # file inside ``checkpoint_dir``

    def step(self, prompts: Sequence[str]) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ speed switches
    def setup_speed(self) -> None:
        """Resolve ``config.precision`` for this device, switch on TF32 on CUDA (``config.tf32``)."""
        cfg = self.config
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.tf32:
            enable_tf32(self.device)
        self._compiled: dict[int, torch.nn.Module] = {}

    def autocast(self):
        """Context for forward passes: bf16 autocast when the run's precision is bf16, else nothing."""
        return autocast(self.device, self.precision)

    def compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module``, or (``config.compile``) its ``torch.compile`` wrapper: same parameters, compiled forward.

        ``dynamic=True`` because every batch has its own prompt and response lengths.
        The wrapper is built once per module and only used for teacher-forced forwards;
        sampling and checkpoints use the module itself.
        """
        if not self.config.compile:
            return module
        if id(module) not in self._compiled:
            self._compiled[id(module)] = torch.compile(module, dynamic=True)
        return self._compiled[id(module)]

    def evaluate(self, prompts: Sequence) -> dict:
        raise NotImplementedError

    def stateful(self) -> dict:
        """Objects with ``state_dict``/``load_state_dict`` besides model and critic, by checkpoint key."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything needed to continue the run bit for bit (at the same CPU thread count, see :meth:`load`)."""
        state = {
            "model": self.model.state_dict(), "generator": self.generator.get_state(), "rng": rng_state(),
            "iteration": self.iteration, "history": self.history, "config": asdict(self.config),
            "threads": torch.get_num_threads(),
            **{k: v.state_dict() for k, v in self.stateful().items()},
        }
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.model.load_state_dict(state["model"])
        if self.critic is not None:
            if "critic" not in state:
                raise ValueError("checkpoint has no separate critic but this trainer has one")
            self.critic.load_state_dict(state["critic"])
        for k, v in self.stateful().items():
            v.load_state_dict(state[k])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.iteration, self.history = int(state["iteration"]), list(state["history"])

    @torch.no_grad()
    def eval_rollout(self, texts: Sequence[str], seed: int | None = None) -> tuple[Rollout, torch.Tensor]:
        """Sample ``texts`` with a private generator (seed ``config.seed + 1`` unless given) -> (rollout, ref log-probs).

        The generator is its own, so evaluating never changes the training run and every
        evaluation sees the same random numbers.
        """
        cfg = self.config
        g = torch.Generator(device=self.device).manual_seed(cfg.seed + 1 if seed is None else seed)
        with self.autocast():
            ro = generate(self.lm, self.tokenizer, texts, cfg.max_new_tokens, cfg.temperature, generator=g,
                          threads=cfg.generation_threads)
            ids = (ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
            return ro, response_logprobs(self.ref, *ids, temperature=cfg.temperature)

    def progress_postfix(self, stats: dict) -> dict:
        """What the progress bar shows after an iteration."""
        return {"reward": f"{stats['proxy_reward']:.2f}", "kl": f"{stats['kl']:.2f}"}

    def save(self, path: str | Path) -> Path:
        """Atomically write :meth:`state_dict` to ``path``."""
        return save_checkpoint(path, **self.state_dict())

    def load(self, path: str | Path) -> None:
        """Restore a run saved with :meth:`save`; refuses a checkpoint written with another config.

        Resuming continues the interrupted run exactly when the process uses as many CPU
        threads as the one that wrote it (reductions over 1 and 2 threads differ at ~1e-7);
        with another count it continues, with a warning, but is no longer bit-identical.
        """
        state = load_checkpoint(path)
        changed = config_changes(state.get("config", {}), asdict(self.config))
        if changed:
            raise ValueError(
                f"{path}: cannot resume, this run's config differs from the one the checkpoint was written with "
                f"({'; '.join(changed)}). Restore those values to continue it, or start a new run in another "
                f"directory (only {', '.join(sorted(RESUMABLE_FIELDS))} may change on resume)."
            )
        threads = state.get("threads")
        if threads is not None and threads != torch.get_num_threads():
            warnings.warn(
                f"{path} was written with {threads} CPU threads and this process uses {torch.get_num_threads()}: "
                "the run continues, but not bit for bit as an uninterrupted one would", RuntimeWarning, stacklevel=2,
            )
        try:
            self.load_state_dict(state)
        except RuntimeError as e:  # e.g. "size mismatch": the checkpoint is of another model
            raise ValueError(
                f"{path}: the checkpoint does not fit this trainer's models (another base model or critic?): "
                f"{str(e).splitlines()[0]}. Start a new run in another directory."
            ) from None

    def export(self, directory: str | Path) -> Path:
        """Save the trained policy LM and its tokenizer with ``save_pretrained`` (loads with ``AutoModelForCausalLM``).

        Written into a temporary sibling and renamed into place, so ``directory`` is
        always either the previous export or the new one, never half of one.
        """
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(
            self.lm, self.tokenizer, tmp, title=f"{self.name} policy trained with rlhf_book",
            description=f"A causal LM after {self.iteration} {self.name} iterations (config in the run's run_config.json).",
        )
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory

    def train(
        self,
        prompt_list: Sequence,
        iterations: int,
        checkpoint_dir: str | Path | None = None,
        eval_prompts: Sequence | None = None,
        progress: bool | None = None,
    ) -> list[dict]:
        """Run until ``iterations`` iterations are done; returns the history (one dict per iteration).

        Each iteration draws ``batch_size`` distinct prompts from ``prompt_list``. With
        ``eval_prompts``, iteration 0 (before training), every ``eval_every``-th iteration and
        the last one also carry ``eval_*`` statistics. With ``checkpoint_dir`` the run is saved
        every ``checkpoint_every`` iterations and at the end; calling again with the same
        directory resumes and reproduces the uninterrupted run exactly (same thread count;
        a changed config is refused, see :meth:`load`), and every iteration's statistics are
        appended to ``checkpoint_dir/metrics.jsonl`` as they happen (one JSON object a line:
        watch it during a run, read it after a crash). ``progress`` (default
        ``config.progress``) shows a tqdm bar.
        """
        cfg = self.config
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
        texts = prompt_texts(prompt_list)
        if len(texts) < cfg.batch_size:
            raise ValueError(f"prompt_list has {len(texts)} prompts, fewer than batch_size={cfg.batch_size}")
        eval_texts = prompt_texts(eval_prompts) if eval_prompts is not None else None
        ckpt = Path(checkpoint_dir) / self.checkpoint_name if checkpoint_dir is not None else None
        metrics = Path(checkpoint_dir) / METRICS_NAME if checkpoint_dir is not None else None
        if ckpt is not None and ckpt.exists():
            self.load(ckpt)
        if metrics is not None:  # rows after the last checkpoint were lost with the run: the file restarts from it
            metrics.parent.mkdir(parents=True, exist_ok=True)
            write_metrics(self.history, metrics)
        if eval_texts is not None and self.iteration == 0 and not any(h["iteration"] == 0 for h in self.history):
            self.history.append({"iteration": 0, **self.evaluate(eval_texts)})
            if metrics is not None:
                append_metrics(self.history[-1], metrics)
        show = cfg.progress if progress is None else progress
        bar = tqdm(total=iterations, initial=min(self.iteration, iterations), desc=self.name, disable=not show)
        while self.iteration < iterations:
            order = torch.randperm(len(texts), generator=self.generator, device=self.device)[: cfg.batch_size]
            stats = self.step([texts[i] for i in order.tolist()])
            last = self.iteration == iterations
            if eval_texts is not None and (last or (cfg.eval_every and self.iteration % cfg.eval_every == 0)):
                stats.update(self.evaluate(eval_texts))
            self.history.append(stats)
            if metrics is not None:
                append_metrics(stats, metrics)
            bar.update(1)
            bar.set_postfix(self.progress_postfix(stats))
            if ckpt is not None and (last or (cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0)):
                self.save(ckpt)
        bar.close()
        return self.history


METRICS_NAME = "metrics.jsonl"


def append_metrics(row: dict, path: str | Path) -> None:
    """Append one history row to a JSONL metrics file and flush it to disk (it survives a crash)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_metrics(history: list[dict], path: str | Path) -> None:
    """(Re)write a JSONL metrics file from a whole history, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in history)
    fsync_replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a JSONL metrics file (a last line cut off by a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows
