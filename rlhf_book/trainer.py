"""The trainers of a policy: the shared base (:class:`PolicyTrainer`) and the on-policy RL trainer (A2C, PPO, ...).

One on-policy iteration (:meth:`OnPolicyTrainer.step`, then :meth:`OnPolicyTrainer.learn`) is four lines::

    rollout    = self.sample(prompts)             # pi_theta answers each prompt (KV cache)
    experience = self.make_experience(rollout)    # scores, log pi_old / log pi_ref, V, rewards, advantages
    stats      = self.update(experience)          # the algorithm: A2C, PPO, ... (the only part that differs)
    stats      = self.experience_stats(experience) | stats

:func:`rlhf_book.experience.make_experience` is the experience step; an algorithm is a
subclass that implements :meth:`OnPolicyTrainer.update` and adds its own fields to
:class:`OnPolicyConfig`. :class:`PolicyTrainer` holds what every trainer of a policy
needs, on-policy or not (DPO, :mod:`rlhf_book.dpo`, is its other subclass), once: one
device for policy, reference and a model-based reward, the speed switches, sampling, the
held-out evaluation protocol, and the training loop that makes a run resumable bit for
bit (at the same CPU thread count: sums over 1 and 2 threads differ at ~1e-7), refuses to
mix two configs in one run, streams metrics to disk and exports the policy.
:class:`OnPolicyTrainer` adds the critic, one optimizer (actor and critic groups), the KL
controller and the experience statistics.

A history is a list of per-step dicts with a ``step`` key (the iteration or optimizer
step, 0 for the evaluation before training); held-out ``eval_*`` keys appear only on the
steps where an evaluation ran (the same schema as base-LM and reward-model training).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ._deprecation import warn_deprecated
from .advantage import masked_mean, masked_var
from .checkpoint import fsync_replace, load_checkpoint, nonfinite_tensors, rng_state, save_checkpoint, set_rng_state
from .config import Config, config_changes, option, redefault
from .critic import PolicyWithValueHead, ValueModel, explained_variance, forward_logprobs_and_values, response_values
from .distributed import (check_data_parallel, gather_experience, global_shares, global_whiten, local_size,
                          make_accelerator, mean_across, rank_seed, shard)
from .experience import KL_PENALTIES, Experience, get_advantage_estimator, make_experience
from .engine import SAMPLING_ENGINES
from .export import save_model
from .kl import kl_k1, kl_k3, kl_loss, make_kl_controller, sequence_kl
from .rewards import StepReward
from .rollout import (Rollout, generate, in_row_batches, prompt_texts, response_logprobs, score_rollout,
                      stop_token_ids)
from .adapters import AdapterDisabledReference, is_peft_model
from .runtime import (PRECISIONS, TRAINABLE_DTYPES, adam, autocast, enable_tf32, hold_trainable, mixed_numerics,
                      resolve_precision, timed)

__all__ = ["PolicyTrainer", "TrainerConfig", "OnPolicyTrainer", "OnPolicyConfig", "disable_dropout", "RESUMABLE_FIELDS", "METRICS_NAME", "append_metrics",
           "write_metrics", "read_metrics", "save_history"]


@dataclass
class TrainerConfig(Config):
    """The fields every trainer of a policy has (on-policy RL, DPO): sampling, optimizer, speed, bookkeeping."""

    # --- sampling (RL rollouts and the held-out evaluation)
    batch_size: int = option(32, "prompts per iteration (RL: one response each) or preference pairs per step (DPO); "
                                 "with N processes the global batch, split evenly", ">= 1")
    max_new_tokens: int = option(40, "responses without EOS by then are cut off (terminated = False)", ">= 1")
    temperature: float = option(1.0, "sampling temperature tau; policy and reference log-probs both use softmax(logits / tau) "
                                     "(N+ detail: else the KL compares a sharpened policy with an unsharpened reference)", "> 0")
    # --- the optimizer
    lr: float = option(1e-4, "Adam learning rate of the policy", "> 0")
    adam_eps: float = option(1e-5, "Adam epsilon (N detail: 1e-5 as in TF; PyTorch's 1e-8 makes the first updates "
                                   "aggressive)", "> 0")
    max_grad_norm: float | None = option(1.0, "one clip of the joint gradient norm of everything the step trains (actor "
                                              "and critic together; None: no clipping; the norm is reported either way "
                                              "as grad_norm)", "> 0")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step: each minibatch is split into this "
                                                 "many, whose losses are backpropagated one after another (the same "
                                                 "gradient as the whole minibatch at once, less memory)", ">= 1")
    disable_dropout: bool = option(True, "dropout off in policy, reference and critic (else ratios and KL are noisy "
                                         "from the start): every dropout probability, attention dropout included, "
                                         "is set to 0 (disable_dropout); updates run in train mode either way")
    trainable_dtype: str = option("float32", "'float32': trainable parameters (and Adam's state) held in fp32 "
                                             "whatever the checkpoint's dtype; 'keep': as loaded (pure bf16 training "
                                             "of a bf16 checkpoint). Frozen weights are never cast (rlhf_book.runtime)",
                                  choices=TRAINABLE_DTYPES)
    gradient_checkpointing: bool = option(False, "recompute the activations of the policy's (and a separate "
                                                 "critic's) layers in the backward pass instead of storing them "
                                                 "(transformers' gradient_checkpointing_enable, use_reentrant=False)")
    logprob_chunk_size: int | None = option(None, "rows per LM-head chunk of every teacher-forced log-prob (and "
                                                  "entropy): the head, fp32 log-softmax and gather run on that many "
                                                  "rows at a time (under activation checkpointing when trained), so "
                                                  "no (batch, length, vocab) fp32 tensor is held; None: automatic, "
                                                  "at most 2**25 logits (128 MiB) a chunk, the whole batch for the "
                                                  "book's model (rlhf_book.rollout.teacher_forced)", ">= 1")
    forward_batch_size: int | None = option(None, "rows per forward of the experience step and the evaluation "
                                                  "(policy and reference log-probs, values, a ModelReward's "
                                                  "scoring), results concatenated: the same numbers in less memory "
                                                  "(None: the whole batch at once)", ">= 1")
    # --- speed (each measured in benchmarks/README.md)
    precision: str = option("auto", "'auto': bf16 autocast on a GPU that supports it, else fp32; or 'fp32' / 'bf16'",
                            choices=PRECISIONS)
    tf32: bool = option(True, "on CUDA, let fp32 matmuls use TF32 tensor cores")
    compile: bool = option(False, "torch.compile the teacher-forced forwards (a CPU needs a C++ compiler)")
    generation_threads: int | None = option(1, "CPU threads while sampling token by token (None: the process setting)",
                                            ">= 1")
    sampling_engine: str = option("static", "'static': a preallocated KV cache, no reallocation per token (the same "
                                            "tokens and log-probs as 'plain', bit for bit); 'plain': the reference "
                                            "loop (a growing DynamicCache); a model the static engine cannot drive "
                                            "falls back to 'plain' (logged). rlhf_book.engine",
                                  choices=SAMPLING_ENGINES)
    sampling_compile: bool = option(False, "torch.compile the static engine's decode step (CUDA graphs on a GPU); "
                                           "the first call compiles (10-50 s on 2 CPU cores) and log-probs then differ "
                                           "from 'plain' by float rounding (benchmarks/results/cpu_decode.md)")
    # --- bookkeeping
    seed: int = option(0, "seeds prompt order, sampling and minibatch shuffling")
    eval_every: int = option(10, "steps (RL: iterations) between held-out evaluations in train() (0: only first and "
                                 "last)", ">= 0")
    eval_samples: int = option(3, "held-out responses (with their scores) kept in the history at each evaluation", ">= 0")
    checkpoint_every: int = option(10, "steps (RL: iterations) between checkpoints in train() (when checkpoint_dir is "
                                       "given)", ">= 0")
    progress: bool = option(True, "tqdm bar in train()")


@dataclass
class OnPolicyConfig(TrainerConfig):
    """:class:`TrainerConfig` plus the fields every on-policy RL trainer has; an algorithm's config subclasses it."""

    # --- the critic
    critic: str = option("head", "'head': a value head on the policy's trunk; 'separate': a ValueModel copy of the "
                                 "policy's trunk (a critic module given to the trainer replaces either)",
                         choices=("head", "separate"))
    critic_lr: float | None = option(None, "Adam learning rate of the critic (value head or separate critic); None: lr", "> 0")
    detach_value_head: bool = option(True, "the value head reads detached features, so the value loss cannot move "
                                           "the policy's trunk")
    vf_coef: float = option(0.1, "weight of the value loss", ">= 0")
    entropy_coef: float = option(0.0, "entropy bonus weight (0: off; RLHF anchors the policy with the KL instead)", ">= 0")
    # --- rewards, returns and advantages
    gamma: float = option(1.0, "discount (1: the score at the end counts fully for every token)", "[0, 1]")
    lam: float = option(0.95, "GAE lambda (0: one-step TD advantage, 1: Monte-Carlo return minus V)", "[0, 1]")
    missing_eos_score: float | None = option(-1.0, "score that replaces r(x, y) when no EOS was produced (the EOS "
                                                   "trick; None: keep r)")
    whiten_rewards: bool = option(False, "scale per-token rewards to unit variance per batch (mean not shifted)")
    whiten_advantages: bool = option(True, "normalise advantages to mean 0, std 1 per batch")
    recompute_old_logprobs: bool = option(False, "re-forward for log pi_old instead of using the sampler's (equal in "
                                                 "fp32; always on under bf16 autocast or with any policy weight not "
                                                 "in fp32, where they round differently)")
    # --- the KL to the reference
    kl_coef: float = option(0.05, "beta (its initial value when adaptive)", ">= 0")
    kl_target: float | None = option(None, "sequence KL target (nats) of the adaptive controller (None: fixed beta)", "> 0")
    kl_horizon: float = option(10_000.0, "adaptive controller horizon (responses)", "> 0")
    kl_penalty: str = option("reward", "'reward': -beta * k1 per token in the reward (InstructGPT); 'loss': "
                                       "+beta * mean k3 in the loss (GRPO)", choices=KL_PENALTIES)

    def check(self) -> None:
        if self.kl_target is not None and self.kl_coef <= 0:
            raise ValueError(f"{type(self).__name__}.kl_target (adaptive KL) needs kl_coef > 0 as the initial beta")

    def advantage_spec(self) -> tuple[str, dict]:
        """(name, options) of the experience step's advantage estimator (:data:`rlhf_book.experience.ADVANTAGE_ESTIMATORS`):
        GAE with the critic here; a critic-free config names its group estimator."""
        return "gae", {}


@dataclass
class OfflineConfig(TrainerConfig):
    """:class:`TrainerConfig` plus what a trainer on fixed records (DPO's pairs, SFT's records) adds: accumulation."""

    minibatch_size: int | None = option(None, "deprecated since 0.2.0 (use gradient_accumulation_steps): records "
                                              "(DPO: pairs) per forward pass, accumulated into one optimizer step "
                                              "(None: gradient_accumulation_steps decides)", ">= 1")
    eval_every: int = redefault(TrainerConfig, "eval_every", 25)
    checkpoint_every: int = redefault(TrainerConfig, "checkpoint_every", 25)

    def check(self) -> None:
        if self.minibatch_size is not None and self.minibatch_size > self.batch_size:
            raise ValueError(f"{type(self).__name__}.minibatch_size ({self.minibatch_size}) must be <= batch_size "
                             f"({self.batch_size})")
        if self.minibatch_size is not None:
            warn_deprecated(f"{type(self).__name__}.minibatch_size", "gradient_accumulation_steps", "0.2.0")


# Fields that may change between a run and its resumption: they change what is shown or saved, not what is learnt
# (the memory knobs: only how the same numbers are computed, up to float rounding, e.g. on a smaller machine).
RESUMABLE_FIELDS = frozenset({"progress", "checkpoint_every", "eval_every", "logprob_chunk_size", "forward_batch_size"})


_DROPOUT_NAME = re.compile(r"(dropout|pdrop|drop_prob|drop_rate|layerdrop)", re.IGNORECASE)


def _zero_dropout_floats(obj, seen: set) -> None:
    """Set to 0.0 every float attribute of ``obj`` named like a dropout probability (a config's, a module's)."""
    from transformers import PretrainedConfig

    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in list(vars(obj).items()):
        if isinstance(value, PretrainedConfig):  # a sub-config (text_config, ...)
            _zero_dropout_floats(value, seen)
        elif isinstance(value, float) and value != 0.0 and _DROPOUT_NAME.search(name):
            setattr(obj, name, 0.0)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn every dropout of ``model`` off, in place; returns it.

    Sets p = 0 in every dropout module (``nn.Dropout`` and its kin) and 0.0 in every float
    attribute named like a dropout probability, both of the modules (e.g. the
    ``attention_dropout`` that Llama, Qwen and GPT-NeoX attention layers apply in training
    mode) and of their configs (``attention_dropout``, ``attn_pdrop``, ``resid_pdrop``,
    ``embd_pdrop``, ``hidden_dropout``, ``classifier_dropout``, ...: an exported model then says 0
    too). So train mode computes what eval mode does, bit for bit, and the trainers run their
    updates in train mode (where transformers' gradient checkpointing works).
    """
    from transformers import PretrainedConfig

    seen: set = set()
    for mod in model.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.p = 0.0
        _zero_dropout_floats(mod, seen)
        config = vars(mod).get("config")  # a model's own config (not a property that borrows another's)
        if isinstance(config, PretrainedConfig):
            _zero_dropout_floats(config, seen)
    return model


def _enable_gradient_checkpointing(module: nn.Module, what: str) -> None:
    """transformers' gradient checkpointing (non-reentrant) on ``module``: ``activation_checkpointing_enable``
    (transformers >= 5.25) or ``gradient_checkpointing_enable`` (earlier); a ValueError if it has neither."""
    kwargs = {"use_reentrant": False}
    enable = getattr(module, "activation_checkpointing_enable", None)
    if callable(enable):
        call = lambda: enable(activation_checkpointing_kwargs=kwargs)  # noqa: E731
    else:
        enable = getattr(module, "gradient_checkpointing_enable", None)
        call = lambda: enable(gradient_checkpointing_kwargs=kwargs)  # noqa: E731
    if not callable(enable) or not getattr(module, "supports_gradient_checkpointing", True):
        raise ValueError(f"gradient_checkpointing=True but the {what} ({type(module).__name__}) does not support "
                         "transformers' gradient checkpointing")
    call()


class PolicyTrainer:
    """What every trainer of a causal-LM policy shares: devices, sampling, evaluation, checkpoints, the training loop.

    ``policy``: a causal LM (trained in place), or a ``peft.PeftModel`` (LoRA: only the
    adapters are trained); ``ref_model``: a separate frozen copy of it (pi_ref), or None for a
    PEFT policy: the reference is then the policy itself with its adapters disabled
    (:class:`~rlhf_book.adapters.AdapterDisabledReference`, no second copy of the weights);
    ``reward_fn(prompts, responses, terminated) -> (B,)`` (or None where the
    algorithm does not need one): a learned reward model (e.g.
    :func:`rlhf_book.reward_model.reward_fn_from_model`) or any function of the text;
    ``gold_fn`` (same signature, or None): a reward that is only logged, never learned from.

    One device rule: everything runs on the policy's device; the reference and a reward
    function with a ``to`` method (a model-based reward) are moved there. A subclass
    implements ``step(batch) -> stats`` and calls :meth:`run` from its ``train``.

    One dtype rule (:mod:`rlhf_book.runtime`): weights stay as loaded, trainable parameters
    are held in fp32 (``config.trainable_dtype``), forwards use autocast (``config.precision``).
    ``config.gradient_checkpointing`` checkpoints the policy's layers (and a separate critic's);
    updates run in train mode, with every dropout probability 0 under ``config.disable_dropout``.

    ``accelerator``: the ``accelerate.Accelerator`` to run under (default: one made by
    :func:`rlhf_book.distributed.make_accelerator`). With one process it changes nothing; under
    ``accelerate launch`` or ``torchrun`` each process trains on its shard of every global batch
    and the processes compute what one process would (the rules: :mod:`rlhf_book.distributed`).
    Only the main process writes metrics, checkpoints and exports.
    """

    name = "policy"  # shown on the progress bar and in exported model cards
    checkpoint_name = "state.pt"  # file inside ``checkpoint_dir``
    config_class = TrainerConfig
    needs_reference = True  # False (SFT): ref_model=None means no reference at all (no eval_kl)

    def __init__(self, policy: nn.Module, ref_model: nn.Module, tokenizer, config: TrainerConfig | None = None,
                 reward_fn: Callable | None = None, gold_fn: Callable | None = None, accelerator=None):
        cfg = self.config = config if config is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise ValueError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        if reward_fn is not None and not callable(reward_fn):
            raise ValueError(f"reward_fn must be a function (prompts, responses, terminated) -> (B,) scores, got {reward_fn!r}")
        if gold_fn is not None and not callable(gold_fn):
            raise ValueError(f"gold_fn must be None or a function like reward_fn, got {gold_fn!r}")
        lm = policy.lm if isinstance(policy, PolicyWithValueHead) else policy
        if ref_model is policy or ref_model is lm:
            raise ValueError("ref_model must be a separate frozen copy of the policy, not the policy itself")
        if ref_model is None and self.needs_reference:
            if not is_peft_model(lm):
                raise ValueError(
                    f"ref_model=None needs a peft.PeftModel policy (its reference is the policy with the adapters "
                    f"disabled); for a {type(lm).__name__} pass a frozen copy, e.g. ref_model=copy.deepcopy(policy)")
            ref_model = AdapterDisabledReference(lm)
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("tokenizer needs a PAD token distinct from EOS (else EOS is masked out and never learned)")
        self.lm, self.model, self.tokenizer = lm, lm, tokenizer
        # one device: the policy's (with several processes, this process's own)
        acc = self.accelerator = accelerator if accelerator is not None else make_accelerator(next(lm.parameters()).device)
        check_data_parallel(acc)
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        self.device = acc.device if self.world > 1 else next(lm.parameters()).device
        lm.to(self.device)
        hold_trainable(lm, cfg.trainable_dtype)  # before any optimizer sees the parameters
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(lm, "policy")
        self.ref = None if ref_model is None else ref_model.to(self.device).eval().requires_grad_(False)
        if callable(getattr(reward_fn, "to", None)):
            reward_fn.to(self.device)
        self.reward_fn, self.gold_fn = reward_fn, gold_fn
        if cfg.disable_dropout and self.ref is not None:
            disable_dropout(self.ref)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.tf32:
            enable_tf32(self.device)
        self._compiled: dict[int, nn.Module] = {}
        self._prepared: dict[int, nn.Module] = {}  # id(module) -> its DDP/FSDP wrapper (several processes)
        # sampling and minibatch order: per process (rank 0 = the one-process seed); the order of the data: shared
        self.generator = torch.Generator(device=self.device).manual_seed(rank_seed(cfg.seed, self.rank))
        self.data_generator = (self.generator if self.world == 1
                               else torch.Generator(device=self.device).manual_seed(cfg.seed))
        self.iteration = 0
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient (skip_nonfinite_step)
        self.run_record: dict | None = None  # what made the run (the CLI's config), kept in every checkpoint
        self.history: list[dict] = []

    def step(self, batch) -> dict:
        """One step of the algorithm on ``batch``; returns its statistics (floats). Subclasses implement it."""
        raise NotImplementedError

    def setup_policy_optimizer(self) -> None:
        """For a trainer of the policy alone (DPO, SFT): dropout off as configured, ``self.params``, one Adam, prepared."""
        cfg = self.config
        if cfg.disable_dropout:
            disable_dropout(self.lm)
        self.params = [p for p in self.lm.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the policy has no trainable parameters (requires_grad is False everywhere)")
        self.optimizer = adam([{"params": self.params, "lr": cfg.lr}], lr=cfg.lr, eps=cfg.adam_eps)
        self.prepare_trainables(self.lm)

    def prepare_trainables(self, *modules: nn.Module | None) -> None:
        """Hand the trainable ``modules`` and ``self.optimizer`` to the Accelerator (DDP/FSDP wrappers with N processes).

        The trainer keeps the modules themselves (sampling, the experience step, checkpoints and
        export use them); the forwards of an update go through :meth:`trainable`.
        """
        acc = self.accelerator
        for m in modules:
            if m is not None:
                wrapped = acc.prepare_model(m, device_placement=False)
                if wrapped is not m:
                    self._prepared[id(m)] = wrapped
        self.optimizer = acc.prepare_optimizer(self.optimizer, device_placement=False)

    def trainable(self, module: nn.Module) -> nn.Module:
        """What a forward that will be backpropagated calls: ``module``'s DDP wrapper (N processes), else ``module``."""
        return self._prepared.get(id(module), module)

    def loss_share(self, n_local: torch.Tensor | float) -> torch.Tensor | float:
        """The factor that makes a loss averaged over this process's ``n_local`` items (tokens, replies, pairs) a share
        of the mean over the global batch (:func:`rlhf_book.distributed.global_shares`; 1.0 with one process)."""
        return global_shares(self.accelerator, [n_local])[0]

    def micro_batches(self, n: int) -> list[slice]:
        """The contiguous micro-batches of a minibatch of ``n`` rows: ``gradient_accumulation_steps`` of them (sizes
        differ by at most one; at most n), or, with the deprecated ``minibatch_size`` of DPO/SFT, chunks of that many rows."""
        cfg = self.config
        size = cfg.minibatch_size if isinstance(cfg, OfflineConfig) else None
        if size:
            return [slice(i, min(i + size, n)) for i in range(0, n, size)]
        g = max(1, min(cfg.gradient_accumulation_steps, n))  # a minibatch of fewer rows: one row per micro-batch
        return [slice(n * k // g, n * (k + 1) // g) for k in range(g)]

    def accumulate(self, parts: Sequence, loss_fn: Callable, params: Sequence[torch.Tensor],
                   loss_counts: Sequence | None = None, stat_counts: Sequence | None = None) -> dict:
        """One optimizer step on the micro-batches ``parts`` of a minibatch; returns its statistics (0-d tensors).

        Every update of every trainer goes through here. ``loss_fn(part) -> (loss, stats)``: the
        loss a mean over ``loss_counts[k]`` items of part k (tokens, replies, pairs; None: losses
        already normalised by a count of the global batch, e.g. DAPO's). Each loss is scaled by its
        share of the global minibatch (:func:`rlhf_book.distributed.global_shares`, the one
        scaling rule) and backpropagated as it comes, so the summed gradient is the one-batch
        gradient; the statistics are weighted alike (``loss`` and ``policy_loss`` as the loss,
        the others by ``stat_counts``, default ``loss_counts``: token means), so that averaged
        over processes they are the global minibatch's. Then one joint clip of ``params``'
        gradient norm (``grad_norm``) and one optimizer step (:meth:`gradient_step`).
        """
        loss_w = global_shares(self.accelerator, loss_counts, len(parts))
        stat_w = loss_w if stat_counts is None else global_shares(self.accelerator, stat_counts, len(parts))
        totals: dict = {}

        def losses():
            for part, lw, sw in zip(parts, loss_w, stat_w):
                loss, stats = loss_fn(part)
                for k, v in stats.items():
                    v = v * (lw if k in ("loss", "policy_loss") else sw)
                    totals[k] = v if k not in totals else totals[k] + v
                yield loss * lw

        (totals["grad_norm"],) = self.gradient_step(losses(), [params])
        return totals

    def token_weighted(self, stats: dict, n_local: torch.Tensor | float) -> dict:
        """Local means over ``n_local`` items times their :meth:`loss_share`: averaged over processes (as :meth:`step`
        does with an update's statistics) they give the mean over the global batch. One process: ``stats``."""
        if self.world == 1:
            return stats
        share = self.loss_share(n_local)
        return {k: v * share for k, v in stats.items()}

    def process_mean(self, x: torch.Tensor) -> torch.Tensor:
        """A 0-d tensor averaged over the processes (itself with one), e.g. to take a decision all of them share."""
        return x if self.world == 1 else self.accelerator.reduce(x.detach().clone(), "mean")

    def shard(self, batch: Sequence, what: str = "batch_size") -> list:
        """This process's contiguous share of a global batch (the whole batch with one process)."""
        batch = list(batch)
        return batch if self.world == 1 else batch[shard(len(batch), self.rank, self.world, what)]

    def sample(self, texts: Sequence[str], generator: torch.Generator | None = None,
               samples_per_prompt: int = 1) -> Rollout:
        """``samples_per_prompt`` responses per prompt (adjacent rows) from the current policy, at ``config.temperature``."""
        cfg = self.config
        with self.autocast():
            return generate(self.lm, self.tokenizer, list(texts), cfg.max_new_tokens, cfg.temperature,
                            generator=self.generator if generator is None else generator, threads=cfg.generation_threads,
                            samples_per_prompt=samples_per_prompt, engine=cfg.sampling_engine,
                            compile=cfg.sampling_compile)

    def gradient_step(self, loss, clip_groups: Sequence[Sequence[torch.Tensor]]) -> list[float | torch.Tensor]:
        """Backward ``loss``, clip each parameter group's gradient norm, one optimizer step; returns the norms (0-d tensors).

        ``loss``: a tensor, or an iterable of tensors whose gradients are summed (gradient
        accumulation: each is backpropagated as it comes, so one graph is alive at a time).
        Parameters without a gradient (e.g. the critic when the loss has no value term) are not changed.
        """
        limit = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        self.optimizer.zero_grad(set_to_none=True)
        for part in ([loss] if isinstance(loss, torch.Tensor) else loss):
            self.accelerator.backward(part)
        norms = [torch.nn.utils.clip_grad_norm_(list(g), limit) for g in clip_groups]
        if all(bool(torch.isfinite(torch.as_tensor(n))) for n in norms):
            self.optimizer.step()
        else:  # the non-finite rule: skip the step (see skip_nonfinite_step)
            self.skip_nonfinite_step(norms)
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    def skip_nonfinite_step(self, norms) -> None:
        """The one rule for a NaN or infinite gradient: the optimizer step is skipped, with a warning.

        Parameters and optimizer state stay as they were (the gradient norm is taken after the
        processes' gradients are averaged, so every process skips together); the step's
        ``grad_norm`` is logged as the non-finite value it was. Rewards are checked before
        any update (:func:`rlhf_book.rewards.check_scores`), so this catches overflow in the
        model itself, e.g. under bf16. ``skipped_steps`` counts them; a checkpoint is never
        written from non-finite weights (:meth:`save`).
        """
        self.skipped_steps += 1
        warnings.warn(
            f"{type(self).__name__}: the gradient at iteration {self.iteration + 1} is not finite (norms "
            f"{[round(float(n), 4) for n in norms]}): this optimizer step is skipped, the weights are unchanged "
            f"({self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_rollout(self, texts: Sequence[str], seed: int | None = None) -> tuple[Rollout, torch.Tensor]:
        """Sample ``texts`` with a private generator (seed ``config.seed + 1`` unless given) -> (rollout, ref log-probs).

        The generator is its own, so evaluating never changes the training run and every
        evaluation sees the same random numbers. Without a reference (SFT) the log-probs are None.
        """
        cfg = self.config
        g = torch.Generator(device=self.device).manual_seed(cfg.seed + 1 if seed is None else seed)
        ro = self.sample(texts, generator=g)
        if self.ref is None:
            return ro, None
        with self.autocast():
            return ro, in_row_batches(lambda r: response_logprobs(self.ref, r, cfg.temperature, cfg.logprob_chunk_size),
                                      ro, cfg.forward_batch_size)

    @torch.no_grad()
    def evaluate(self, prompts: Sequence, seed: int | None = None, n_samples: int | None = None) -> dict:
        """Held-out statistics: one response per prompt, sampled with a fixed seed; keys ``eval_*``.

        ``eval_proxy_reward`` (the reward function, before the missing-EOS rule; with a
        ``reward_fn``), ``eval_gold_reward`` (with a ``gold_fn``), ``eval_kl`` /
        ``eval_kl_k3`` (sequence KL to the reference, k1 / k3), ``eval_response_length``,
        ``eval_terminated`` and ``eval_samples``: the first ``n_samples`` (default
        ``config.eval_samples``) responses with their scores. Every trainer evaluates this
        way, so runs of different algorithms are compared on the same footing.
        """
        n_samples = self.config.eval_samples if n_samples is None else n_samples
        was_training = self.lm.training
        self.lm.eval()
        try:
            ro, ref_lp = self.eval_rollout(prompt_texts(prompts), seed)
        finally:
            self.lm.train(was_training)
        scores = {}
        if self.reward_fn is not None:
            with self.autocast():
                scores["proxy"] = score_rollout(self.reward_fn, ro, self.device, "reward_fn")
        if self.gold_fn is not None:
            scores["gold"] = score_rollout(self.gold_fn, ro, self.device, "gold_fn")
        out = {f"eval_{name}_reward": v.mean().item() for name, v in scores.items()}
        if ref_lp is not None:  # no reference (SFT without one): no KL
            out.update({
                "eval_kl": sequence_kl(kl_k1(ro.logprobs, ref_lp), ro.response_mask).mean().item(),
                "eval_kl_k3": sequence_kl(kl_k3(ro.logprobs, ref_lp), ro.response_mask).mean().item(),
            })
        out.update({
            "eval_response_length": ro.response_lengths.float().mean().item(),
            "eval_terminated": ro.terminated.float().mean().item(),
        })
        out["eval_samples"] = [
            {"prompt": ro.prompts[i], "response": ro.responses[i], "terminated": bool(ro.terminated[i]),
             **{name: round(v[i].item(), 3) for name, v in scores.items()}}
            for i in range(min(n_samples, len(ro)))
        ]
        return out

    def progress_postfix(self, stats: dict) -> dict:
        """What the progress bar shows after a step."""
        return {}

    # ------------------------------------------------------------------ speed switches
    def autocast(self):
        """Context for forward passes: bf16 autocast when the run's precision is bf16, else nothing."""
        return autocast(self.device, self.precision)

    def compiled(self, module: nn.Module) -> nn.Module:
        """``module``, or (``config.compile``) its ``torch.compile`` wrapper: same parameters, compiled forward.

        ``dynamic=True`` because every batch has its own prompt and response lengths.
        The wrapper is built once per module and only used for teacher-forced forwards;
        sampling and checkpoints use the module itself.
        """
        if module is None:
            return None
        if not self.config.compile:
            return module
        if id(module) not in self._compiled:
            self._compiled[id(module)] = torch.compile(module, dynamic=True)
        return self._compiled[id(module)]

    # ------------------------------------------------------------------ checkpoints
    def stateful(self) -> dict:
        """Objects with ``state_dict``/``load_state_dict`` besides the model, by checkpoint key."""
        return {"optimizer": self.optimizer}

    def state_dict(self) -> dict:
        """Everything needed to continue the run bit for bit (at the same CPU thread count, see :meth:`load`).

        With N processes every process must call it (it gathers each one's random state):
        ``generator`` / ``rng`` are rank 0's, ``ranks`` holds every rank's, ``data_generator``
        the shared order of the data.
        """
        state = {
            "model": self.model.state_dict(), "generator": self.generator.get_state(), "rng": rng_state(),
            "iteration": self.iteration, "history": self.history, "config": asdict(self.config),
            "threads": torch.get_num_threads(), "world_size": self.world,
            **{k: v.state_dict() for k, v in self.stateful().items()},
        }
        if self.run_record is not None:
            state["run_record"] = self.run_record
        if self.world > 1:
            from accelerate.utils import gather_object

            state["data_generator"] = self.data_generator.get_state()
            state["ranks"] = gather_object([{"generator": state["generator"], "rng": state["rng"]}])
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned, written by this number of processes or another.

        With the same number, every process gets its own random state back (the run goes on
        bit for bit). With another, weights, optimizer, step, history and the rest are
        restored, and each process's generators are seeded anew from (seed, rank, step): the
        run continues, on other random samples than an uninterrupted one would draw.
        """
        self.model.load_state_dict(state["model"])
        for k, v in self.stateful().items():
            v.load_state_dict(state[k])
        self.iteration, self.history = int(state["iteration"]), list(state["history"])
        saved_world = int(state.get("world_size", 1))
        if saved_world == self.world:
            mine = state["ranks"][self.rank] if self.world > 1 else state
            self.generator.set_state(mine["generator"])
            set_rng_state(mine["rng"])
            if self.world > 1:
                self.data_generator.set_state(state["data_generator"])
        else:
            seed = self.config.seed + 7919 * self.iteration
            self.generator.manual_seed(rank_seed(seed, self.rank))
            if self.data_generator is not self.generator:
                self.data_generator.manual_seed(seed)
            torch.manual_seed(rank_seed(seed, self.rank))

    def save(self, path: str | Path) -> Path:
        """Atomically write :meth:`state_dict` to ``path`` (N processes: all call it, the main one writes)."""
        state = self.state_dict()
        bad = nonfinite_tensors({k: state[k] for k in ("model", "critic") if k in state})
        if bad:
            raise ValueError(f"{path}: not written: the weights are not finite ({', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''}), so the last good checkpoint is kept")
        if self.is_main:
            save_checkpoint(path, **state)
        self.accelerator.wait_for_everyone()
        return Path(path)

    def load(self, path: str | Path) -> None:
        """Restore a run saved with :meth:`save`; refuses a checkpoint written with another config.

        Resuming continues the interrupted run exactly when the process uses as many CPU
        threads as the one that wrote it (reductions over 1 and 2 threads differ at ~1e-7);
        with another count it continues, with a warning, but is no longer bit-identical.
        """
        state = load_checkpoint(path)
        bad = nonfinite_tensors({k: state[k] for k in ("model", "critic") if k in state})
        if bad:
            raise ValueError(f"{path}: cannot resume, the checkpoint's weights are not finite ({', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''}). Delete it to start over, or put back an earlier copy.")
        changed = config_changes(state.get("config", {}), asdict(self.config), RESUMABLE_FIELDS,
                                 {f.name: f.default for f in fields(self.config)})
        if changed:
            raise ValueError(
                f"{path}: cannot resume, this run's config differs from the one the checkpoint was written with "
                f"({'; '.join(changed)}). Restore those values to continue it, or start a new run in another "
                f"directory (only {', '.join(sorted(RESUMABLE_FIELDS))} may change on resume)."
            )
        threads = state.get("threads")
        if threads is not None and threads != torch.get_num_threads() and self.is_main:
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

    def export(self, directory: str | Path, save_adapter: bool = False) -> Path:
        """Save the trained policy LM and its tokenizer with ``save_pretrained`` (loads with ``AutoModelForCausalLM``).

        Written into a temporary sibling and renamed into place, so ``directory`` is
        always either the previous export or the new one, never half of one. A PEFT (LoRA)
        policy is written merged (a merged copy: the live policy keeps its adapters), so plain
        transformers loads it without peft; ``save_adapter=True`` also writes the adapter alone
        into ``directory/adapter`` (:func:`rlhf_book.export.save_model`).
        """
        directory = Path(directory)
        if not self.is_main:  # one writer; the others wait until the export is in place
            self.accelerator.wait_for_everyone()
            return directory
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(
            self.lm, self.tokenizer, tmp, title=f"{self.name} policy trained with rlhf_book",
            description=f"A causal LM after {self.iteration} {self.name} steps (config in the run's run_config.json).",
            save_adapter=save_adapter,
        )
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return directory

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        steps: int,
        next_batch: Callable[[], object],
        checkpoint_dir: str | Path | None = None,
        evaluate: Callable[[], dict] | None = None,
        progress: bool | None = None,
        extra: Callable[[], dict] | None = None,
    ) -> list[dict]:
        """Call ``self.step(next_batch())`` until ``steps`` steps are done; returns the history.

        With ``evaluate`` (a function returning ``eval_*``/``val_*`` statistics), step 0
        (before training), every ``eval_every``-th step and the last one also carry its
        statistics. With ``checkpoint_dir`` the run is saved every ``checkpoint_every``
        steps and at the end; calling again with the same directory resumes and reproduces
        the uninterrupted run exactly (same thread count; a changed config is refused, see
        :meth:`load`), and every step's statistics are appended to
        ``checkpoint_dir/metrics.jsonl`` as they happen (one JSON object a line: watch it
        during a run, read it after a crash). ``next_batch`` is called after a resume, so
        it sees the restored state. ``extra()`` adds keys to every row (e.g. the epoch).
        """
        cfg = self.config
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"the number of steps (iterations) must be an integer >= 0, got {steps!r}")
        ckpt = Path(checkpoint_dir) / self.checkpoint_name if checkpoint_dir is not None else None
        metrics = Path(checkpoint_dir) / METRICS_NAME if checkpoint_dir is not None and self.is_main else None
        if ckpt is not None and ckpt.exists():
            self.load(ckpt)
        if metrics is not None:  # rows after the last checkpoint were lost with the run: the file restarts from it
            metrics.parent.mkdir(parents=True, exist_ok=True)
            write_metrics(self.history, metrics)
        extra = extra if extra is not None else dict
        if evaluate is not None and self.iteration == 0 and not any(h["step"] == 0 for h in self.history):
            self.history.append({"step": 0, **extra(), **evaluate()})
            if metrics is not None:
                append_metrics(self.history[-1], metrics)
        show = cfg.progress if progress is None else progress
        bar = tqdm(total=steps, initial=min(self.iteration, steps), desc=self.name, disable=not (show and self.is_main))
        while self.iteration < steps:
            stats = self.step(next_batch())
            stats.update(extra())
            last = self.iteration == steps
            if evaluate is not None and (last or (cfg.eval_every and self.iteration % cfg.eval_every == 0)):
                stats.update(evaluate())
            self.history.append(stats)
            if metrics is not None:
                append_metrics(stats, metrics)
            bar.update(1)
            bar.set_postfix(self.progress_postfix(stats))
            if ckpt is not None and (last or (cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0)):
                self.save(ckpt)
        bar.close()
        return self.history

    # ------------------------------------------------------------------ epochs over a fixed data set (DPO, SFT)
    def steps_per_epoch(self, n_records: int) -> int:
        """Optimizer steps in one pass over ``n_records`` records (the last batch may be smaller)."""
        return math.ceil(n_records / self.config.batch_size)

    def batch_rows(self, step: int, n_records: int) -> list[int]:
        """Rows of step ``step`` (0-based): each epoch is its own permutation, seeded by (seed, epoch), so a resumed run sees the same batches."""
        spe = self.steps_per_epoch(n_records)
        epoch, k = divmod(step, spe)
        order = torch.randperm(n_records, generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch))
        b = self.config.batch_size
        return order[k * b: (k + 1) * b].tolist()

    def process_rows(self, rows: Sequence[int]) -> list[int]:
        """This process's contiguous part of a global batch of ``rows`` (sizes differ by at most one; all of it with one)."""
        rows = list(rows)
        if self.world > 1:
            bounds = [len(rows) * r // self.world for r in range(self.world + 1)]
            rows = rows[bounds[self.rank]: bounds[self.rank + 1]]
        return rows

    def run_epochs(self, n_records: int, epochs: float, checkpoint_dir=None, evaluate: Callable[[], dict] | None = None,
                   progress: bool | None = None) -> list[dict]:
        """:meth:`run` for ``epochs`` passes (may be fractional) over a data set of ``n_records`` records.

        ``self.step`` gets each step's rows (:meth:`batch_rows`); every row of the history has ``epoch``.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs >= 0:
            raise ValueError(f"epochs must be a number >= 0, got {epochs!r}")
        spe = self.steps_per_epoch(n_records)
        steps = math.ceil(epochs * spe - 1e-9)
        last = n_records - (spe - 1) * self.config.batch_size
        if min(last, self.config.batch_size) < self.world:
            raise ValueError(f"a step of {min(last, self.config.batch_size)} records (batch_size="
                             f"{self.config.batch_size}, {n_records} records) would leave one of the {self.world} "
                             f"processes without any: use a batch_size whose last batch has at least {self.world} records")
        return self.run(steps, lambda: self.batch_rows(self.iteration, n_records), checkpoint_dir, evaluate, progress,
                        extra=lambda: {"epoch": round(self.iteration / spe, 4)})


class OnPolicyTrainer(PolicyTrainer):
    """Sample -> :func:`~rlhf_book.experience.make_experience` -> ``update`` on a causal LM, against ``reward_fn``.

    ``policy``: a causal LM (trained in place) or a :class:`~rlhf_book.critic.PolicyWithValueHead`;
    ``ref_model``: a separate frozen copy of it (pi_ref), or None for a ``peft.PeftModel`` policy (LoRA):
    then pi_ref is the policy with its adapters disabled, no second copy; ``reward_fn(prompts, responses,
    terminated) -> (B,)``: what is optimised (a learned reward model, e.g.
    :func:`rlhf_book.reward_model.reward_fn_from_model`, or any function of the text);
    ``critic``: a module to use as the critic (e.g. ``ValueModel.from_reward_model(rm)``),
    else ``config.critic`` decides (``"none"``, which a critic-free config such as
    :class:`~rlhf_book.critic_free.CriticFreeConfig` declares: no value model at all, V = 0 in
    the experience, no critic parameters in the optimizer); ``gold_fn`` (same signature, or
    None): a reward that is only logged (``gold_reward``), never learned from.

    One device rule (:class:`PolicyTrainer`), the critic included. After each
    :meth:`step`, ``experience`` is that iteration's :class:`~rlhf_book.experience.Experience`
    (to inspect what the update saw) and ``timings`` the seconds of its phases (``generate``;
    ``experience``, of which ``reward`` in the reward function and ``forwards`` in the
    reference and critic; ``update``), also logged as ``*_seconds``: benchmarks read them
    instead of patching the trainer. On CUDA each phase boundary synchronises the device.
    ``reward_shaping`` (None, or rollout -> (B,)): a term added to every reply's score in the
    experience step (the critic-free trainer's DAPO overlong penalty); ``prompt_stream``: during
    :meth:`train`, its prompt draw (what a step that samples more prompts draws from), else None.
    """

    name = "RL"
    config_class = OnPolicyConfig
    samples_per_prompt = 1  # responses sampled per prompt in step() (a critic-free trainer's K)

    def __init__(
        self,
        policy: nn.Module,
        ref_model: nn.Module,
        tokenizer,
        reward_fn: Callable,
        config: OnPolicyConfig | None = None,
        critic: nn.Module | None = None,
        gold_fn: Callable | None = None,
        accelerator=None,
    ):
        if reward_fn is None:  # on-policy RL needs one; the base checks that it is a function
            raise ValueError("reward_fn must be a function (prompts, responses, terminated) -> (B,) scores, got None")
        super().__init__(policy, ref_model, tokenizer, config, reward_fn, gold_fn, accelerator)
        cfg, lm = self.config, self.lm
        # the critic: none, a module given, the policy's value head, a new value head, or a separate copy of the trunk
        self.has_critic = cfg.critic != "none"
        if not self.has_critic:
            if critic is not None or isinstance(policy, PolicyWithValueHead):
                raise ValueError(f"{type(cfg).__name__}.critic is 'none' (no critic) but a critic was given "
                                 f"({'critic=' if critic is not None else 'a policy with a value head: '}"
                                 f"{type(critic if critic is not None else policy).__name__}); pass the bare causal LM")
            model = lm
        elif critic is not None:
            model = lm
        elif isinstance(policy, PolicyWithValueHead):
            model = policy
        elif cfg.critic == "head":
            model = PolicyWithValueHead(lm, detach_value_head=cfg.detach_value_head)
        else:
            model, critic = lm, ValueModel.from_causal_lm(lm)
        if isinstance(model, PolicyWithValueHead):
            model.detach_value_head = cfg.detach_value_head
        self.model, self.critic = model, critic
        self.model.to(self.device)
        if self.critic is not None:
            self.critic.to(self.device)
        for m in (self.model, self.critic):  # the value head, a separate critic: held as the dtype rule says
            hold_trainable(m, cfg.trainable_dtype)
        if cfg.gradient_checkpointing and self.critic is not None:
            _enable_gradient_checkpointing(getattr(self.critic, "trunk", self.critic), "critic's trunk")
        if cfg.disable_dropout:
            for m in (self.model, self.critic):
                if m is not None:
                    disable_dropout(m)
        # one optimizer: the actor's parameters and the critic's (if any), each group with its learning rate
        self.actor_params = [p for p in lm.parameters() if p.requires_grad]
        groups = [{"params": self.actor_params, "lr": cfg.lr}]
        self.critic_params = []
        if self.has_critic:
            critic_module = self.critic if self.critic is not None else self.model.value_head
            self.critic_params = [p for p in critic_module.parameters() if p.requires_grad]
            groups.append({"params": self.critic_params, "lr": cfg.critic_lr if cfg.critic_lr is not None else cfg.lr})
        self.optimizer = adam(groups, lr=cfg.lr, eps=cfg.adam_eps)
        self.prepare_trainables(self.model, self.critic)
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        name, options = cfg.advantage_spec()
        self.advantage_estimator = get_advantage_estimator(name, **options)  # built once: REINFORCE's holds a state
        # a term of each reply added to its score in the experience step (rollout -> (B,); the critic-free trainer's
        # DAPO overlong penalty), and where a step draws more prompts (train() sets it for its run: dynamic sampling)
        self.reward_shaping: Callable[[Rollout], torch.Tensor] | None = None
        self.prompt_stream: Callable[[], list] | None = None
        self.experience: Experience | None = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ one iteration
    def step(self, prompts: Sequence) -> dict:
        """One iteration on ``prompts`` (strings or records): sample, make the experience, update; returns its stats."""
        t0, timings = time.perf_counter(), {}
        with timed(timings, "generate", self.device):
            rollout = self.sample(prompt_texts(prompts), samples_per_prompt=self.samples_per_prompt)
        return self.learn(rollout, timings, t0)

    def learn(self, rollout: Rollout, timings: dict | None = None, t0: float | None = None,
              raw_scores: torch.Tensor | None = None) -> dict:
        """The rest of an iteration, on a sampled ``rollout`` (this process's share): experience, update, stats.

        The statistics are those of the global batch (gathered from every process) and the
        KL controller moves on them, so every process logs and uses the same numbers.
        ``raw_scores``: the reward function's scores of ``rollout`` if already computed (not scored again).
        """
        t0, timings = time.perf_counter() if t0 is None else t0, {} if timings is None else timings
        with timed(timings, "experience", self.device):
            # raw_scores only when given: an override of make_experience(rollout, timings) keeps working
            exp = (self.make_experience(rollout, timings) if raw_scores is None
                   else self.make_experience(rollout, timings, raw_scores=raw_scores))
        with timed(timings, "update", self.device):
            update_stats = self.update(exp)
        stats = {"step": self.iteration + 1, **self.experience_stats(gather_experience(self.accelerator, exp)),
                 **mean_across(self.accelerator, update_stats)}
        self.kl_ctl.update(stats["kl"], len(exp) * self.world)
        stats["next_beta"] = self.kl_ctl.value
        self.experience, self.timings = exp, timings
        stats.update({f"{k}_seconds": v for k, v in timings.items()}, step_seconds=time.perf_counter() - t0)
        self.iteration += 1
        return stats

    def make_experience(self, rollout: Rollout, timings: dict | None = None,
                        raw_scores: torch.Tensor | None = None) -> Experience:
        """:func:`rlhf_book.experience.make_experience` with this trainer's models, config and ``reward_shaping`` (eval
        mode, no grad); ``raw_scores``: the reward function's scores of ``rollout`` if already computed."""
        cfg = self.config
        self.train_mode(False)
        critic = self.critic if self.critic is not None else (self.model if self.has_critic else None)  # None: V = 0
        # sampling (KV cache, one column at a time) and teacher forcing round differently under bf16 autocast or
        # with any policy weight not in fp32: then log pi_old is the teacher-forced one (rlhf_book.runtime)
        recompute = cfg.recompute_old_logprobs or mixed_numerics(self.lm, self.precision)
        steps = None
        if isinstance(self.reward_fn, StepReward):  # a process reward: one reward per step, and the replies' totals
            steps = self.reward_fn.token_rewards(rollout, self.tokenizer, stop_token_ids(self.lm, self.tokenizer))
            raw_scores = steps.totals if raw_scores is None else raw_scores
        with self.autocast():  # a reward model's forward runs in bf16 too
            return make_experience(
                rollout, self.reward_fn, self.compiled(self.ref), self.compiled(critic), kl_coef=self.kl_ctl.value,
                kl_penalty=cfg.kl_penalty, gamma=cfg.gamma, lam=cfg.lam, missing_eos_score=cfg.missing_eos_score,
                whiten_rewards=cfg.whiten_rewards, whiten_advantages=cfg.whiten_advantages,
                policy=self.compiled(self.lm) if recompute else None, gold_fn=self.gold_fn, timings=timings,
                forward_batch_size=cfg.forward_batch_size, logprob_chunk_size=cfg.logprob_chunk_size,
                advantage_estimator=self.advantage_estimator, group_size=self.samples_per_prompt,
                accelerator=self.accelerator, reward_shaping=self.reward_shaping, raw_scores=raw_scores,
                step_rewards=steps,
            )

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """:func:`~rlhf_book.advantage.masked_whiten` with the statistics of the global batch (N processes: gathered)."""
        return global_whiten(self.accelerator, x, mask, shift_mean)

    def update(self, experience: Experience) -> dict:
        """The algorithm: learn from one experience batch; returns its statistics (floats). Subclasses implement it."""
        raise NotImplementedError

    def clipped_update(self, exp: Experience, loss_fn: Callable, *, epochs: int = 1, minibatch_size: int | None = None,
                       loss_unit: str | None = "tokens", params: Sequence[torch.Tensor] | None = None,
                       target_kl: float | None = None, shuffle: bool | None = None) -> dict:
        """``epochs`` passes of minibatch gradient steps over one experience batch: the one update loop (PPO,
        GRPO/RLOO/REINFORCE, A2C); returns the statistics (floats).

        Each epoch permutes this process's rows (``shuffle``: True, every epoch; None, only when
        there are several minibatches; False, never) and takes one optimizer step per minibatch
        of ``minibatch_size`` rows (a global count, like ``batch_size``; None: all rows), split
        into ``gradient_accumulation_steps`` micro-batches (:meth:`accumulate`).
        ``loss_fn(batch) -> (loss, stats)``: a mean over the batch's ``loss_unit`` ("tokens",
        "rows", or None: already normalised by a global count); ``params``: the one joint clip
        group (default: actor and critic). With ``target_kl``, stops once a minibatch's approx-KL
        (averaged over processes, so all agree) exceeds it.

        Reported: the mean over optimizer steps of each statistic, the first step's ratio, clip
        fraction and approx-KL (``first_*``: 1, 0, 0 up to float rounding when log pi_old is the
        policy's own; when ``loss_fn`` reports them), ``epochs``, ``updates`` and ``early_stop``.
        """
        N = len(exp)  # this process's rows
        mb = N if minibatch_size is None else min(local_size(minibatch_size, self.world, "minibatch_size"), N)
        n_steps = math.ceil(N / mb)
        params = list(self.actor_params) + list(self.critic_params) if params is None else list(params)
        self.train_mode(True)  # dropout as configured (disable_dropout: p = 0); checkpointing needs train mode
        steps: list[dict] = []  # per optimizer step: statistics as 0-d tensors (read once at the end)
        early_stop, done = False, 0
        for _ in range(epochs):
            permute = shuffle or (shuffle is None and n_steps > 1)
            order = torch.randperm(N, generator=self.generator, device=self.device).tolist() if permute else None
            for start in range(0, N, mb):  # one host read per epoch
                batch = exp if order is None else exp.select(order[start: start + mb])
                cuts = self.micro_batches(len(batch))
                parts = [batch] if len(cuts) == 1 else [batch.select(range(c.start, c.stop)) for c in cuts]
                tokens = [p.mask.sum() for p in parts]
                counts = {"tokens": tokens, "rows": [float(len(p)) for p in parts], None: None}[loss_unit]
                steps.append(self.accumulate(parts, loss_fn, params, counts, tokens))
                if target_kl is not None and self.process_mean(steps[-1]["approx_kl"]).item() > target_kl:
                    early_stop = True
                    break
            done += 1
            if early_stop:
                break
        self.train_mode(False)
        out = {k: torch.stack([torch.as_tensor(s[k]).float() for s in steps]).mean().item() for k in steps[0]}
        out.update({f"first_{k}": float(steps[0][k]) for k in ("ratio_mean", "clipfrac", "approx_kl") if k in steps[0]})
        out.update(epochs=done, updates=len(steps), early_stop=early_stop)
        return out

    # ------------------------------------------------------------------ pieces an update uses
    def policy_forward(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log pi_theta(a_t | s_t), V(s_t), entropy) of ``rollout``'s tokens, (B, R) each, with grad.

        One teacher-forced forward of the policy (which also gives V with a value head),
        plus one of the separate critic if there is one; V = 0 without a critic.
        """
        cfg = self.config
        with self.autocast():
            logprobs, values, entropy = forward_logprobs_and_values(
                self.compiled(self.trainable(self.model)), rollout, cfg.temperature, entropy_grad=cfg.entropy_coef > 0,
                chunk_size=cfg.logprob_chunk_size)
            if self.critic is not None:
                values = response_values(self.compiled(self.trainable(self.critic)), rollout)
        return logprobs, (torch.zeros_like(logprobs) if values is None else values.float()), entropy

    def values(self, rollout: Rollout) -> torch.Tensor:
        """V(s_t) of ``rollout``'s tokens under the current critic, (B, R), with grad."""
        if not self.has_critic:
            raise ValueError(f"this trainer has no critic ({type(self.config).__name__}.critic is 'none')")
        with self.autocast():
            critic = self.critic if self.critic is not None else self.model
            return response_values(self.compiled(self.trainable(critic)), rollout).float()

    def kl_penalty_loss(self, logprobs: torch.Tensor, experience: Experience) -> torch.Tensor | float:
        """beta * mean k3 KL(pi_theta || pi_ref) when the KL goes in the loss (``kl_penalty="loss"``), else 0."""
        if experience.kl_penalty != "loss" or experience.kl_coef <= 0:
            return 0.0
        return experience.kl_coef * kl_loss(logprobs, experience.ref_logprobs, experience.mask)

    def train_mode(self, on: bool) -> None:
        """Train (dropout as configured) or eval mode for the policy and the critic."""
        self.model.train(on)
        if self.critic is not None:
            self.critic.train(on)

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def experience_stats(self, exp: Experience) -> dict:
        """The statistics of an experience batch every algorithm logs (floats); the keys are listed in the README.

        Without a critic there is no ``explained_variance`` nor ``value_mean``.
        """
        mask = exp.mask
        seq_k1 = sequence_kl(exp.kl, mask)
        seq_k3 = sequence_kl(kl_k3(exp.old_logprobs, exp.ref_logprobs), mask)
        beta = exp.kl_coef
        stats = {
            "proxy_reward": exp.raw_scores.mean().item(),
            "score": exp.scores.mean().item(),
            "kl": seq_k1.mean().item(),
            "kl_k3": seq_k3.mean().item(),
            "beta": beta,
            "non_score_reward": (-beta * seq_k1).mean().item() if exp.kl_penalty == "reward" else 0.0,
            "response_length": exp.rollout.response_lengths.float().mean().item(),
            "terminated": exp.rollout.terminated.float().mean().item(),
        }
        if self.has_critic:
            stats["explained_variance"] = explained_variance(exp.values, exp.returns, mask)
            stats["value_mean"] = masked_mean(exp.values, mask).item()
        stats["return_mean"] = masked_mean(exp.returns, mask).item()
        stats["return_var"] = masked_var(exp.returns, mask).item()  # what explained variance divides by
        if exp.gold is not None:
            stats["gold_reward"] = exp.gold.mean().item()
        return stats

    def progress_postfix(self, stats: dict) -> dict:
        """What the progress bar shows after an iteration."""
        return {"proxy": f"{stats['proxy_reward']:.2f}", "gold": f"{stats.get('gold_reward', float('nan')):.2f}",
                "kl": f"{stats['kl']:.2f}", "beta": f"{stats['beta']:.3f}"}

    # ------------------------------------------------------------------ checkpoints
    def stateful(self) -> dict:
        """Objects with ``state_dict``/``load_state_dict`` besides model and critic, by checkpoint key."""
        return {"optimizer": self.optimizer, "kl_ctl": self.kl_ctl}

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.critic is not None and "critic" not in state:
            raise ValueError("checkpoint has no separate critic but this trainer has one")
        super().load_state_dict(state)
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])

    # ------------------------------------------------------------------ the loop
    def train(
        self,
        prompt_list: Sequence,
        iterations: int,
        checkpoint_dir: str | Path | None = None,
        eval_prompts: Sequence | None = None,
        progress: bool | None = None,
    ) -> list[dict]:
        """Run until ``iterations`` iterations are done; returns the history (one dict per iteration, key ``step``).

        Each iteration draws ``batch_size`` distinct prompts from ``prompt_list`` (with N
        processes, the same ones on each, which then samples its ``batch_size / N``); during
        the run ``prompt_stream`` is that draw, where a step that wants more prompts takes
        the next ones (dynamic sampling), so a resumed run draws them as the uninterrupted one. With
        ``eval_prompts``, iteration 0 (before training), every ``eval_every``-th iteration and
        the last one also carry :meth:`evaluate`'s ``eval_*`` statistics. With
        ``checkpoint_dir`` the run is resumable and streams its metrics (see :meth:`run`).
        ``progress`` (default ``config.progress``) shows a tqdm bar.
        """
        cfg = self.config
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
        texts = prompt_texts(prompt_list)
        if len(texts) < cfg.batch_size:
            raise ValueError(f"prompt_list has {len(texts)} prompts, fewer than batch_size={cfg.batch_size}")
        eval_texts = prompt_texts(eval_prompts) if eval_prompts is not None else None

        shard(cfg.batch_size, 0, self.world)  # a batch that does not split evenly over the processes fails here

        def next_batch() -> list[str]:  # the same global batch on every process, then this process's share
            order = torch.randperm(len(texts), generator=self.data_generator, device=self.device)[: cfg.batch_size]
            return self.shard([texts[i] for i in order.tolist()])

        evaluate = (lambda: self.evaluate(eval_texts)) if eval_texts is not None else None
        self.prompt_stream = next_batch
        try:
            return self.run(iterations, next_batch, checkpoint_dir, evaluate, progress)
        finally:
            self.prompt_stream = None


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
    if path.is_dir():
        raise ValueError(f"{path} is a directory; the metrics file needs that name: move the directory away")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
        fsync_replace(tmp, path)
    except OSError as e:  # nothing half-written is left behind
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"the metrics file could not be written ({e.strerror})", str(path)) from None


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a JSONL metrics file (a last line cut off by a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def save_history(history: list[dict], path: str | Path) -> Path:
    """Write a run's history as one JSON list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(history, indent=1))
    return path
