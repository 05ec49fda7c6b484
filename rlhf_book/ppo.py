"""PPO for RLHF: the clipped surrogate and the update (Schulman et al. 2017; InstructGPT's recipe).

One PPO iteration is the shared :meth:`rlhf_book.trainer.OnPolicyTrainer.step` (sample ->
:func:`rlhf_book.experience.make_experience` -> ``update``); what makes it PPO is
:meth:`PPOTrainer.update`: ``ppo_epochs`` passes over shuffled minibatches of the same
experience, each minimising

    L = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)       rho_t = pi_theta / pi_old
        + vf_coef * value loss (clipped to V_old +- value_clip_range) - entropy_coef * entropy
        [+ beta * mean k3 KL(pi_theta || pi_ref), with kl_penalty = "loss"]

with one joint clip of the gradient norm, stopping early when a minibatch's approx-KL(pi_old || pi_theta)
exceeds ``target_kl``. The minibatch loop is the one every on-policy update shares
(:meth:`~rlhf_book.trainer.OnPolicyTrainer.clipped_update`) and the surrogate is one setting
of :func:`~rlhf_book.critic_free.critic_free_policy_loss` (``loss_type="bnpo"``). Because the batch is reused, the policy that is updated drifts
from the one that sampled; the ratio rho_t corrects for it and the clip bounds how far one
batch can push it. The implementation details that matter at this scale (Huang et al.
2024, "The N+ implementation details of RLHF with PPO") are config options, each
documented where it is declared (here and in :class:`~rlhf_book.trainer.OnPolicyConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .advantage import masked_mean
from .config import option, redefault
from .critic_free import critic_free_policy_loss
from .experience import Experience
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

    rho_t = exp(logprobs - old_logprobs); ``old_logprobs`` and ``advantages`` (B, T) are
    constants. The mean is over real tokens of the batch. This is chapter 5's name for one
    setting of the one clipped surrogate, :func:`rlhf_book.critic_free.critic_free_policy_loss`
    with ``loss_type="bnpo"`` (token mean of the batch), the token-level ratio and a symmetric
    clip (``epsilon=clip_range``, no ``epsilon_high``): the same value and gradient
    (``tests/test_ppo.py`` ties them). ``stats`` (floats): ``clipfrac`` (share of tokens where
    the clipped term is the active one, so their gradient is 0), ``approx_kl`` (k3 estimate of
    KL(pi_old || pi_theta) per token, >= 0), ``approx_kl_k1`` and ``ratio_mean``.
    ``as_tensors=True`` leaves them as 0-d tensors on the device (reading a float from a GPU
    waits for it; the trainer reads once per iteration).
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if advantages.shape != logprobs.shape:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)} but logprobs has {tuple(logprobs.shape)}")
    loss, s = critic_free_policy_loss(logprobs, old_logprobs, advantages, mask, loss_type="bnpo", epsilon=clip_range,
                                      as_tensors=True)
    stats = {k: s[k] for k in ("clipfrac", "approx_kl", "approx_kl_k1", "ratio_mean")}
    return loss, (stats if as_tensors else {k: v.item() for k, v in stats.items()})


@dataclass
class PPOConfig(OnPolicyConfig):
    """:class:`~rlhf_book.trainer.OnPolicyConfig` plus PPO's own fields; defaults are the CPU recipe of chapter 5.

    The critic is a separate copy of the policy's trunk trained at 1e-3 (chapter 4's recipe; since 0.2.0).
    The value head on detached features that was the default until then (``critic="head"``) never
    beat a constant baseline on the book's runs (explained variance <= 0.2, median near 0); chapter 5
    shows both.
    """

    critic: str = redefault(OnPolicyConfig, "critic", "separate")
    critic_lr: float | None = redefault(OnPolicyConfig, "critic_lr", 1e-3)
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

        The shared loop :meth:`~rlhf_book.trainer.OnPolicyTrainer.clipped_update` (the critic-free
        trainers use it too): rows permuted every epoch, one step per minibatch, ``target_kl``
        early stop. Reported: the mean over minibatch steps of each loss statistic, the first
        minibatch's ratio, clip fraction and approx-KL (``first_*``: 1, 0 and 0 up to float
        rounding, the check that the experience's log pi_old is the policy's own), the number of
        epochs and updates, and whether ``target_kl`` stopped it early.
        """
        cfg = self.config
        return self.clipped_update(exp, self.loss, epochs=cfg.ppo_epochs, minibatch_size=min(cfg.minibatch_size,
                                   cfg.batch_size), loss_unit="tokens", target_kl=cfg.target_kl, shuffle=True)

    def loss(self, batch: Experience) -> tuple[torch.Tensor, dict]:
        """(PPO loss, statistics as 0-d tensors) of one (micro-)batch, with grad: token means of the batch."""
        cfg = self.config
        mask = batch.mask
        logprobs, values, entropy = self.policy_forward(batch.rollout)
        pg_loss, stats = ppo_policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, cfg.clip_range,
                                         as_tensors=True)
        v_loss = value_loss(values, batch.returns, mask, batch.values, cfg.value_clip_range)
        ent = masked_mean(entropy, mask)
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.entropy_coef * ent + self.kl_penalty_loss(logprobs, batch)
        stats.update(policy_loss=pg_loss.detach(), value_loss=v_loss.detach(), entropy=ent.detach(), loss=loss.detach())
        return loss, stats  # every term a mean over the batch's tokens (clipped_update scales it: loss_unit="tokens")
