"""PPO for RLHF: the clipped surrogate and the update (Schulman et al. 2017; InstructGPT's recipe).

One PPO iteration is the shared :meth:`rlhf_book.trainer.OnPolicyTrainer.step` (sample ->
:func:`rlhf_book.experience.make_experience` -> ``update``); what makes it PPO is
:meth:`PPOTrainer.update`: ``ppo_epochs`` passes over shuffled minibatches of the same
experience, each minimising

    L = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)       rho_t = pi_theta / pi_old
        + vf_coef * value loss (clipped to V_old +- value_clip_range) - entropy_coef * entropy
        [+ beta * mean k3 KL(pi_theta || pi_ref), with kl_penalty = "loss"]

with gradient clipping, stopping early when a minibatch's approx-KL(pi_old || pi_theta)
exceeds ``target_kl``. Because the batch is reused, the policy that is updated drifts
from the one that sampled; the ratio rho_t corrects for it and the clip bounds how far one
batch can push it. The implementation details that matter at this scale (Huang et al.
2024, "The N+ implementation details of RLHF with PPO") are config options, each
documented where it is declared (here and in :class:`~rlhf_book.trainer.OnPolicyConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .advantage import masked_mean
from .distributed import local_size
from .config import option
from .experience import Experience
from .kl import kl_k3
from .losses import value_loss
from .trainer import OnPolicyConfig, OnPolicyTrainer

__all__ = ["ppo_policy_loss", "PPOConfig", "PPOTrainer", "CHECKPOINT_NAME"]

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
            # samples come from pi_old: KL(pi_old || pi_theta), with log rho = log pi_theta - log pi_old
            "approx_kl": masked_mean(kl_k3(old_logprobs.detach(), logprobs), mask),
            "approx_kl_k1": masked_mean(-log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, (stats if as_tensors else {k: v.item() for k, v in stats.items()})


@dataclass
class PPOConfig(OnPolicyConfig):
    """:class:`~rlhf_book.trainer.OnPolicyConfig` plus PPO's own fields; defaults are the CPU recipe of chapter 5."""

    ppo_epochs: int = option(4, "passes over each experience batch", ">= 1")
    minibatch_size: int = option(16, "responses per gradient step (batch_size / minibatch_size steps per epoch)", ">= 1")
    clip_range: float = option(0.2, "eps of the probability-ratio clip", "> 0")
    value_clip_range: float | None = option(0.2, "clip V to V_old +- this in the value loss (None: no clipping)", "> 0")
    target_kl: float | None = option(None, "stop the epochs early once a minibatch's approx-KL(old || new) per token "
                                           "exceeds it (None: never)", "> 0")

    def check(self) -> None:
        super().check()
        if self.minibatch_size < self.batch_size and self.batch_size % self.minibatch_size:
            raise ValueError(
                f"PPOConfig.batch_size ({self.batch_size}) must be a multiple of minibatch_size ({self.minibatch_size}): "
                "otherwise the last minibatch of every epoch is smaller and its tokens weigh more"
            )


class PPOTrainer(OnPolicyTrainer):
    """PPO on a causal LM against ``reward_fn``, regularised toward the frozen ``ref_model``.

    Arguments as :class:`~rlhf_book.trainer.OnPolicyTrainer`: ``PPOTrainer(policy, ref_model,
    tokenizer, reward_fn, config=PPOConfig(...), critic=None, gold_fn=None)``.
    """

    name = "PPO"
    checkpoint_name = CHECKPOINT_NAME
    config_class = PPOConfig

    def update(self, exp: Experience) -> dict:
        """``ppo_epochs`` epochs of clipped-surrogate minibatch steps on one experience batch; returns their stats.

        Reported: the mean over minibatch steps of each loss statistic, the first
        minibatch's ratio, clip fraction and approx-KL (``first_*``: 1, 0 and 0 up to float
        rounding, the check that the experience's log pi_old is the policy's own),
        the number of epochs and updates, and whether ``target_kl`` stopped it early.
        """
        cfg = self.config
        B = len(exp)  # this process's rows; minibatch_size counts the global batch's, like batch_size
        mb = min(local_size(min(cfg.minibatch_size, cfg.batch_size), self.world, "minibatch_size"), B)
        self.train_mode(True)  # dropout as configured (disable_dropout: p = 0); checkpointing needs train mode
        steps: list[dict] = []  # per minibatch: statistics as 0-d tensors (read once at the end)
        early_stop, epochs = False, 0
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=self.generator, device=self.device).tolist()  # one host read per epoch
            for start in range(0, B, mb):
                loss, stats = self.loss(exp.select(perm[start : start + mb]))
                (stats["grad_norm"],) = self.gradient_step(loss, [self.actor_params + self.critic_params])
                steps.append(stats)
                if cfg.target_kl is not None and self.process_mean(stats["approx_kl"]).item() > cfg.target_kl:  # all agree
                    early_stop = True
                    break
            epochs += 1
            if early_stop:
                break
        self.train_mode(False)
        out = {k: torch.stack([s[k].float() for s in steps]).mean().item() for k in steps[0]}
        out.update({f"first_{k}": steps[0][k].item() for k in ("ratio_mean", "clipfrac", "approx_kl")})
        out.update(epochs=epochs, updates=len(steps), early_stop=early_stop)
        return out

    def loss(self, batch: Experience) -> tuple[torch.Tensor, dict]:
        """(PPO loss, statistics as 0-d tensors) of one minibatch, with grad."""
        cfg = self.config
        mask = batch.mask
        logprobs, values, entropy = self.policy_forward(batch.rollout)
        pg_loss, stats = ppo_policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, cfg.clip_range,
                                         as_tensors=True)
        v_loss = value_loss(values, batch.returns, mask, batch.values, cfg.value_clip_range)
        ent = masked_mean(entropy, mask)
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.entropy_coef * ent + self.kl_penalty_loss(logprobs, batch)
        stats.update(policy_loss=pg_loss.detach(), value_loss=v_loss.detach(), entropy=ent.detach(), loss=loss.detach())
        # every term is a mean over the minibatch's tokens: a share of the global one (x 1.0 with one process)
        return loss * self.loss_share(mask.sum()), self.token_weighted(stats, mask.sum())
