"""The experience step: what a rollout becomes before any on-policy update (A2C, PPO, ...).

Every on-policy trainer of the book does the same thing between sampling and learning:

1. **score** each response with the reward function, r(x, y) (a response that never
   produced EOS may get a fixed ``missing_eos_score`` instead: the "EOS trick");
2. **log-probs** of the sampled tokens: log pi_old(a_t | s_t) (recorded while
   sampling, or recomputed by a teacher-forced forward) and log pi_ref(a_t | s_t) of
   the frozen reference (same temperature as the sampling);
3. **values** V_old(s_t) of the critic, if there is one;
4. **per-token rewards** r_t = -beta (log pi_old - log pi_ref) + [t = last] r(x, y)
   (:func:`rlhf_book.rewards.per_token_rewards`; with the KL in the loss instead,
   beta = 0 here and the update adds it);
5. **advantages and returns**: GAE (:func:`rlhf_book.advantage.gae`) over the
   per-token rewards and values, optionally whitened.

:func:`make_experience` does these five steps with no gradient and returns an
:class:`Experience`; an algorithm is then an ``update(experience)`` (see
:class:`rlhf_book.trainer.OnPolicyTrainer`). The models are passed in, so a chapter
or a reader's own loop calls the same function the trainers call.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch

from .advantage import gae, masked_whiten
from .critic import response_values
from .rewards import apply_missing_eos_score, per_token_rewards
from .rollout import Rollout, response_logprobs, score_rollout
from .runtime import timed

__all__ = ["Experience", "make_experience", "KL_PENALTIES"]

KL_PENALTIES = ("reward", "loss")  # where beta * KL enters: the per-token reward (InstructGPT) or the loss (GRPO)


@dataclass
class Experience:
    """A scored rollout, ready for an update. B responses, R response tokens.

    rollout: the sampled batch; raw_scores (B,): what the reward function returned;
    scores (B,): after the missing-EOS rule (the r(x, y) that enters the rewards);
    old_logprobs, ref_logprobs (B, R): log pi_old and log pi_ref of the sampled tokens;
    values (B, R): V_old(s_t) of the critic (zeros without one); kl (B, R): the k1
    estimate log pi_old - log pi_ref per token; rewards, advantages, returns (B, R);
    kl_coef: the beta in force; kl_penalty: "reward" (beta is inside ``rewards``) or
    "loss" (the update adds beta * KL to its loss); gold (B,) or None: the gold reward,
    if one was given (logged only, never learned from). Tensors are 0 where the mask is 0.
    """

    rollout: Rollout
    raw_scores: torch.Tensor
    scores: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl_coef: float = 0.0
    kl_penalty: str = "reward"
    gold: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """The response mask (B, R): 1 on generated tokens."""
        return self.rollout.response_mask

    def select(self, rows: Sequence[int] | torch.Tensor) -> "Experience":
        """The rows ``rows`` (a minibatch: a list of row numbers or a LongTensor) as an Experience of their own."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.mask.device)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Rollout):
                v = v.select(rows)
            elif isinstance(v, torch.Tensor):
                v = v[idx]
            out[f.name] = v
        return Experience(**out)

    def __len__(self) -> int:
        return len(self.rollout)


@torch.no_grad()
def make_experience(
    rollout: Rollout,
    reward_fn: Callable,
    ref_model: torch.nn.Module,
    critic: torch.nn.Module | None = None,
    *,
    kl_coef: float = 0.0,
    kl_penalty: str = "reward",
    gamma: float = 1.0,
    lam: float = 0.95,
    missing_eos_score: float | None = None,
    whiten_rewards: bool = False,
    whiten_advantages: bool = False,
    policy: torch.nn.Module | None = None,
    gold_fn: Callable | None = None,
    timings: dict | None = None,
    whiten: Callable = masked_whiten,
) -> Experience:
    """Score a rollout, take reference log-probs and values, shape per-token rewards and run GAE -> Experience.

    ``reward_fn(prompts, responses, terminated) -> (B,)`` is what is learned from,
    ``gold_fn`` (same signature) is only recorded. ``ref_model``: the frozen reference
    pi_ref; ``critic``: a :class:`~rlhf_book.critic.ValueModel` or
    :class:`~rlhf_book.critic.PolicyWithValueHead` (None: V = 0, so the advantage is the
    return). log pi_old is the rollout's own (recorded while sampling at
    ``rollout.temperature``) unless ``policy`` is given, which recomputes it by a
    teacher-forced forward (needed when sampling and teacher forcing round differently,
    e.g. under bf16). ``kl_penalty="loss"`` keeps beta out of the rewards (the update
    adds it). ``whiten(x, mask, shift_mean)`` whitens rewards and advantages (a trainer
    with several processes passes one with the global batch's statistics). ``timings``, if given, receives the seconds spent in ``reward_fn``
    (key ``reward``) and in the forwards (``forwards``). Models are used as they are:
    callers put them in eval mode and under autocast.
    """
    if kl_penalty not in KL_PENALTIES:
        raise ValueError(f"kl_penalty must be one of {KL_PENALTIES}, got {kl_penalty!r}")
    mask, T = rollout.response_mask, rollout.temperature
    device = mask.device
    with timed(timings, "reward", device):
        raw = score_rollout(reward_fn, rollout, device, "reward_fn")
        gold = score_rollout(gold_fn, rollout, device, "gold_fn") if gold_fn is not None else None
    scores = apply_missing_eos_score(raw, rollout.terminated, missing_eos_score)
    with timed(timings, "forwards", device):
        if policy is not None:
            old_logprobs = response_logprobs(policy, rollout, T)
        elif rollout.logprobs is not None:
            old_logprobs = rollout.logprobs
        else:
            raise ValueError("the rollout has no log-probs of its own (logprobs=None): pass the policy to recompute them")
        ref_logprobs = response_logprobs(ref_model, rollout, T)
        values = response_values(critic, rollout).float() if critic is not None else torch.zeros_like(old_logprobs)
    beta_in_reward = kl_coef if kl_penalty == "reward" else 0.0
    rewards, kl = per_token_rewards(scores, mask, old_logprobs, ref_logprobs, kl_coef=beta_in_reward)
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask)
    return Experience(
        rollout=rollout, raw_scores=raw, scores=scores, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        values=values, kl=kl, rewards=rewards, advantages=advantages, returns=returns, kl_coef=float(kl_coef),
        kl_penalty=kl_penalty, gold=gold,
    )
