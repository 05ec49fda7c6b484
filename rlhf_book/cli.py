"""The command line: one config file trains any of the book's algorithms, in the book's world or on your model.

    rlhf-book pipeline --config configs/ppo_cpu.toml            # or: python -m rlhf_book.cli pipeline ...
    rlhf-book pipeline --config configs/ppo_cpu.toml --iterations 80   # continue the same run further
    rlhf-book pipeline --config configs/ppo_cpu.toml --ppo.kl_coef 0.1 --out runs/beta0.1   # override any field
    rlhf-book train grpo --config configs/grpo_tiny.toml        # one stage: sft reward ppo a2c reinforce rloo grpo dpo
    rlhf-book train dpo --config my_dpo.toml --epochs 3         # offline stages count epochs (a larger number extends)
    rlhf-book options grpo                                      # every field: type, default, valid values, help
    rlhf-book base --preset cpu                                 # only build/cache the base LM
    rlhf-book reward --preset cpu                               # only build/cache the reward model
    rlhf-book grade submissions/ --seed 8231                    # coursework: grade notebooks (rlhf_book/grade.py)
    rlhf-book student-edition --out student-book                # coursework: chapters with stubs, no solutions
    accelerate launch --multi_gpu --num_processes 8 -m rlhf_book.cli pipeline --config configs/ppo_gpu.toml
    torchrun --nproc_per_node 8 -m rlhf_book.cli pipeline --config configs/ppo_gpu.toml   # N processes, DDP

Under a launcher each process trains on its share of every global batch (README, "Scaling out");
only the main process prints and writes the outputs.

The algorithms are one table, :data:`ALGORITHMS` (name -> config class, trainer, the data it needs);
parsing, ``options``, the help and the dispatch all read it. ``pipeline`` runs the on-policy ones
(base LM -> reward -> RL); ``train NAME`` runs any one stage.

A config is TOML (or JSON), one table per section, in one of two layouts:

* the book's world, ``[pipeline]`` (:class:`PipelineConfig`: preset, algorithm, reward, critic,
  iterations, ...) plus the algorithm's table (``[ppo]``, ``[a2c]``, ``[grpo]``, ...);
* any starting point: ``[run]`` (:class:`RunConfig`: algorithm, iterations / epochs, out_dir),
  ``[model]`` (:class:`ModelConfig`: a preset or a local model directory, ``dtype``, ``lora``),
  ``[data]`` (:class:`DataConfig`: prompt, preference and SFT files, the held-out split),
  ``[reward]`` (:class:`RewardConfig`: ``"model"``, ``"gold"``, a reward-model directory or a
  Python function ``module:function`` / ``path/to/file.py:function``) and the algorithm's table
  (``[sft]``, ``[dpo]``, ``[grpo]``, ...; the reward-model stage's is ``[reward_model]``).

``--TABLE.FIELD VALUE`` on the command line overrides a field of any table (VALUE is read as a
TOML value: ``0.1``, ``true``, ``"head"``; ``none`` is None). The output directory receives
``run_config.json`` (the resolved config), ``metrics.jsonl`` (one line per step, written as the run
goes), ``history.json``, ``diagnostics.png``, ``samples.jsonl`` (held-out responses after training,
with their scores), ``policy/`` (the trained policy and its tokenizer, ``save_pretrained`` format;
the reward stage writes ``reward_model/``), ``summary.json`` and the checkpoint. Running the same
command again resumes from the checkpoint; a finished run is not repeated (``--iterations`` /
``--epochs`` extend it); a run whose config was changed since is refused, naming the changed
fields, before anything is written.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import json
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

from .a2c import CHECKPOINT_NAME as A2C_CHECKPOINT
from .a2c import A2CConfig, A2CTrainer
from .base_model import PRESETS, load_base_model, resolve_model_name
from .checkpoint import load_checkpoint
from .config import Config, config_changes, describe, option
from .corpus import prompt_split
from .critic import build_critic
from .critic_free import CriticFreeConfig, CriticFreeTrainer
from .distributed import finish, make_accelerator
from .dpo import CHECKPOINT_NAME as DPO_CHECKPOINT
from .dpo import DPOConfig, DPOTrainer
from .gold import gold_reward_fn
from .ppo import CHECKPOINT_NAME as PPO_CHECKPOINT
from .ppo import PPOConfig, PPOTrainer
from .preferences import load_preference_data, load_preferences, read_jsonl
from .reward_model import (
    evaluate_preferences,
    load_reward_model,
    normalize_reward_model,
    reward_fn_from_model,
    reward_model_from_lm,
    save_reward_model,
    train_reward_model,
)
from .rollout import prompt_texts
from .runtime import check_device, configure_threads, get_device, resolve_dtype, set_seed
from .sft import CHECKPOINT_NAME as SFT_CHECKPOINT
from .sft import SFTConfig, SFTTrainer, load_sft_records
from .tokenizer import format_prompt
from .trainer import METRICS_NAME, RESUMABLE_FIELDS, save_history, write_metrics
from .worlds import canonical_model_name, get_world, split_model_name
from .worlds import load_model as load_world_model

__all__ = [
    "ALGORITHMS",
    "ON_POLICY",
    "PIPELINE_DEFAULTS",
    "RUN_CONFIG_NAME",
    "Algorithm",
    "DataConfig",
    "ModelConfig",
    "PipelineConfig",
    "RewardConfig",
    "RewardModelConfig",
    "RunConfig",
    "load_config",
    "load_function",
    "main",
    "read_prompt_file",
    "run",
    "run_pipeline",
]

RUN_CONFIG_NAME = "run_config.json"  # not HF's "config.json": runs/<name>/policy/ holds that one


# ------------------------------------------------------------------ the reward-model stage's table
@dataclass
class RewardModelConfig(Config):
    """The ``[reward_model]`` table of ``rlhf-book train reward``: Bradley-Terry training of a reward model.

    The model is the ``[model]`` LM with a zero score head (:func:`rlhf_book.reward_model_from_lm`),
    trained by :func:`rlhf_book.train_reward_model` on ``[data] preferences`` (or the preset's
    preference data), then normalised and saved with :func:`rlhf_book.reward_model.save_reward_model`.
    """

    batch_size: int = option(32, "preference pairs per optimizer step", ">= 1")
    lr: float = option(1e-3, "AdamW learning rate (warmup, then linear decay to 0 over all epochs)", "> 0")
    weight_decay: float = option(0.0, "AdamW weight decay", ">= 0")
    warmup_frac: float = option(0.05, "share of the steps spent warming the learning rate up", "[0, 1]")
    margin: float | None = option(None, "a margin m in the Bradley-Terry loss -log sigmoid(r_c - r_r - m) (None: 0)")
    normalize: bool = option(True, "after training, set the score's gain and bias so that the training pairs' replies "
                                   "score mean 0, std 1 (the reward the RL stages see)")
    n_normalize: int = option(512, "pairs whose two replies the normalisation uses", ">= 1")
    seed: int = option(0, "seeds the batch order")
    checkpoint_every: int = option(50, "steps between checkpoints (and metrics.jsonl updates)", ">= 1")
    progress: bool = option(True, "tqdm bar")


# ------------------------------------------------------------------ the registry: one row per algorithm
@dataclass(frozen=True)
class Algorithm:
    """One algorithm of the command line: its config table and class, its trainer, the data it trains on."""

    name: str
    description: str
    config_class: type
    trainer_class: type | None  # None: the reward-model stage (train_reward_model)
    data: str  # "prompts" (on-policy RL), "preferences" (DPO, reward model) or "sft"
    checkpoint: str  # the file in out_dir
    fixed: dict = field(default_factory=dict)  # config fields the name fixes (advantage = "grpo")
    table: str = ""  # its table in a config file (default: the name)
    reference: bool = True  # needs a frozen reference policy

    @property
    def section(self) -> str:
        return self.table or self.name

    @property
    def on_policy(self) -> bool:
        return self.data == "prompts"

    def build_config(self, table: dict, progress: bool | None = None):
        """The config object of a table (the name's fixed fields set; ValueError naming a contradicting one)."""
        table = dict(table)
        for k, v in self.fixed.items():
            if table.get(k, v) != v:
                raise ValueError(f"{k} = {table[k]!r} contradicts the algorithm {self.name!r} ({k} = {v!r}); "
                                 f"use `rlhf-book train {table[k]}` or drop the field")
            table[k] = v
        if progress is not None:
            table["progress"] = progress
        return self.config_class.from_dict(table)


_DATA_HELP = {
    "prompts": "[data] prompts: JSONL records with 'prompt' (a string or chat messages) or a text file, one a line",
    "preferences": "[data] preferences: JSONL records with 'prompt', 'chosen', 'rejected' (TRL's names)",
    "sft": "[data] sft: JSONL records {'prompt', 'completion'} or {'messages': [...]} (TRL's names)",
}

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("sft", "supervised fine-tuning on demonstrations", SFTConfig, SFTTrainer, "sft", SFT_CHECKPOINT,
              reference=False),
    Algorithm("reward", "a Bradley-Terry reward model from preference pairs", RewardModelConfig, None, "preferences",
              "reward_state.pt", table="reward_model", reference=False),
    Algorithm("ppo", "PPO with a critic (chapter 5)", PPOConfig, PPOTrainer, "prompts", PPO_CHECKPOINT),
    Algorithm("a2c", "advantage actor-critic (chapter 4)", A2CConfig, A2CTrainer, "prompts", A2C_CHECKPOINT),
    Algorithm("reinforce", "REINFORCE with a running-mean baseline, no critic (chapter 7)", CriticFreeConfig,
              CriticFreeTrainer, "prompts", "reinforce_state.pt", {"advantage": "reinforce"}),
    Algorithm("rloo", "RLOO: leave-one-out baseline over K samples (chapter 7)", CriticFreeConfig, CriticFreeTrainer,
              "prompts", "rloo_state.pt", {"advantage": "rloo"}),
    Algorithm("grpo", "GRPO: group-normalised advantages over K samples (chapter 7)", CriticFreeConfig,
              CriticFreeTrainer, "prompts", "grpo_state.pt", {"advantage": "grpo"}),
    Algorithm("dpo", "direct preference optimisation on preference pairs (chapter 6)", DPOConfig, DPOTrainer,
              "preferences", DPO_CHECKPOINT),
)}
ON_POLICY = tuple(n for n, a in ALGORITHMS.items() if a.on_policy)


def _algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}{_did_you_mean([name], ALGORITHMS)}")
    return ALGORITHMS[name]


def _did_you_mean(bad: list[str], known) -> str:
    hints = [f"{b!r} -> {m[0]!r}" for b in bad if (m := difflib.get_close_matches(b, list(known), n=1))]
    return f"; did you mean {', '.join(hints)}?" if hints else f"; known: {sorted(known)}"


# ------------------------------------------------------------------ the tables
@dataclass
class PipelineConfig(Config):
    """The ``[pipeline]`` table: the book's world (a preset), which on-policy algorithm, how long to train."""

    preset: str = option("cpu", "base LM: a preset (tiny / cpu / gpu), a saved model directory, or (reward = 'gold') "
                                "a hub name")
    algorithm: str = option("ppo", "the RL algorithm; its fields are the table of the same name", choices=ON_POLICY)
    reward: str = option("model", "'model': the learned reward model of the preset; 'gold': optimise the gold reward "
                                  "itself", choices=("model", "gold"))
    critic: str | None = option(None, "'head' (value head on the policy), 'separate' (a copy of the policy's trunk) "
                                      "or 'reward_model' (a separate critic initialised from the RM); ppo and a2c "
                                      "only; None: the algorithm's default ('separate')",
                                choices=("head", "separate", "reward_model"))
    iterations: int = option(60, "RL iterations (a larger number continues a finished run)", ">= 1")
    out_dir: str | None = option(None, "output directory (default: runs/<config file name>)")
    prompts: str | None = option(None, "the reader's prompt file (JSONL with 'prompt', or one prompt per line); "
                                       "None: the book's prompts")
    n_eval: int = option(32, "held-out prompts (the book's split takes n_eval // 6 per domain, at least 1)", ">= 1")
    split_seed: int = option(0, "seed of the train / held-out prompt split")
    gold: bool = option(True, "log the book's gold reward beside the proxy (it knows only the book's world)")
    n_samples: int = option(8, "held-out samples written to samples.jsonl", ">= 0")
    device: str | None = option(None, "default: rlhf_book.get_device()")
    threads: int | None = option(None, "torch intra-op threads (default: rlhf_book.configure_threads())", ">= 1")

    def check(self) -> None:
        if self.critic == "reward_model" and self.reward != "model":
            raise ValueError("[pipeline] critic = 'reward_model' needs reward = 'model'")
        if self.critic is not None and ALGORITHMS[self.algorithm].config_class is CriticFreeConfig:
            raise ValueError(f"[pipeline] critic = {self.critic!r}: {self.algorithm} has no critic (leave critic out)")
        resolve_model_name(self.preset)  # a typo of a preset fails here, before anything is built
        if self.reward == "model" and self.preset not in PRESETS:
            raise ValueError(f"[pipeline] reward = 'model' needs one of the presets {', '.join(PRESETS)} (its reward "
                             f"model is built from the preset's data), got preset = {self.preset!r}")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ValueError(f"[pipeline] prompts: file {self.prompts} does not exist")
        _check_device_name(self.device, "pipeline")


PIPELINE_DEFAULTS = {f.name: f.default for f in fields(PipelineConfig)}


@dataclass
class RunConfig(Config):
    """The ``[run]`` table: which algorithm, how long, where the outputs go."""

    algorithm: str | None = option(None, "the algorithm; its fields are its own table ([reward_model] for 'reward'); "
                                         "`rlhf-book train NAME` names it instead", choices=tuple(ALGORITHMS))
    iterations: int = option(60, "RL iterations (ppo, a2c, reinforce, rloo, grpo); a larger number continues a "
                                 "finished run", ">= 1")
    epochs: float = option(1.0, "passes over the records (sft, dpo: may be fractional; reward: whole epochs); a "
                                "larger number continues a finished run", "> 0")
    out_dir: str | None = option(None, "output directory (default: runs/<config file name>)")
    n_samples: int = option(8, "held-out samples written to samples.jsonl", ">= 0")
    device: str | None = option(None, "default: rlhf_book.get_device()")
    threads: int | None = option(None, "torch intra-op threads (default: rlhf_book.configure_threads())", ">= 1")

    def check(self) -> None:
        _check_device_name(self.device, "run")


LORA_KEYS = {"r": "rank (default 8)", "alpha": "lora_alpha (default 16)",
             "target_modules": "module names or 'all-linear' (default: peft's choice for the architecture)",
             "dropout": "lora_dropout (default 0.0)"}


@dataclass
class ModelConfig(Config):
    """The ``[model]`` table: the starting point (the book's preset or any local model directory)."""

    path: str = option("cpu", "a preset of the book's world (tiny / cpu / gpu: built and cached on first use), a "
                              "world's policy 'WORLD:PRESET' (e.g. 'arithmetic:tiny', rlhf_book.worlds; its prompts "
                              "are the default [data] prompts) or a local directory saved with save_pretrained (any "
                              "causal LM)")
    dtype: str = option("auto", "dtype of the loaded weights: 'auto' (the checkpoint's own), 'float32', 'bfloat16', "
                                "'float16' (trainable weights are held in fp32 unless [ALGO] trainable_dtype = 'keep')")
    lora: dict | None = option(None, "LoRA adapters instead of full-weight training, e.g. {r = 8, alpha = 16, "  # noqa: RUF009
                                     "target_modules = ['q_proj', 'v_proj'], dropout = 0.0} (needs peft); the "
                                     "reference is then the model with its adapters disabled")

    def check(self) -> None:
        if split_model_name(self.path) is None:  # 'WORLD:PRESET' is checked by the registry
            resolve_model_name(self.path)
        resolve_dtype(self.dtype, "[model] dtype")
        if self.lora is not None:
            bad = sorted(set(self.lora) - set(LORA_KEYS))
            if bad:
                raise ValueError(f"[model] lora: unknown key(s) {bad}{_did_you_mean(bad, LORA_KEYS)}")
            r, alpha, dropout = self.lora.get("r", 8), self.lora.get("alpha", 16), self.lora.get("dropout", 0.0)
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"[model] lora: r must be an integer >= 1, got {r!r}")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
                raise ValueError(f"[model] lora: alpha must be a number > 0, got {alpha!r}")
            if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
                raise ValueError(f"[model] lora: dropout must be a number in [0, 1), got {dropout!r}")
            mods = self.lora.get("target_modules")
            if mods is not None and not (isinstance(mods, str) or (isinstance(mods, list) and mods
                                                                     and all(isinstance(m, str) for m in mods))):
                raise ValueError(f"[model] lora: target_modules must be a list of module names or 'all-linear', "
                                 f"got {mods!r}")
            if importlib.util.find_spec("peft") is None:
                raise ValueError("[model] lora needs peft: pip install 'rlhf-book[peft]'")


@dataclass
class DataConfig(Config):
    """The ``[data]`` table: the records to train on (files in TRL's formats), and the held-out split."""

    prompts: str | None = option(None, "prompt file for the RL algorithms: JSONL records with 'prompt' (a string or "
                                       "chat messages) or a text file, one prompt a line. None: the book's prompts "
                                       "(a preset only)")
    preferences: str | None = option(None, "preference JSONL for dpo and reward: 'prompt', 'chosen', 'rejected'. "
                                           "None: the preset's preference data")
    sft: str | None = option(None, "SFT JSONL for sft: {'prompt', 'completion'} or {'messages': [...]}. None: the "
                                   "preset's preference data, prompt -> chosen reply")
    n_eval: int = option(32, "held out from the file (prompts or records; at most half of them); the book's prompt "
                             "split takes n_eval // 6 per domain", ">= 1")
    split_seed: int = option(0, "seed of the train / held-out split")
    max_records: int | None = option(None, "train on at most this many records (a seeded sample; None: all)", ">= 1")

    def check(self) -> None:
        for name in ("prompts", "preferences", "sft"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"[data] {name}: file {value} does not exist")


@dataclass
class RewardConfig(Config):
    """The ``[reward]`` table: what the RL algorithms optimise (and what scores held-out samples of sft / dpo)."""

    source: str | None = option(None, "'model': the preset's learned reward model; 'gold': the book's gold reward; a "
                                      "reward-model directory (rlhf-book train reward writes one); or a Python "
                                      "function (prompts, responses, terminated) -> scores named 'module:function' "
                                      "or 'path/to/file.py:function'. None: 'model' with a preset, else nothing "
                                      "(the RL algorithms need one)")
    normalize: bool = option(True, "a reward-model directory's score is normalised by its saved gain and bias")
    gold: bool = option(False, "also log the book's gold reward (it knows only the book's world)")

    def check(self) -> None:
        if self.source is not None:
            reward_kind(self.source)


# what may change when a run is continued, per table (an algorithm's table: RESUMABLE_FIELDS)
RESUMABLE_KEYS = {
    "pipeline": frozenset({"iterations", "out_dir", "n_samples", "threads", "device"}),
    "run": frozenset({"iterations", "epochs", "out_dir", "n_samples", "threads", "device"}),
    "model": frozenset(), "data": frozenset(), "reward": frozenset(),
}
RESUMABLE_PIPELINE_KEYS = RESUMABLE_KEYS["pipeline"]
LAYOUT = {"run": RunConfig, "model": ModelConfig, "data": DataConfig, "reward": RewardConfig}


def _check_device_name(device: str | None, table: str) -> None:
    if device is not None:
        try:
            check_device(device, available=False)  # availability is checked when the run starts
        except ValueError as e:
            raise ValueError(f"[{table}] {e}") from None


# ------------------------------------------------------------------ a reward function named in the config
_FUNCTIONS: dict[str, object] = {}


def reward_kind(source: str) -> str:
    """'model', 'gold', 'dir' (a reward-model directory) or 'function' ('module:function'); ValueError otherwise."""
    if source in ("model", "gold"):
        return source
    if os.path.isdir(source):
        return "dir"
    if ":" in source:
        load_function(source)  # an import error or a non-function fails now, before anything is built
        return "function"
    raise ValueError(f"[reward] source = {source!r}: not 'model', 'gold', an existing reward-model directory nor a "
                     f"Python function 'module:function' / 'path/to/file.py:function'")


def load_function(spec: str, what: str = "[reward] source"):
    """The function named ``module:function`` or ``path/to/file.py:function``; ValueError naming ``what`` if it cannot.

    A module is imported as Python would (the working directory is searched too); a file is run
    as a module of its own. Each is imported once per process.
    """
    if spec in _FUNCTIONS:
        return _FUNCTIONS[spec]
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise ValueError(f"{what} = {spec!r}: write a function as 'module:function' or 'path/to/file.py:function'")
    is_file = module_name.endswith(".py") or "/" in module_name or os.sep in module_name
    try:
        if is_file:
            path = Path(module_name)
            if not path.is_file():
                raise ValueError(f"{what} = {spec!r}: no such file {path}")
            name = f"rlhf_book_user_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:  # the console script does not search it
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001  (ImportError, SyntaxError, whatever the module raises on import)
        raise ValueError(f"{what} = {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    fn = module
    for part in func_name.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"{what} = {spec!r}: {module_name!r} has no {func_name!r}"
                             f"{_did_you_mean([part], [n for n in dir(fn) if not n.startswith('_')])}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{what} = {spec!r}: {func_name!r} is a {type(fn).__name__}, not a function "
                         f"(prompts, responses, terminated) -> scores")
    _FUNCTIONS[spec] = fn
    return fn


# ------------------------------------------------------------------ files
MAX_PROMPT_CHARS = 100_000  # a longer line is refused before it is tokenised (a 10 MB line took minutes per batch)


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file (a BOM is dropped); ValueError naming the file and the line of a byte that is not UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: the {what} is not valid UTF-8 (byte 0x{data[start]:02x}: {e.reason}); "
                         f"save it as UTF-8") from None


def prompt_file_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, prompt) of every prompt in a JSONL file (records with ``prompt``) or a text file (one a line).

    ValueError naming the file and line of a malformed record, a prompt over
    :data:`MAX_PROMPT_CHARS` characters or bytes that are not UTF-8. Blank lines are skipped.
    """
    path = Path(path)
    lines = [(i, line) for i, line in enumerate(read_text_file(path, "prompt file").splitlines(), 1) if line.strip()]
    for i, line in lines:
        if len(line) > MAX_PROMPT_CHARS:
            raise ValueError(f"{path} line {i}: {len(line):,} characters, longer than the {MAX_PROMPT_CHARS:,} a "
                             f"prompt may have")
    if path.suffix != ".jsonl":
        return lines
    out = []
    for i, record in read_jsonl(path, "prompt"):
        try:
            (prompt,) = prompt_texts([record])
        except ValueError as e:
            raise ValueError(f"{path} line {i}: {str(e).removeprefix('prompts[0]').lstrip(': ')}") from None
        out.append((i, prompt))
    return out


def read_prompt_file(path: str | Path) -> list[str]:
    """The distinct prompts of a JSONL file (records with a ``prompt`` field) or a text file (one prompt per line).

    Duplicates are dropped (first one kept); fewer than 2 distinct prompts (one to train on,
    one held out) is a ValueError naming the file. See :func:`prompt_file_lines` for the rest.
    """
    lines = prompt_file_lines(path)
    out = list(_distinct(p for _, p in lines).values())
    if len(out) < 2:
        dup = f" ({len(lines)} lines, duplicates removed)" if len(lines) > len(out) else ""
        raise ValueError(f"{path}: needs at least 2 distinct prompts (training and held-out), found {len(out)}{dup}")
    return out


def _distinct(prompts) -> dict:
    """{key: prompt} of the distinct prompts in first-seen order (a list of chat messages keyed by its JSON)."""
    out: dict = {}
    for p in prompts:
        out.setdefault(p if isinstance(p, str) else json.dumps(p, sort_keys=True), p)
    return out


def check_prompt_lengths(path: str | Path, tokenizer, max_new_tokens: int) -> None:
    """ValueError naming the file and line of the first prompt that leaves no room for ``max_new_tokens`` replies."""
    ctx = tokenizer.model_max_length
    limit = ctx - max_new_tokens
    for i, prompt in prompt_file_lines(path):
        n = len(tokenizer(format_prompt(prompt, tokenizer))["input_ids"])
        if n > limit:
            raise ValueError(f"{path} line {i}: the prompt is {n} tokens; the model's context of {ctx} minus "
                             f"max_new_tokens={max_new_tokens} allows at most {limit}")


def _train_eval_split(prompts: list[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: a seeded shuffle, the last ``n_eval`` held out (at most half of them)."""
    distinct = _distinct(prompts)
    order = [distinct[k] for k in sorted(distinct)]
    if len(order) < 2:
        raise ValueError(f"needs at least 2 distinct prompts (training and held-out), found {len(order)}")
    random.Random(seed).shuffle(order)
    k = min(n_eval, len(order) // 2)
    return order[:-k], order[-k:]


def _read_table_file(path: Path) -> dict:
    """Parse a TOML or JSON file; ValueError naming the file on a syntax error."""
    text = read_text_file(path, "config file")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if tomllib is None:
        raise ValueError(f"{path}: reading TOML needs Python >= 3.11 (or `pip install tomli`); use a .json config")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None


def _parse_value(text: str):
    """A command-line value read as TOML (``0.1``, ``true``, ``"head"``); ``none`` is None; anything else a string."""
    if text.strip().lower() in ("none", "null"):
        return None
    if tomllib is None:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict[str, dict]:
    """``["--ppo.kl_coef", "0.1", ...]`` -> ``{"ppo": {"kl_coef": 0.1}}``; ValueError naming a malformed argument."""
    out: dict[str, dict] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if not key.startswith("--") or "." not in key:
            raise ValueError(f"unrecognised argument {arg!r}: overrides are written --TABLE.FIELD VALUE, e.g. --ppo.kl_coef 0.1")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"{arg} needs a value")
            value, i = args[i + 1], i + 1
        table, field_name = key[2:].split(".", 1)
        out.setdefault(table, {})[field_name] = _parse_value(value)
        i += 1
    return out


# ------------------------------------------------------------------ reading a config
def load_config(path: str | Path, overrides: dict[str, dict] | None = None, algorithm: str | None = None) -> dict:
    """Read a TOML or JSON config into its tables, overrides applied, every value checked; ValueError naming the file.

    ``algorithm`` (``rlhf-book train NAME``) names the algorithm; the file may name it too
    (``[pipeline]`` / ``[run] algorithm``), and then the two must agree. The result has the
    layout tables filled with their defaults and the algorithm's table as written.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config {path} is a directory, not a file")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    raw = _read_table_file(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected tables [pipeline] and [ppo] (or [a2c]), got a {type(raw).__name__}; "
                         "or the layout [run], [model], [data], [reward] and the algorithm's table")
    for table, value in raw.items():
        if not isinstance(value, dict):
            raise ValueError(f"{path}: [{table}] must be a table of key = value lines, got {value!r}")
    for table, values in (overrides or {}).items():  # command-line --TABLE.FIELD VALUE
        raw[table] = {**raw.get(table, {}), **values}
    try:
        tables = _resolve_tables(raw, algorithm, default_out=str(Path("runs") / path.stem))
        _plan(tables)  # cross-table rules (the data and the reward an algorithm needs) are checked now too
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return tables


def _named_algorithm(given: str | None, table: dict, where: str, default: str | None) -> str:
    written = table.get("algorithm")
    if given is not None and written is not None and written != given:
        raise ValueError(f"{where} algorithm = {written!r} but the command says {given!r}: change one of them")
    name = given or written or default
    if name is None:
        raise ValueError(f"no algorithm: set {where} algorithm, or run `rlhf-book train NAME` "
                         f"(NAME: {', '.join(ALGORITHMS)})")
    _algorithm(name)
    return name


def _checked_table(cls, table: str, values: dict, prefix: bool = True) -> dict:
    """``asdict(cls(**values))``; ValueError naming an unknown key (with the closest) or a bad value, with ``[table]``."""
    known = {f.name for f in fields(cls)}
    bad = sorted(set(values) - known)
    if bad:
        raise ValueError(f"unknown [{table}] key(s) {bad}{_did_you_mean(bad, known)}")
    try:
        return asdict(cls(**values))
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if not prefix or msg.startswith("[") else f"[{table}] {msg}") from None


def _resolve_tables(raw: dict, algorithm: str | None, default_out: str) -> dict:
    """The config's tables, checked: ``{"pipeline": {...}, ALGO: {...}}`` or ``{"run", "model", "data", "reward", TABLE}``."""
    if "pipeline" in raw:  # the book's world
        mixed = sorted(set(raw) & set(LAYOUT))
        if mixed:
            raise ValueError(f"[pipeline] and {', '.join(f'[{t}]' for t in mixed)} are two layouts: use [pipeline] "
                             "(the book's world) or [run], [model], [data], [reward]")
        pipe = dict(raw["pipeline"])
        name = _named_algorithm(algorithm, pipe, "[pipeline]", PIPELINE_DEFAULTS["algorithm"])
        if name not in ON_POLICY:
            raise ValueError(f"[pipeline] runs the on-policy algorithms ({', '.join(ON_POLICY)}); {name} trains on "
                             f"records: write its config with [run], [model], [data] (e.g. configs/{name}_tiny.toml)")
        pipe["algorithm"] = name
        spec = ALGORITHMS[name]
        unknown = sorted(set(raw) - {"pipeline", spec.section})
        if unknown:
            raise ValueError(f"unknown table(s) {unknown}; expected [pipeline] and [{spec.section}] "
                             "(the second table is named after [pipeline] algorithm)")
        if pipe.get("out_dir") is None:
            pipe["out_dir"] = default_out
        tables = {"pipeline": _checked_table(PipelineConfig, "pipeline", pipe, prefix=False)}
    else:
        run_table = dict(raw.get("run", {}))
        name = _named_algorithm(algorithm, run_table, "[run]", None)
        run_table["algorithm"] = name
        spec = ALGORITHMS[name]
        unknown = sorted(set(raw) - set(LAYOUT) - {spec.section})
        if unknown:
            raise ValueError(f"unknown table(s) {unknown}; expected [run], [model], [data], [reward] and "
                             f"[{spec.section}] (the algorithm's own){_did_you_mean(unknown, [*LAYOUT, spec.section])}")
        if run_table.get("out_dir") is None:
            run_table["out_dir"] = default_out
        tables = {t: _checked_table(cls, t, run_table if t == "run" else dict(raw.get(t, {})))
                  for t, cls in LAYOUT.items()}
    algo_table = dict(raw.get(spec.section, {}))
    try:
        spec.build_config(algo_table)
    except ValueError as e:
        raise ValueError(f"[{spec.section}] {e}") from None
    tables[spec.section] = algo_table
    return tables


@dataclass
class _Plan:
    """Everything a run needs, read from either layout (one code path for both)."""

    spec: Algorithm
    cfg: object  # the algorithm's config
    record: dict  # the tables as resolved: run_config.json and the checkpoint's run_record
    model: str
    dtype: str
    lora: dict | None
    critic: str | None  # 'reward_model': a critic initialised from the reward model ([pipeline] only)
    reward: str | None
    normalize: bool
    gold: bool
    prompts: str | None
    preferences: str | None
    sft: str | None
    n_eval: int
    split_seed: int
    max_records: int | None
    iterations: int
    epochs: float
    out: Path
    n_samples: int
    device: str | None
    threads: int | None

    @property
    def book(self) -> bool:
        """Whether the model is a preset of the book's world (its prompts, preference data and reward model exist)."""
        return self.model in PRESETS

    @property
    def world(self):
        """The :class:`rlhf_book.worlds.World` of a model named 'WORLD:PRESET', else None."""
        parts = split_model_name(self.model)
        return get_world(parts[0]) if parts is not None else None


def _plan(tables: dict, iterations: int | None = None, epochs: float | None = None, progress: bool = True) -> _Plan:
    """A :class:`_Plan` from :func:`load_config`'s tables (``iterations`` / ``epochs``: the command line's)."""
    if "pipeline" in tables:
        pipe = dict(tables["pipeline"])
        if epochs is not None:
            raise ValueError("--epochs is for sft, dpo and reward; an RL run counts --iterations")
        if iterations is not None:
            pipe["iterations"] = iterations
        pipe = asdict(PipelineConfig(**pipe))  # checks an --iterations override too
        spec = ALGORITHMS[pipe["algorithm"]]
        table = dict(tables.get(spec.section, {}))
        if spec.config_class is not CriticFreeConfig and pipe["critic"] in ("head", "separate"):
            if table.get("critic", pipe["critic"]) != pipe["critic"]:  # the trainer builds these; [pipeline] decides
                raise ValueError(f"[pipeline] critic = {pipe['critic']!r} but [{spec.section}] critic = "
                                 f"{table['critic']!r}: set one of them")
            table["critic"] = pipe["critic"]
        head = {"pipeline": pipe}
        values = {"model": pipe["preset"], "dtype": "auto", "lora": None, "critic": pipe["critic"],
                  "reward": pipe["reward"], "normalize": True, "gold": pipe["gold"], "prompts": pipe["prompts"],
                  "preferences": None, "sft": None, "n_eval": pipe["n_eval"], "split_seed": pipe["split_seed"],
                  "max_records": None, "iterations": pipe["iterations"], "epochs": 1.0, "out": Path(pipe["out_dir"]),
                  "n_samples": pipe["n_samples"], "device": pipe["device"], "threads": pipe["threads"]}
    else:
        run_t = dict(tables["run"])
        spec = ALGORITHMS[run_t["algorithm"]]
        if iterations is not None:
            if not spec.on_policy:
                raise ValueError(f"{spec.name} counts epochs: use --epochs, not --iterations")
            run_t["iterations"] = iterations
        if epochs is not None:
            if spec.on_policy:
                raise ValueError(f"{spec.name} counts iterations: use --iterations, not --epochs")
            run_t["epochs"] = epochs
        run_t = asdict(RunConfig(**run_t))
        model, data, reward = tables["model"], tables["data"], tables["reward"]
        table = dict(tables.get(spec.section, {}))
        head = {"run": run_t, "model": model, "data": data, "reward": reward}
        values = {"model": model["path"], "dtype": model["dtype"], "lora": model["lora"], "critic": None,
                  "reward": reward["source"], "normalize": reward["normalize"], "gold": reward["gold"],
                  "prompts": data["prompts"], "preferences": data["preferences"], "sft": data["sft"],
                  "n_eval": data["n_eval"], "split_seed": data["split_seed"], "max_records": data["max_records"],
                  "iterations": run_t["iterations"], "epochs": run_t["epochs"], "out": Path(run_t["out_dir"]),
                  "n_samples": run_t["n_samples"], "device": run_t["device"], "threads": run_t["threads"]}
    try:
        cfg = spec.build_config(table, progress)
    except ValueError as e:
        raise ValueError(f"[{spec.section}] {e}") from None
    record = {**head, spec.section: {k: v for k, v in asdict(cfg).items() if k != "progress"}}
    plan = _Plan(spec=spec, cfg=cfg, record=record, **values)
    _check_plan(plan)
    return plan


def _check_plan(plan: _Plan) -> None:
    """The rules between tables: each algorithm's data and reward exist for this starting point."""
    spec, where = plan.spec, "[pipeline]" if "pipeline" in plan.record else "[data]"
    plan.model = canonical_model_name(plan.model)  # 'reviews:cpu' is the preset 'cpu'
    if plan.world is not None:  # another world's policy: its prompts, its gold reward, no reward model
        if plan.reward is None and spec.on_policy:
            raise ValueError(f"[reward] source: {spec.name} on the {plan.world.name} world needs a reward: 'gold' "
                             f"(the world's own) or a Python function 'module:function'")
        if plan.reward == "model":
            raise ValueError(f"[reward] source = 'model': the {plan.world.name} world has no reward model; use "
                             f"'gold' (the world's own reward) or a Python function 'module:function'")
        if spec.data == "prompts" and plan.prompts is None:
            return
    if plan.reward is None and spec.on_policy:
        if not plan.book:
            raise ValueError(f"[reward] source: {spec.name} needs a reward: a reward-model directory or a Python "
                             f"function 'module:function' ('model' needs a preset of the book's world)")
        plan.reward = "model"
    if plan.reward == "model" and not plan.book and (spec.on_policy or "pipeline" not in plan.record):
        raise ValueError(f"[reward] source = 'model' is the reward model of a preset ({', '.join(PRESETS)}), and "
                         f"[model] path = {plan.model!r} is not one: give a reward-model directory or 'module:function'")
    if spec.data == "prompts" and plan.prompts is None and not plan.book:
        raise ValueError(f"{where} prompts: {spec.name} needs a prompt file when the model is not a preset")
    if spec.data == "preferences" and plan.preferences is None and not plan.book:
        raise ValueError(f"[data] preferences: {spec.name} needs a preference file when the model is not a preset")
    if spec.data == "sft" and plan.sft is None and not plan.book:
        raise ValueError("[data] sft: sft needs an SFT record file when the model is not a preset")
    if spec.name == "reward" and plan.epochs != int(plan.epochs):
        raise ValueError(f"[run] epochs = {plan.epochs}: the reward model trains whole epochs")
# ------------------------------------------------------------------ resuming
def _table_defaults(table: str) -> dict:
    """Each field's default of a table (empty for a table this version does not know)."""
    cls = {"pipeline": PipelineConfig, **LAYOUT, **{a.section: a.config_class for a in ALGORITHMS.values()}}.get(table)
    return {f.name: f.default for f in fields(cls)} if cls is not None else {}


def _check_out_dir(out: Path) -> None:
    """ValueError unless ``out`` is a directory or can become one (not a file, not under a file)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"out_dir {out}: {p} is a file, not a directory; choose another out_dir (--out)")
            break


def _check_resume(out: Path, record: dict, checkpoint_name: str) -> None:
    """Refuse to continue a run in ``out`` whose recorded config differs (beyond what may change on resume).

    Checked before anything is written. The record is ``run_config.json``; without it (a
    checkpoint made by the Python API, or copied by hand), the record the checkpoint carries
    (``run_record``, written by this command) or else its algorithm table alone. (The reward
    stage's checkpoint carries no config: only its ``run_config.json`` is checked.)
    """
    saved_path = out / RUN_CONFIG_NAME
    if not (out / checkpoint_name).exists():
        return
    if saved_path.exists():
        try:
            saved = json.loads(read_text_file(saved_path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{saved_path}: unreadable ({e}); it records the run's config, so the run cannot be "
                             f"checked and continued: start a new run in another out_dir (--out)") from None
    else:
        state = load_checkpoint(out / checkpoint_name)
        if "run_record" not in state and "config" not in state:
            return
        algo = list(record)[-1]  # the algorithm's table comes last
        saved = state.get("run_record") or {algo: state.get("config", {})}
        record = {t: record[t] for t in saved if t in record}
    changed = []
    for table in sorted((set(saved) | set(record)) - {"threads_used", "processes"}):
        allowed = RESUMABLE_KEYS.get(table, RESUMABLE_FIELDS)
        changed += [f"[{table}] {c}" for c in config_changes(saved.get(table, {}), record.get(table, {}), allowed,
                                                             _table_defaults(table))]
    if changed:
        raise ValueError(
            f"{out} holds a run made with another config ({'; '.join(changed)}). Put those values back to continue "
            f"it, or give the changed config another out_dir (--out) to start a new run."
        )


# ------------------------------------------------------------------ data
def _prompts(plan: _Plan) -> tuple[list, list]:
    """(train, held-out) prompts: the reader's file split by ``split_seed``, or the book's split."""
    if plan.prompts is not None:
        return _train_eval_split(read_prompt_file(plan.prompts), plan.n_eval, plan.split_seed)
    if plan.world is not None:  # a world's own train prompts and held-out prompts
        return (plan.world.prompts("train", seed=plan.split_seed),
                plan.world.prompts("eval", n=plan.n_eval, seed=plan.split_seed))
    return prompt_split(plan.split_seed, plan.n_eval)


def _split_records(records: list, n_eval: int, seed: int, path) -> tuple[list, list]:
    """(train, held-out) records: a seeded shuffle, the last ``n_eval`` held out (at most half of them)."""
    if len(records) < 2:
        raise ValueError(f"{path}: needs at least 2 records (training and held-out), found {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = min(n_eval, len(records) // 2)
    return [records[i] for i in order[:-k]], [records[i] for i in order[-k:]]


def _records(plan: _Plan, progress: bool) -> tuple[list, list, list]:
    """(train records, held-out records, held-out prompts) of an offline stage (sft, dpo, reward).

    From the config's file (checked record by record, errors naming the line; split by
    ``split_seed``), or in the book's world the preset's preference data (its validation
    split held out; SFT learns each prompt's chosen reply). Held-out prompts: the book's
    held-out prompts, or the distinct prompts of the held-out records.
    """
    path = plan.sft if plan.spec.data == "sft" else plan.preferences
    if path is not None:
        records = load_sft_records(path) if plan.spec.data == "sft" else load_preferences(path)
        train, held = _split_records(records, plan.n_eval, plan.split_seed, path)
        eval_prompts = list(_distinct(r["prompt"] if "prompt" in r else r["messages"][:-1] for r in held).values())
    else:
        data = load_preference_data(plan.model, progress=progress)
        train, held = data["train"], data["validation"]
        if plan.spec.data == "sft":  # demonstrations: the preferred reply of each pair that ended
            train, held = ([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows
                            if r.get("chosen_terminated", True)] for rows in (train, held))
        eval_prompts = prompt_split(plan.split_seed, plan.n_eval)[1]
    if plan.max_records is not None and len(train) > plan.max_records:
        keep = sorted(random.Random(plan.split_seed + 1).sample(range(len(train)), plan.max_records))
        train = [train[i] for i in keep]
    return train, held, prompt_texts(eval_prompts)[: plan.n_eval]


# ------------------------------------------------------------------ models and rewards
def _with_lora(model, lora: dict, task_type: str | None = None):
    """``peft.get_peft_model(model, LoraConfig(...))`` from the ``[model] lora`` table."""
    from peft import LoraConfig, get_peft_model

    kwargs = {"r": lora.get("r", 8), "lora_alpha": lora.get("alpha", 16), "lora_dropout": lora.get("dropout", 0.0),
              "target_modules": lora.get("target_modules")}
    if task_type is not None:
        kwargs["task_type"] = task_type
    try:
        return get_peft_model(model, LoraConfig(**kwargs))
    except ValueError as e:  # e.g. target modules that the architecture does not have
        raise ValueError(f"[model] lora: {e}") from None


def _reward_fn(plan: _Plan, device, progress: bool, own_prompts):
    """(reward function or None, the reward model behind it or None) as ``plan.reward`` says."""
    if plan.reward is None:
        return None, None
    kind = reward_kind(plan.reward)
    if kind == "model":
        rm, rm_tok = load_reward_model(plan.model, device=device, progress=progress, prompts=own_prompts)
        return reward_fn_from_model(rm, rm_tok), rm
    if kind == "gold":
        return (plan.world.gold_fn if plan.world is not None else gold_reward_fn), None
    if kind == "dir":
        rm, rm_tok = load_reward_model(plan.reward, device=device)
        return reward_fn_from_model(rm, rm_tok, normalize=plan.normalize), rm
    return load_function(plan.reward), None


def _load_lm(name: str, device=None, progress: bool = True, dtype="auto"):
    """(model, tokenizer): a world's policy for 'WORLD:PRESET' (rlhf_book.worlds), else :func:`load_base_model`."""
    load = load_world_model if split_model_name(name) is not None else load_base_model
    return load(name, device=device, progress=progress, dtype=dtype)


# ------------------------------------------------------------------ a run
def run(config: dict, iterations: int | None = None, epochs: float | None = None, progress: bool = True) -> dict:
    """Train as ``config`` (from :func:`load_config`) says, in its ``out_dir``; returns a summary dict.

    ``iterations`` (RL) / ``epochs`` (sft, dpo, reward) override the config's: a larger number
    continues a finished run. The run is checked against the one already in ``out_dir`` before
    anything is written.
    """
    plan = _plan(config, iterations, epochs, progress)
    spec, out = plan.spec, plan.out
    _check_out_dir(out)
    _check_resume(out, plan.record, spec.checkpoint)  # before run_config.json is (re)written
    device = get_device(plan.device)  # an unavailable device fails here, before anything is written
    # one process (python), or N under `accelerate launch` / `torchrun`: then each has its own device
    accelerator = make_accelerator(device)
    if accelerator.num_processes > 1:
        if spec.trainer_class is None:
            raise ValueError("the reward-model stage runs in one process: start it without a launcher")
        device = accelerator.device
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
    if spec.on_policy:  # read (and checked) before anything is written
        train, eval_set = _prompts(plan)
    else:
        train, eval_set, eval_prompts = _records(plan, progress and main)
    threads = configure_threads(plan.threads)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG_NAME).write_text(json.dumps({**plan.record, "threads_used": threads,
                                                       "processes": accelerator.num_processes}, indent=1))
    set_seed(plan.cfg.seed)

    say(f"[1/3] base LM ({plan.model})", flush=True)
    policy, tok = _load_lm(plan.model, device=device, progress=progress and main, dtype=plan.dtype)
    if spec.name == "reward":
        return _train_reward(plan, policy, tok, train, eval_set, say, progress and main)
    if spec.on_policy and plan.prompts is not None:  # before any prompt reaches the reward stage or a batch
        check_prompt_lengths(plan.prompts, tok, plan.cfg.max_new_tokens)
    if plan.lora is not None:
        policy = _with_lora(policy, plan.lora)
    ref = None  # LoRA: the policy with its adapters disabled; SFT: none
    if spec.reference and plan.lora is None:
        ref, _ = _load_lm(plan.model, device=device, progress=False, dtype=plan.dtype)
    own = prompt_texts(train) if spec.on_policy and plan.prompts is not None else None
    say(f"[2/3] reward: {plan.reward or 'none'}", flush=True)
    reward_fn, rm = _reward_fn(plan, device, progress and main, own)
    gold_fn = (plan.world.gold_fn if plan.world is not None else gold_reward_fn) if plan.gold else None

    trainer_cls, cfg = spec.trainer_class, plan.cfg
    resumed = (out / spec.checkpoint).exists()
    length = f"{plan.iterations} iterations" if spec.on_policy else f"{plan.epochs:g} epochs"
    say(f"[3/3] {spec.name}, {length} -> {out}" + (" (resuming)" if resumed else "")
        + (f", {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""), flush=True)
    if spec.on_policy:
        extra = {"critic": build_critic("reward_model", reward_model=rm)} if plan.critic == "reward_model" else {}
        trainer = trainer_cls(policy, ref, tok, reward_fn, cfg, gold_fn=gold_fn, accelerator=accelerator, **extra)
    elif spec.name == "sft":
        trainer = trainer_cls(policy, tok, cfg, reward_fn=reward_fn, gold_fn=gold_fn, accelerator=accelerator)
    else:
        trainer = trainer_cls(policy, ref, tok, cfg, reward_fn=reward_fn, gold_fn=gold_fn, accelerator=accelerator)
    trainer.run_record = plan.record  # the checkpoint carries it, so a resume without run_config.json is checked too
    if spec.on_policy:
        history = trainer.train(train, plan.iterations, checkpoint_dir=out, eval_prompts=eval_set)
        asked, unit = plan.iterations, "iterations"
        eval_prompts = eval_set
    else:
        held = {"eval_records": eval_set} if spec.name == "sft" else {"eval_pairs": eval_set}
        history = trainer.train(train, plan.epochs, checkpoint_dir=out, eval_prompts=eval_prompts, **held)
        asked, unit = math.ceil(plan.epochs * trainer.steps_per_epoch(len(train)) - 1e-9), "steps"
    if trainer.iteration > asked:
        say(f"note: {out} holds a finished run of {trainer.iteration} {unit}, more than the {asked} asked for: "
            f"nothing was trained and the results are those of the {trainer.iteration}-{unit[:-1]} run (a run cannot "
            f"be shortened; use another out_dir for a shorter one)", flush=True)
    trainer.export(out / "policy", save_adapter=plan.lora is not None)  # every process takes part; the main one writes
    final = trainer.evaluate(eval_prompts, n_samples=plan.n_samples)
    first = next((h for h in history if any(k.startswith(("eval_", "val_")) for k in h)), {})
    last = next((h for h in reversed(history) if any(k.startswith("val_") for k in h)), {})
    summary = {"algorithm": spec.name, ("iterations" if spec.on_policy else "steps"): trainer.iteration}
    if not spec.on_policy:
        summary["epochs"] = history[-1].get("epoch") if history else 0
    summary.update({
        "processes": accelerator.num_processes,
        "eval_gold_reward_start": first.get("eval_gold_reward"),
        "eval_gold_reward_end": final.get("eval_gold_reward"),
        "eval_proxy_reward_start": first.get("eval_proxy_reward"),
        "eval_proxy_reward_end": final.get("eval_proxy_reward"),
        "eval_kl_end": final.get("eval_kl"),
        **{f"{k}_{when}": row[k] for k in ("val_loss", "val_accuracy") for when, row in (("start", first), ("end", last))
           if k in row},
        "out_dir": str(out),
        "policy": str(out / "policy"),
    })
    if not main:
        return summary
    _write_outputs(out, history, summary, f"{trainer.name} on {plan.model}" + (f" ({plan.reward} reward)"
                                                                                if plan.reward else ""),
                   f"{trainer.name} {'iteration' if spec.on_policy else 'step'}", final.pop("eval_samples"))
    return summary


run_pipeline = run  # the name of 0.1


def _write_outputs(out: Path, history: list[dict], summary: dict, title: str, xlabel: str, samples=None) -> None:
    """history.json, diagnostics.png, samples.jsonl and summary.json (the main process)."""
    import matplotlib.pyplot as plt

    from .plotting import plot_run

    save_history(history, out / "history.json")
    try:
        fig = plot_run(history, title=title, xlabel=xlabel)
    except ValueError:  # none of the plotted keys
        fig = None
    if fig is not None:
        fig.savefig(out / "diagnostics.png", dpi=100)
        plt.close(fig)
    if samples is not None:
        with (out / "samples.jsonl").open("w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def _train_reward(plan: _Plan, lm, tok, train: list, held: list, say, progress: bool) -> dict:
    """``rlhf-book train reward``: a reward model from the LM, Bradley-Terry on the pairs, normalised, saved.

    ``metrics.jsonl`` is rewritten at every checkpoint (``checkpoint_every`` steps); resuming
    continues from the last one, and more epochs stretch the learning-rate schedule to the new total.
    """
    cfg, out = plan.cfg, plan.out
    rm = reward_model_from_lm(lm)
    if plan.lora is not None:
        rm = _with_lora(rm, plan.lora, task_type="SEQ_CLS")
    epochs = int(plan.epochs)
    total = epochs * math.ceil(len(train) / cfg.batch_size)
    ckpt = out / ALGORITHMS["reward"].checkpoint
    say(f"[2/3] reward model: {len(train)} pairs, {epochs} epochs ({total} steps) -> {out}"
        + (" (resuming)" if ckpt.exists() else ""), flush=True)
    history: list[dict] = []
    for stop in [*range(cfg.checkpoint_every, total, cfg.checkpoint_every), total]:
        history = train_reward_model(rm, tok, train, held, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                     weight_decay=cfg.weight_decay, warmup_frac=cfg.warmup_frac, margin=cfg.margin,
                                     checkpoint_path=ckpt, checkpoint_every=cfg.checkpoint_every, max_steps=stop,
                                     seed=cfg.seed, progress=progress)
        write_metrics(history, out / METRICS_NAME)
    steps = history[-1]["step"] if history else 0
    if steps > total:
        say(f"note: {out} holds a finished run of {steps} steps, more than the {total} asked for", flush=True)
    norm = None
    if cfg.normalize:
        pairs = train[: cfg.n_normalize]
        norm = normalize_reward_model(
            rm, tok, [r["prompt"] for r in pairs] * 2, [r["chosen"] for r in pairs] + [r["rejected"] for r in pairs],
            [r.get("chosen_terminated", True) for r in pairs] + [r.get("rejected_terminated", True) for r in pairs])
    say("[3/3] held-out pairs and export", flush=True)
    ev = evaluate_preferences(rm, tok, held)
    saved = save_reward_model(rm, tok, out / "reward_model")
    summary = {"algorithm": "reward", "steps": steps, "epochs": history[-1].get("epoch") if history else 0,
               "val_loss_end": ev["loss"], "val_accuracy_end": ev["accuracy"],
               **({"val_gold_accuracy_end": ev["gold_accuracy"]} if "gold_accuracy" in ev else {}),
               "normalization": norm, "out_dir": str(out), "reward_model": str(saved)}
    _write_outputs(out, history, summary, f"reward model on {plan.model}", "step")
    return summary
# ------------------------------------------------------------------ the other commands
def _build_base(args) -> None:
    _load_lm(args.preset, device=args.device, progress=True)
    print(f"base LM {args.preset!r} is built and cached")


def _build_reward(args) -> None:
    load_reward_model(args.preset, device=args.device, progress=True)
    print(f"reward model for {args.preset!r} is built and cached")


OPTION_TABLES = ("pipeline", *LAYOUT, *ALGORITHMS, "critic_free")


def _print_table(table: str, cls, how: str, fixed: dict | None = None) -> None:
    print(f"[{table}]  ({cls.__name__}; {how})")
    for d in describe(cls):
        if fixed and d["name"] in fixed:
            print(f"  {d['name']} = {json.dumps(fixed[d['name']])}   (fixed by the algorithm's name)")
            continue
        valid = f"  valid: {d['valid']}" if d["valid"] else ""
        print(f"  {d['name']} = {json.dumps(d['default'])}   ({d['type']}{valid})\n      {d['help']}")


def _print_options(table: str) -> None:
    """Every field of a config table: name, type, default, valid values, help."""
    if table == "critic_free":  # the Python class behind reinforce, rloo and grpo
        _print_table(table, CriticFreeConfig, "rlhf_book.CriticFreeConfig(FIELD=VALUE) in Python; on the command "
                                              "line the tables [reinforce], [rloo], [grpo]")
    elif table in ALGORITHMS:
        spec = ALGORITHMS[table]
        python = (f"rlhf_book.{spec.config_class.__name__}(FIELD=VALUE) in Python" if spec.trainer_class is not None
                  else "rlhf_book.train_reward_model's arguments in Python")
        print(f"{spec.name}: {spec.description}. Trains on {_DATA_HELP[spec.data]}"
              + ("; optimises [reward] source." if spec.on_policy else "."))
        _print_table(spec.section, spec.config_class, f"override with --{spec.section}.FIELD VALUE; {python}",
                     spec.fixed)
    else:
        cls = PipelineConfig if table == "pipeline" else LAYOUT[table]
        _print_table(table, cls, f"override with --{table}.FIELD VALUE")


def _stage_args(p) -> None:
    p.add_argument("--config", required=True, help="TOML or JSON file: [pipeline] and the algorithm's table, or "
                                                   "[run], [model], [data], [reward] and the algorithm's table")
    p.add_argument("--iterations", type=int, default=None,
                   help="override the RL iterations (a larger number continues a run)")
    p.add_argument("--out", default=None, help="override the out_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    listing = "; ".join(f"{a.name}: {a.description}" for a in ALGORITHMS.values())
    parser = argparse.ArgumentParser(
        prog="rlhf-book", description=f"RLHF from one config file, in the book's world or on your model. {listing}.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help=f"base LM -> reward -> RL ({', '.join(ON_POLICY)}), as a config file says "
                                        "(resumable)",
                       epilog="Any config field can be overridden: --TABLE.FIELD VALUE, e.g. --ppo.kl_coef 0.1 "
                              "(list them with `rlhf-book options ppo`).")
    _stage_args(p)
    t = sub.add_parser("train", help=f"one stage ({', '.join(ALGORITHMS)}), as a config file says (resumable)",
                       epilog=f"{listing}. Any config field can be overridden: --TABLE.FIELD VALUE.")
    t.add_argument("algorithm", choices=list(ALGORITHMS), metavar="ALGORITHM",
                   help=f"one of {', '.join(ALGORITHMS)}")
    _stage_args(t)
    t.add_argument("--epochs", type=float, default=None,
                   help="override the epochs of sft, dpo, reward (a larger number continues a run)")
    o = sub.add_parser("options", help="list the fields of a config table with their defaults, valid values and help")
    o.add_argument("table", nargs="?", default="ppo", choices=OPTION_TABLES)
    for name, helptext in (("base", "build and cache the base LM"), ("reward", "build and cache the reward model")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--preset", default="cpu", help="tiny, cpu or gpu" + (" (or a world's 'WORLD:PRESET', e.g. "
                                                                          "arithmetic:cpu)" if name == "base" else ""))
        q.add_argument("--device", default=None)
    from . import grade  # coursework (rlhf_book/grade.py): grading submitted notebooks, the student edition

    grade.add_grade_arguments(sub.add_parser("grade", help="grade chapter notebooks: a fresh kernel each, CPU, "
                                             "offline, time limits, hidden checks -> grades.csv, results.json"))
    grade.add_student_edition_arguments(sub.add_parser("student-edition", help="write the chapters with stubs, no "
                                                       "outputs and no solutions, for students"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rlhf-book`` / ``python -m rlhf_book.cli``; returns the exit status."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("pipeline", "train"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in ("grade", "student-edition"):  # coursework: rlhf_book/grade.py
        from . import grade

        try:
            return grade.run_grade(args) if args.command == "grade" else grade.run_student_edition(args)
        except ValueError as e:
            print(f"rlhf-book {args.command}: error: {e}", file=sys.stderr)
            return 2
    import matplotlib

    matplotlib.use("Agg")  # files only, no windows
    try:
        if args.command in ("pipeline", "train"):
            algorithm = args.algorithm if args.command == "train" else None
            config = load_config(args.config, parse_overrides(rest), algorithm)
            if args.command == "pipeline":
                name = (config.get("pipeline") or config["run"])["algorithm"]
                if name not in ON_POLICY:
                    raise ValueError(f"`rlhf-book pipeline` runs RL ({', '.join(ON_POLICY)}); for {name} use "
                                     f"`rlhf-book train {name} --config {args.config}`")
            if args.out is not None:
                (config.get("pipeline") or config["run"])["out_dir"] = args.out
            summary = run(config, iterations=args.iterations, epochs=getattr(args, "epochs", None),
                          progress=not args.no_progress)
            finish()  # under a launcher: every process done, the process group destroyed before the exit
            if int(os.environ.get("RANK", "0")) == 0:  # one summary, from the main process
                print(json.dumps(summary, indent=1))
        elif args.command == "options":
            _print_options(args.table)
        elif args.command == "base":
            _build_base(args)
        else:
            _build_reward(args)
    except ValueError as e:
        print(f"rlhf-book: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system that refuses: a path that is a file, read-only, full, ...
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"rlhf-book: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
