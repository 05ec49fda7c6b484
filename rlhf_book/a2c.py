"""Advantage actor-critic (A2C) for a language model: one rollout, one update of actor and critic.

One A2C iteration is the shared :meth:`rlhf_book.trainer.OnPolicyTrainer.step`, in order:

1. **act**: the actor pi_theta samples a response to each prompt, token by token;
2. **judge**: the reward function scores each finished response, r(x, y); the frozen
   reference pi_ref gives log pi_ref(a_t | s_t) of every sampled token;
3. **per-token rewards**: r_t = -beta (log pi_theta - log pi_ref) + [t = last] r(x, y)
   (:func:`rlhf_book.rewards.per_token_rewards`);
4. **criticise**: the critic gives V(s_t) for the state before every response token;
5. **advantages**: A_t from the TD errors delta_t = r_t + gamma V(s_{t+1}) - V(s_t)
   (GAE, :func:`rlhf_book.advantage.gae`; lam = 0 is the one-step A2C advantage), and
   the critic's targets R_t = A_t + V(s_t);
6. **update** (:meth:`A2CTrainer.update`, the only A2C-specific step): one gradient step on

       L = -mean_t[A_t log pi_theta(a_t | s_t)]  +  vf_coef * 0.5 mean_t[(V(s_t) - R_t)^2]  -  c_H mean_t H_t

   the first term moves the actor (raise the probability of tokens that did better
   than the critic expected), the second the critic (predict the return better).

Steps 2-5 are :func:`rlhf_book.experience.make_experience`. Unlike PPO (chapter 5) each
batch is used for exactly one update, so the policy that is updated is the one that
sampled: log pi at update time equals log pi at rollout time, and no importance ratio
or clipping is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .advantage import masked_mean
from .config import option, redefault
from .experience import Experience
from .losses import entropy_bonus, policy_gradient_loss, value_loss
from .trainer import OnPolicyConfig, OnPolicyTrainer

__all__ = ["A2CConfig", "A2CTrainer", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "a2c_state.pt"


@dataclass
class A2CConfig(OnPolicyConfig):
    """:class:`~rlhf_book.trainer.OnPolicyConfig` with chapter 3's CPU recipe as defaults, plus ``value_updates``.

    ``missing_eos_score`` is every on-policy trainer's default, -1.0 (until 0.2.0 A2C's was None;
    chapters 3 and 4 pass ``missing_eos_score=None`` to keep their published runs).
    """

    lr: float = redefault(OnPolicyConfig, "lr", 3e-4)
    critic: str = redefault(OnPolicyConfig, "critic", "separate")
    critic_lr: float | None = redefault(OnPolicyConfig, "critic_lr", 1e-3)
    adam_eps: float = redefault(OnPolicyConfig, "adam_eps", 1e-8)
    vf_coef: float = redefault(OnPolicyConfig, "vf_coef", 1.0)
    value_updates: int = option(1, "critic gradient steps per iteration (0: a frozen critic, for experiments)", ">= 0")


class A2CTrainer(OnPolicyTrainer):
    """A2C on a causal LM against ``reward_fn``, with a per-token KL penalty toward ``ref_model``.

    Arguments as :class:`~rlhf_book.trainer.OnPolicyTrainer`: ``A2CTrainer(policy, ref_model,
    tokenizer, reward_fn, config=A2CConfig(...), critic=None, gold_fn=None)``.
    """

    name = "A2C"
    checkpoint_name = CHECKPOINT_NAME
    config_class = A2CConfig

    def update(self, exp: Experience) -> dict:
        """One gradient step of actor and critic on the experience, then ``value_updates - 1`` critic-only steps.

        Both through the shared loop (:meth:`~rlhf_book.trainer.OnPolicyTrainer.clipped_update`:
        one epoch, one minibatch, no shuffling, micro-batches as configured). ``max_grad_norm``
        clips the joint norm of actor and critic (as in PPO; until 0.2.0 A2C clipped each
        separately), and ``grad_norm`` is that joint norm before clipping.
        """
        cfg = self.config

        def loss_fn(batch: Experience) -> tuple[torch.Tensor, dict]:
            mask = batch.mask
            logprobs, values, entropy = self.policy_forward(batch.rollout)
            pg = policy_gradient_loss(logprobs, batch.advantages, mask)
            vl = value_loss(values, batch.returns, mask)
            loss = pg + entropy_bonus(entropy, mask, cfg.entropy_coef) + self.kl_penalty_loss(logprobs, batch)
            if cfg.value_updates > 0:
                loss = loss + cfg.vf_coef * vl
            return loss, {"policy_loss": pg.detach(), "value_loss": vl.detach(),
                          "entropy": masked_mean(entropy.detach(), mask)}

        def critic_loss(batch: Experience) -> tuple[torch.Tensor, dict]:  # extra critic-only steps, same targets
            return cfg.vf_coef * value_loss(self.values(batch.rollout), batch.returns, batch.mask), {}

        stats = self.clipped_update(exp, loss_fn, shuffle=False)
        if cfg.value_updates > 1:
            self.clipped_update(exp, critic_loss, epochs=cfg.value_updates - 1, params=self.critic_params,
                                shuffle=False)
        return {k: stats[k] for k in ("policy_loss", "value_loss", "entropy", "grad_norm")}
