"""PPO for RLHF: the clipped surrogate, the KL-regularised reward, and the training loop.

One PPO iteration on a batch of prompts (what :meth:`PPOTrainer.step` does):

1. **rollout**: sample one response per prompt from pi_theta (KV cache) and keep
   log pi_old(a_t | s_t) from the sampling itself (no second forward);
2. **score**: one forward of the frozen reference pi_ref for log pi_ref(a_t | s_t), one
   forward of the critic for V(s_t), the reward function for the score r(x, y)
   (replaced by ``missing_eos_score`` when the response never ended). The first
   minibatch's forward (step 4) is done here, at theta_old: it gives V_old of its rows and
   its graph is kept for the first update, so no row is forwarded twice with the same weights;
3. **rewards and advantages**: r_t = -beta (log pi_old - log pi_ref) + [t = last] score
   (:func:`rlhf_book.rewards.per_token_rewards`), optionally scaled (whitened without mean
   shift), then GAE (:func:`rlhf_book.advantage.gae`) and whitened advantages;
4. **PPO epochs**: ``ppo_epochs`` passes over shuffled minibatches minimising

       L = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)       rho_t = pi_theta / pi_old
           + vf_coef * value loss (clipped) - entropy_coef * entropy [+ beta * k3 KL loss]

   with gradient clipping, stopping early when the approx-KL(pi_old || pi_theta) of a
   minibatch exceeds ``target_kl``;
5. **beta**: the KL controller sees the batch's mean sequence KL (fixed or adaptive).

The implementation details that matter at this scale (Huang et al. 2024, "The N+
implementation details of RLHF with PPO") are :class:`PPOConfig` options, each
documented where it is declared.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .advantage import gae, masked_mean, masked_whiten
from .critic import PolicyWithValueHead, ValueModel, explained_variance, forward_logprobs_and_values, response_values
from .gold import gold_reward_fn
from .kl import kl_k1, kl_k3, kl_loss, make_kl_controller, sequence_kl
from .losses import value_loss
from .runtime import adam
from .rewards import per_token_rewards
from .trainer import OnPolicyTrainer, SpeedConfig, check_config, config_from_dict
from .rollout import Rollout, generate, prompt_texts, response_logprobs, score_rollout

__all__ = [
    "ppo_policy_loss", "PPOConfig", "PPOTrainer", "disable_dropout", "build_critic",
    "save_history", "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "ppo_state.pt"


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    as_tensors: bool = False,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate -mean_t min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t); (B, T) -> (scalar, stats).

    rho_t = exp(logprobs - old_logprobs); ``old_logprobs`` and ``advantages`` are constants.
    The mean is over real tokens of the batch. ``stats`` (floats): ``clipfrac`` (share of
    tokens where the clipped term is the active one, so their gradient is 0),
    ``approx_kl`` (k3 estimate of KL(pi_old || pi_theta) per token, >= 0), ``approx_kl_k1``
    and ``ratio_mean``. ``as_tensors=True`` leaves them as 0-d tensors on the device
    (reading a float from a GPU waits for it; the trainer reads once per iteration).
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logprobs has {tuple(logprobs.shape)}")
    m = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), zero)  # 0 on padding: no inf/NaN there
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.detach(), zero)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            # samples come from pi_old: KL(pi_old || pi_theta) with log r = log pi_theta - log pi_old
            "approx_kl": masked_mean(kl_k3(old_logprobs.detach(), logprobs), mask),
            "approx_kl_k1": masked_mean(-log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, (stats if as_tensors else {k: v.item() for k, v in stats.items()})


@dataclass
class PPOConfig(SpeedConfig):
    """Every knob of :class:`PPOTrainer`; defaults are the measured CPU recipe (chapter 5)."""

    # --- rollouts
    batch_size: int = 32  # prompts (= responses) per iteration
    max_new_tokens: int = 40  # responses that have not produced EOS by then are cut off (terminated = False)
    # Sampling temperature T. The policy's *and the reference's* logits are divided by T in every
    # log-prob (N+ detail: otherwise the "KL" compares a T-sharpened policy with an unsharpened
    # reference and starts > 0 before any update).
    temperature: float = 1.0
    # --- optimisation
    lr: float = 1e-4  # Adam learning rate of the policy (and of the value head on it)
    critic_lr: float | None = None  # learning rate of a separate critic (ValueModel); None: same as lr
    adam_eps: float = 1e-5  # N detail: TF's Adam epsilon; PyTorch's 1e-8 makes the first updates aggressive
    ppo_epochs: int = 4  # passes over each rollout batch
    minibatch_size: int = 16  # responses per gradient step (batch_size / minibatch_size steps per epoch)
    clip_range: float = 0.2  # eps of the probability-ratio clip
    value_clip_range: float | None = 0.2  # clip V to V_old +- this in the value loss (None: no clipping)
    vf_coef: float = 0.1  # weight of the value loss
    entropy_coef: float = 0.0  # entropy bonus weight (0: off; RLHF usually relies on the KL instead)
    max_grad_norm: float | None = 1.0  # gradient-norm clip (None: off)
    target_kl: float | None = None  # early-stop the epochs once a minibatch's approx-KL(old||new)/token exceeds it
    # --- returns
    gamma: float = 1.0  # discount (1: the score at the end counts fully for every token)
    lam: float = 0.95  # GAE lambda
    # --- the KL to the reference
    kl_coef: float = 0.1  # beta (initial value when adaptive)
    kl_target: float | None = None  # sequence KL target (nats) of the adaptive controller (None: fixed beta)
    kl_horizon: float = 10_000  # adaptive controller horizon (episodes)
    # "reward": -beta * k1 per token in the reward (InstructGPT); "loss": +beta * mean k3 in the loss (GRPO)
    kl_penalty: str = "reward"
    # --- implementation details (Huang et al.)
    missing_eos_score: float | None = -1.0  # score that replaces r(x, y) when no EOS was produced (None: keep r)
    whiten_rewards: bool = False  # scale per-token rewards to unit variance per batch, mean not shifted
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 per batch
    detach_value_head: bool = True  # value head on the policy reads detached features (value loss can't move the trunk)
    disable_dropout: bool = True  # dropout off in policy, reference and critic (else the ratio is noisy at the start)
    recompute_old_logprobs: bool = False  # re-forward for log pi_old instead of using the rollout's own (equal) ones
    # --- speed: precision, tf32, compile, generation_threads (inherited from SpeedConfig)
    # --- bookkeeping
    seed: int = 0  # seeds prompt sampling, generation and minibatch shuffling
    eval_every: int = 10  # iterations between held-out evaluations in train() (0: only first and last)
    eval_samples: int = 3  # responses kept in the history at each evaluation
    checkpoint_every: int = 10  # iterations between checkpoints in train() (when checkpoint_dir is given)
    progress: bool = True  # tqdm bar in train()

    def __post_init__(self):
        check_config(
            self,
            positive=("batch_size", "max_new_tokens", "temperature", "lr", "adam_eps", "ppo_epochs", "minibatch_size",
                      "clip_range"),
            positive_or_none=("value_clip_range", "critic_lr", "max_grad_norm", "target_kl", "kl_target"),
            nonnegative=("vf_coef", "entropy_coef", "kl_coef", "eval_every", "checkpoint_every", "eval_samples"),
            unit_interval=("gamma", "lam"),
        )
        if self.kl_penalty not in ("reward", "loss"):
            raise ValueError(f"PPOConfig.kl_penalty must be 'reward' or 'loss', got {self.kl_penalty!r}")
        self.check_speed()
        if self.minibatch_size < self.batch_size and self.batch_size % self.minibatch_size:
            raise ValueError(
                f"PPOConfig.batch_size ({self.batch_size}) must be a multiple of minibatch_size ({self.minibatch_size}): "
                "otherwise the last minibatch of every epoch is smaller and its tokens weigh more"
            )
        if self.kl_target is not None and self.kl_coef <= 0:
            raise ValueError("PPOConfig.kl_target (adaptive KL) needs kl_coef > 0 as the initial beta")

    @classmethod
    def from_dict(cls, d: dict) -> "PPOConfig":
        """Build from a dict (e.g. a config file's [ppo] table), naming any unknown key."""
        return config_from_dict(cls, d)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set p = 0 in every ``nn.Dropout`` of ``model`` (and in-place returns it)."""
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return model


def build_critic(kind: str, policy: nn.Module | None = None, reward_model: nn.Module | None = None) -> nn.Module | None:
    """The critic for ``kind``: "head" (None: a value head on the policy), "reward_model" or "base" (a ValueModel)."""
    if kind == "head":
        return None
    if kind == "reward_model":
        if reward_model is None:
            raise ValueError("critic='reward_model' needs the reward model")
        return ValueModel.from_reward_model(reward_model)
    if kind == "base":
        if policy is None:
            raise ValueError("critic='base' needs the policy LM")
        return ValueModel.from_causal_lm(policy)
    raise ValueError(f"unknown critic kind {kind!r}; choose 'head', 'reward_model' or 'base'")


class PPOTrainer(OnPolicyTrainer):
    """PPO on a causal LM against ``reward_fn``, regularised toward the frozen ``ref_model``.

    ``policy``: a causal LM (trained in place) or a :class:`~rlhf_book.critic.PolicyWithValueHead`.
    ``critic``: None for a value head on the policy, or a separate
    :class:`~rlhf_book.critic.ValueModel` (e.g. ``ValueModel.from_reward_model(rm)``, see
    :func:`build_critic`). ``reward_fn(prompts, responses, terminated) -> (B,)`` is the proxy
    being optimised; ``gold_fn`` (same signature, or None) is only logged.
    """

    name = "PPO"
    checkpoint_name = CHECKPOINT_NAME

    def __init__(
        self,
        policy: nn.Module,
        ref_model: nn.Module,
        tokenizer,
        reward_fn: Callable,
        config: PPOConfig | None = None,
        critic: nn.Module | None = None,
        gold_fn: Callable | None = gold_reward_fn,
    ):
        self.config = cfg = config if config is not None else PPOConfig()
        if ref_model is policy or (isinstance(policy, PolicyWithValueHead) and ref_model is policy.lm):
            raise ValueError("ref_model must be a separate frozen copy of the policy, not the policy itself")
        if isinstance(policy, PolicyWithValueHead):
            self.model, self.lm = policy, policy.lm
            policy.detach_value_head = cfg.detach_value_head
        elif critic is None:
            self.model, self.lm = PolicyWithValueHead(policy, detach_value_head=cfg.detach_value_head), policy
        else:
            self.model = self.lm = policy
        self.device = next(self.lm.parameters()).device
        self.model.to(self.device)
        self.critic = critic.to(self.device) if critic is not None else None
        self.ref = ref_model.eval().requires_grad_(False)
        self.tokenizer, self.reward_fn, self.gold_fn = tokenizer, reward_fn, gold_fn
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("tokenizer needs a PAD token distinct from EOS (else EOS is masked out and never learned)")
        if cfg.disable_dropout:
            for m in (self.model, self.ref, self.critic):
                if m is not None:
                    disable_dropout(m)
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": cfg.lr}]
        if self.critic is not None:
            critic_params = [p for p in self.critic.parameters() if p.requires_grad]
            groups.append({"params": critic_params, "lr": cfg.critic_lr if cfg.critic_lr is not None else cfg.lr})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = adam(groups, lr=cfg.lr, eps=cfg.adam_eps)
        self.setup_speed()
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.iteration = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ one iteration
    @torch.no_grad()
    def _score(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw reward-function scores, scores after the missing-EOS rule), both (B,)."""
        with self.autocast():  # a reward model's forward runs in bf16 too
            raw = score_rollout(self.reward_fn, rollout, self.device)
        if self.config.missing_eos_score is None:
            return raw, raw
        return raw, torch.where(rollout.terminated, raw, torch.full_like(raw, self.config.missing_eos_score))

    def _forward(self, rollout: Rollout, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log pi_theta(a_t | s_t), V(s_t), entropy) of responses ``idx``, (b, R) each, with grad.

        One teacher-forced forward of the policy (which also gives V with a value head),
        plus one of the separate critic if there is one.
        """
        ids = (rollout.prompt_ids[idx], rollout.prompt_mask[idx], rollout.response_ids[idx], rollout.response_mask[idx])
        with self.autocast():
            logprobs, values, entropy = forward_logprobs_and_values(
                self.compiled(self.model), *ids, temperature=self.config.temperature,
                entropy_grad=self.config.entropy_coef > 0,
            )
            if self.critic is not None:
                values = response_values(self.compiled(self.critic), *ids)
        return logprobs, values.float(), entropy

    @torch.no_grad()
    def _prepare(self, rollout: Rollout, first: tuple | None = None) -> dict:
        """Old log-probs, ref log-probs, old values, rewards, advantages and returns of a rollout, (B, R) each.

        ``first = (idx, forward)``: the rows ``idx`` were already forwarded at theta_old by
        :meth:`_forward` (the first minibatch's forward, kept for its update); their V_old
        (and log pi_old when recomputed) are read from it instead of a second forward.
        """
        cfg = self.config
        B, mask = len(rollout), rollout.response_mask
        # the rollout recorded log pi_old(a_t | s_t) while sampling, at this temperature: no second forward.
        # Under bf16 sampling and teacher forcing round differently (~1e-2), so log pi_old comes from the
        # training forward and the first ratio is exactly 1.
        recompute = cfg.recompute_old_logprobs or rollout.temperature != cfg.temperature or self.precision == "bf16"
        old_logprobs = rollout.logprobs.clone() if recompute else rollout.logprobs
        values = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
        rest = torch.arange(B, device=self.device)
        if first is not None:
            idx, (lp, v, _) = first
            values[idx] = v.detach()
            if recompute:
                old_logprobs[idx] = lp.detach()
            keep = torch.ones(B, dtype=torch.long, device=self.device).index_fill(0, idx, 0)
            rest = torch.argsort(keep, descending=True, stable=True)[: B - idx.numel()]  # the other rows, in order
        if rest.numel() > 0:
            ids = (rollout.prompt_ids[rest], rollout.prompt_mask[rest], rollout.response_ids[rest], mask[rest])
            with self.autocast():
                if recompute and self.critic is None:  # one policy forward gives both
                    lp, v, _ = forward_logprobs_and_values(self.model, *ids, temperature=cfg.temperature)
                else:
                    v = response_values(self.critic if self.critic is not None else self.model, *ids)
                    if recompute:
                        lp = response_logprobs(self.lm, *ids, temperature=cfg.temperature)
            values[rest] = v.float()
            if recompute:
                old_logprobs[rest] = lp
        ids = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, mask)
        with self.autocast():
            ref_logprobs = response_logprobs(self.compiled(self.ref), *ids, temperature=cfg.temperature)
        raw, scores = self._score(rollout)
        beta = self.kl_ctl.value
        kl_coef = beta if cfg.kl_penalty == "reward" else 0.0
        rewards, kl = per_token_rewards(scores, mask, old_logprobs, ref_logprobs, kl_coef=kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return {
            "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "values": values, "rewards": rewards,
            "advantages": advantages, "returns": returns, "raw_scores": raw, "scores": scores, "kl": kl, "beta": beta,
        }

    def _minibatch_loss(self, rollout: Rollout, batch: dict, idx: torch.Tensor, beta: float, forward=None):
        """(PPO loss, stats as 0-d tensors) of the responses ``idx``; ``forward``: their :meth:`_forward` if done already."""
        cfg = self.config
        mask = rollout.response_mask[idx]
        logprobs, values, entropy = forward if forward is not None else self._forward(rollout, idx)
        old, adv = batch["old_logprobs"][idx], batch["advantages"][idx]
        pg_loss, stats = ppo_policy_loss(logprobs, old, adv, mask, cfg.clip_range, as_tensors=True)
        v_loss = value_loss(values, batch["returns"][idx], mask, batch["values"][idx], cfg.value_clip_range)
        ent = masked_mean(entropy, mask)
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.entropy_coef * ent
        if cfg.kl_penalty == "loss" and beta > 0:
            loss = loss + beta * kl_loss(logprobs, batch["ref_logprobs"][idx], mask)
        stats.update(policy_loss=pg_loss.detach(), value_loss=v_loss.detach(), entropy=ent.detach(), loss=loss.detach())
        return loss, stats

    def step(self, prompts: Sequence) -> dict:
        """One PPO iteration on ``prompts`` (strings or records); returns its statistics (floats).

        The update loop never reads a number back from the device (that would stall a GPU)
        except for ``target_kl``'s test; the statistics are read once at the end.
        """
        cfg, t0 = self.config, time.perf_counter()
        texts = prompt_texts(prompts)
        with self.autocast():
            rollout = generate(self.lm, self.tokenizer, texts, cfg.max_new_tokens, cfg.temperature,
                               generator=self.generator, threads=cfg.generation_threads)
        mask = rollout.response_mask
        B = len(rollout)
        mb = min(cfg.minibatch_size, B)
        self.model.eval()  # V_old and log pi_old without dropout
        if self.critic is not None:
            self.critic.eval()
        perm = torch.randperm(B, generator=self.generator, device=self.device)  # the first epoch's order
        # The first minibatch's forward runs at theta_old: it gives V_old for its rows, and its
        # graph is kept for the first update, so those rows are not forwarded twice (with
        # dropout on, V_old must come from a dropout-free forward instead).
        first = (perm[:mb], self._forward(rollout, perm[:mb])) if cfg.disable_dropout else None
        batch = self._prepare(rollout, first)
        self.model.train(not cfg.disable_dropout)
        if self.critic is not None:
            self.critic.train(not cfg.disable_dropout)
        mb_stats: list[dict] = []
        early_stop, epochs_run = False, 0
        for epoch in range(cfg.ppo_epochs):
            if epoch > 0:
                perm = torch.randperm(B, generator=self.generator, device=self.device)
            for start in range(0, B, mb):
                idx = perm[start : start + mb]
                reuse = first[1] if (first is not None and epoch == 0 and start == 0) else None
                loss, stats = self._minibatch_loss(rollout, batch, idx, batch["beta"], reuse)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                stats["grad_norm"] = torch.tensor(float("nan"), device=self.device)
                if cfg.max_grad_norm:
                    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                mb_stats.append(stats)
                if cfg.target_kl is not None and stats["approx_kl"].item() > cfg.target_kl:
                    early_stop = True
                    break
            epochs_run += 1
            if early_stop:
                break
        first = None  # release the first forward's graph
        self.model.eval()
        if self.critic is not None:
            self.critic.eval()

        with torch.no_grad():
            seq_k1 = sequence_kl(kl_k1(batch["old_logprobs"], batch["ref_logprobs"]), mask)
            seq_k3 = sequence_kl(kl_k3(batch["old_logprobs"], batch["ref_logprobs"]), mask)
        beta = batch["beta"]
        self.kl_ctl.update(seq_k1.mean().item(), B)
        stats = {
            "iteration": self.iteration + 1,
            "proxy_reward": batch["raw_scores"].mean().item(),
            "score": batch["scores"].mean().item(),
            "kl": seq_k1.mean().item(),
            "kl_k3": seq_k3.mean().item(),
            "beta": beta,
            "next_beta": self.kl_ctl.value,
            "non_score_reward": (-beta * seq_k1).mean().item() if cfg.kl_penalty == "reward" else 0.0,
            "response_length": rollout.response_lengths.float().mean().item(),
            "terminated": rollout.terminated.float().mean().item(),
            "explained_variance": explained_variance(batch["values"], batch["returns"], mask),
            "value_mean": masked_mean(batch["values"], mask).item(),
            "return_mean": masked_mean(batch["returns"], mask).item(),
        }
        if self.gold_fn is not None:
            gold = self.gold_fn(rollout.prompts, rollout.responses, rollout.terminated)
            stats["gold_reward"] = float(torch.as_tensor(gold).float().mean())
        averaged = ("clipfrac", "approx_kl", "approx_kl_k1", "ratio_mean", "policy_loss", "value_loss", "entropy",
                    "loss", "grad_norm")
        firsts = ("ratio_mean", "clipfrac", "approx_kl")
        per_mb = torch.stack([torch.stack([s[k].float() for k in averaged]) for s in mb_stats])  # (updates, keys)
        read = torch.cat([per_mb.mean(0), per_mb[0, [averaged.index(k) for k in firsts]]]).tolist()  # one host read
        stats.update(zip(averaged, read[: len(averaged)]))
        stats.update(zip([f"first_{k}" for k in firsts], read[len(averaged) :]))
        stats.update(
            epochs=epochs_run, updates=len(mb_stats), early_stop=early_stop, step_seconds=time.perf_counter() - t0,
        )
        self.iteration += 1
        self.last_rollout = rollout
        return stats

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, prompts: Sequence, seed: int | None = None, n_samples: int | None = None) -> dict:
        """Proxy reward, gold reward and sequence KL (k1, k3) on ``prompts``, sampled with a fixed seed.

        ``samples`` holds the first ``n_samples`` responses (default ``config.eval_samples``) with
        their scores.
        Uses its own generator (seed ``config.seed + 1`` unless given), so evaluating never
        changes the training run, and every evaluation sees the same random numbers.
        """
        cfg = self.config
        n_samples = cfg.eval_samples if n_samples is None else n_samples
        ro, ref_lp = self.eval_rollout(prompt_texts(prompts), seed)
        raw, _ = self._score(ro)
        out = {
            "eval_proxy_reward": raw.mean().item(),
            "eval_kl": sequence_kl(kl_k1(ro.logprobs, ref_lp), ro.response_mask).mean().item(),
            "eval_kl_k3": sequence_kl(kl_k3(ro.logprobs, ref_lp), ro.response_mask).mean().item(),
            "eval_response_length": ro.response_lengths.float().mean().item(),
            "eval_terminated": ro.terminated.float().mean().item(),
        }
        gold = None
        if self.gold_fn is not None:
            gold = torch.as_tensor(self.gold_fn(ro.prompts, ro.responses, ro.terminated)).float()
            out["eval_gold_reward"] = gold.mean().item()
        n = min(n_samples, len(ro))
        out["samples"] = [
            {"prompt": ro.prompts[i], "response": ro.responses[i], "terminated": bool(ro.terminated[i]),
             "proxy": round(raw[i].item(), 3), **({"gold": round(gold[i].item(), 3)} if gold is not None else {})}
            for i in range(n)
        ]
        return out

    # ------------------------------------------------------------------ checkpoints
    def stateful(self) -> dict:
        return {"optimizer": self.optimizer, "kl_ctl": self.kl_ctl}

    def progress_postfix(self, stats: dict) -> dict:
        return {"proxy": f"{stats['proxy_reward']:.2f}", "gold": f"{stats.get('gold_reward', float('nan')):.2f}",
                "kl": f"{stats['kl']:.2f}", "beta": f"{stats['beta']:.3f}"}


def save_history(history: list[dict], path: str | Path) -> Path:
    """Write a run's history as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(history, indent=1))
    return path

