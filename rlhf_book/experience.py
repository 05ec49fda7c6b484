"""The experience step: what a rollout becomes before any on-policy update (A2C, PPO, ...).

Every on-policy trainer of the book does the same thing between sampling and learning:

1. **score** each response with the reward function, r(x, y) (a response that never
   produced EOS may get a fixed ``missing_eos_score`` instead: the "EOS trick"), plus an
   optional shaping term of the reply (``reward_shaping``, e.g. DAPO's overlong penalty,
   :func:`rlhf_book.rewards.soft_overlong_penalty`): :func:`score_replies`;
2. **log-probs** of the sampled tokens: log pi_old(a_t | s_t) (recorded while
   sampling, or recomputed by a teacher-forced forward) and log pi_ref(a_t | s_t) of
   the frozen reference (same temperature as the sampling);
3. **values** V_old(s_t) of the critic, if there is one;
4. **per-token rewards** r_t = -beta (log pi_old - log pi_ref) + [t = last] r(x, y)
   (:func:`rlhf_book.rewards.per_token_rewards`; with the KL in the loss instead,
   beta = 0 here and the update adds it);
5. **advantages and returns** by the ``advantage_estimator``, one name of
   :data:`ADVANTAGE_ESTIMATORS` (or a callable): ``"gae"`` (the critic's: GAE,
   :func:`rlhf_book.advantage.gae`, over the per-token rewards and values, optionally
   whitened) or a group estimator of one advantage per reply from the sequence rewards of
   the K replies to each prompt (``"rloo"``, ``"grpo"``, ``"dr_grpo"``, ``"reinforce"``;
   chapter 7), broadcast over the reply's tokens.

:func:`make_experience` does these five steps with no gradient and returns an
:class:`Experience`; an algorithm is then an ``update(experience)`` (see
:class:`rlhf_book.trainer.OnPolicyTrainer`). The models are passed in, so a chapter
or a reader's own loop calls the same function the trainers call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, Sequence

import torch

from ._deprecation import warn_deprecated
from .advantage import STD_EPS, RunningMeanBaseline, gae, grpo_advantages, process_advantages, rloo_advantages
from .critic import response_values
from .distributed import gather_rows, global_whiten, local_rows
from .kl import sequence_kl
from .rewards import StepRewards, apply_missing_eos_score, per_token_rewards
from .rollout import Rollout, in_row_batches, response_logprobs, score_rollout
from .runtime import timed

__all__ = ["Experience", "make_experience", "score_replies", "KL_PENALTIES", "AdvantageInputs", "GroupEstimator",
           "ADVANTAGE_ESTIMATORS", "get_advantage_estimator"]

KL_PENALTIES = ("reward", "loss")  # where beta * KL enters: the per-token reward (InstructGPT) or the loss (GRPO)


# ------------------------------------------------------------------ advantage estimators
@dataclass
class AdvantageInputs:
    """What an advantage estimator sees (this process's rows; B replies, R tokens).

    rewards, values, mask (B, R): per-token rewards (after optional whitening), V_old, response
    mask; sequence_rewards (B,): r(x, y) [- beta sum_t k1_t when the KL is in the reward], what a
    group estimator uses; group_size: K adjacent replies per prompt; whiten(x, mask, shift_mean):
    whitening with the global batch's statistics; accelerator: gathers rows when a statistic
    needs the global batch (None: one process).
    """

    rewards: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    sequence_rewards: torch.Tensor
    gamma: float = 1.0
    lam: float = 0.95
    group_size: int = 1
    whiten_advantages: bool = False
    whiten: Callable | None = None
    accelerator: object = None
    step_rewards: StepRewards | None = None


def gae_estimator(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``"gae"``: GAE over per-token rewards and the critic's values (V = 0 without one), optionally whitened."""
    advantages, returns = gae(x.rewards, x.values, x.mask, x.gamma, x.lam)
    if x.whiten_advantages:
        advantages = x.whiten(advantages, x.mask)
    return advantages, returns


class GroupEstimator:
    """A critic-free estimator: ``fn`` maps (B, K) sequence rewards to (B, K) advantages, one per reply.

    Runs on the gathered rewards of the global batch (a group never straddles two processes; a
    batch std, whitening and a running baseline need them all); with ``whiten_advantages`` the
    sequence advantages are normalised over the batch, (A - mean) / (std + 1e-4), like TRL
    RLOO's ``normalize_advantages``. Advantages are broadcast over the reply's tokens and the
    returns are the sequence rewards. ``state``: an object with ``state_dict`` kept in
    checkpoints (REINFORCE's :class:`~rlhf_book.advantage.RunningMeanBaseline`), else None.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], state=None):
        self.fn, self.state = fn, state

    def sequence_advantages(self, rewards: torch.Tensor, group_size: int, whiten: bool = False,
                            accelerator=None) -> torch.Tensor:
        """Sequence rewards (N,) = (B * K,), grouped (B, K) -> this process's advantages (N,)."""
        if rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} responses are not groups of num_generations={group_size}")
        n_local = rewards.numel()
        rewards = gather_rows(accelerator, rewards)
        adv = self.fn(rewards.float().view(-1, group_size)).reshape(-1)
        if whiten and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + STD_EPS)
        return local_rows(accelerator, adv, n_local)

    def __call__(self, x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
        adv = self.sequence_advantages(x.sequence_rewards, x.group_size, x.whiten_advantages, x.accelerator)
        m = x.mask.bool()
        zero = torch.zeros((), device=m.device)
        return torch.where(m, adv[:, None], zero), torch.where(m, x.sequence_rewards[:, None], zero)


def process_estimator(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``"grpo_process"``: GRPO with process supervision (:func:`~rlhf_book.advantage.process_advantages`) over the
    step rewards of a :class:`~rlhf_book.rewards.StepReward`; returns: the rewards to go. One process only."""
    if x.step_rewards is None:
        raise ValueError("advantage 'process' needs step rewards: the reward function must be a "
                         "rlhf_book.rewards.StepReward (a reward at the end of each step)")
    if x.accelerator is not None and getattr(x.accelerator, "num_processes", 1) > 1:
        raise ValueError("advantage 'process' runs in one process only (its groups' statistics are not gathered)")
    s = x.step_rewards
    adv = process_advantages(s.values, s.ends, x.mask, x.group_size)
    if x.whiten_advantages:
        adv = x.whiten(adv, x.mask)
    returns = torch.where(x.mask.bool(), s.values.float().flip(1).cumsum(1).flip(1), torch.zeros_like(adv))
    return adv, returns


def _reinforce(decay: float = 0.9) -> GroupEstimator:
    baseline = RunningMeanBaseline(decay)
    return GroupEstimator(baseline.advantages, state=baseline)


# name -> factory(**options) -> estimator(AdvantageInputs) -> (advantages, returns), each (B, R)
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Callable]] = {
    "gae": lambda: gae_estimator,                                           # critic: A2C, PPO
    "reinforce": _reinforce,                                                # r - running mean of past batches
    "rloo": lambda: GroupEstimator(rloo_advantages),                        # r - mean of the other K - 1
    "grpo": lambda scale="group": GroupEstimator(partial(grpo_advantages, scale=scale)),  # (r - mean) / std
    "dr_grpo": lambda: GroupEstimator(partial(grpo_advantages, scale="none")),            # r - group mean
    "grpo_process": lambda: process_estimator,                              # per-step rewards, group-normalised
}


def get_advantage_estimator(name: str, **options) -> Callable:
    """The estimator ``name`` of :data:`ADVANTAGE_ESTIMATORS`, built with ``options``.

    ``"gae"``; ``"reinforce"`` (``decay`` of the running mean, stateful: build it once per
    run); ``"rloo"``; ``"grpo"`` (``scale``: "group", "batch" (Lite PPO) or "none");
    ``"dr_grpo"`` (``"grpo"`` with ``scale="none"``); ``"grpo_process"`` (step rewards, group-normalised).
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage_estimator must be one of {list(ADVANTAGE_ESTIMATORS)} or a callable, got {name!r}")
    return ADVANTAGE_ESTIMATORS[name](**options)


@dataclass
class Experience:
    """A scored rollout, ready for an update. B responses, R response tokens.

    rollout: the sampled batch; raw_scores (B,): what the reward function returned;
    scores (B,): after the missing-EOS rule, plus the shaping term if any (the r(x, y) that enters the rewards);
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


def _capped_batch(reward_fn: Callable, batch_size: int | None) -> Callable:
    """A reward function that scores in chunks (an int attribute ``batch_size``, as a
    :class:`~rlhf_book.reward_model.ModelReward` has) scoring at most ``batch_size`` replies per forward (a copy),
    else ``reward_fn`` itself (any other function scores the batch its own way)."""
    own = getattr(reward_fn, "batch_size", None)
    if batch_size is None or not isinstance(own, int) or isinstance(own, bool) or own <= batch_size:
        return reward_fn
    capped = copy.copy(reward_fn)
    capped.batch_size = batch_size
    return capped


def score_replies(rollout: Rollout, reward_fn: Callable, missing_eos_score: float | None = None,
                  reward_shaping: Callable[[Rollout], torch.Tensor] | None = None,
                  forward_batch_size: int | None = None, raw_scores: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 of the experience: -> (raw r(x, y), scores = missing-EOS rule of r + ``reward_shaping(rollout)``), (B,).

    ``raw_scores`` (B,): the reward function's scores of this rollout, already computed (then
    ``reward_fn`` is not called). ``reward_shaping(rollout) -> (B,)``: a term of each reply added
    after the missing-EOS rule (None: none).
    """
    device = rollout.response_mask.device
    if raw_scores is None:
        raw = score_rollout(_capped_batch(reward_fn, forward_batch_size), rollout, device, "reward_fn")
    elif tuple(raw_scores.shape) != (len(rollout),):
        raise ValueError(f"raw_scores must have shape ({len(rollout)},), one per reply, got {tuple(raw_scores.shape)}")
    else:
        raw = raw_scores.to(device)
    scores = apply_missing_eos_score(raw, rollout.terminated, missing_eos_score)
    if reward_shaping is not None:
        scores = scores + reward_shaping(rollout).to(scores.device, scores.dtype)
    return raw, scores


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
    advantage_estimator: str | Callable = "gae",
    group_size: int = 1,
    accelerator=None,
    whiten: Callable | None = None,
    forward_batch_size: int | None = None,
    logprob_chunk_size: int | None = None,
    reward_shaping: Callable[[Rollout], torch.Tensor] | None = None,
    raw_scores: torch.Tensor | None = None,
    step_rewards: StepRewards | None = None,
) -> Experience:
    """Score a rollout, take reference log-probs and values, shape per-token rewards, estimate advantages -> Experience.

    ``reward_fn(prompts, responses, terminated) -> (B,)`` is what is learned from,
    ``gold_fn`` (same signature) is only recorded. ``ref_model``: the frozen reference
    pi_ref; ``critic``: a :class:`~rlhf_book.critic.ValueModel` or
    :class:`~rlhf_book.critic.PolicyWithValueHead` (None: V = 0, so the advantage is the
    return). log pi_old is the rollout's own (recorded while sampling at
    ``rollout.temperature``) unless ``policy`` is given, which recomputes it by a
    teacher-forced forward (needed when sampling and teacher forcing round differently,
    e.g. under bf16). ``kl_penalty="loss"`` keeps beta out of the rewards (the update
    adds it). ``advantage_estimator``: a name of :data:`ADVANTAGE_ESTIMATORS` (default
    ``"gae"``) or an estimator (:func:`get_advantage_estimator`; a stateful one such as REINFORCE's
    is built once and passed each time); ``group_size``: K adjacent replies per prompt for a
    group estimator. ``accelerator``: with several processes, whitening and group statistics
    use the global batch (``whiten=`` is deprecated since 0.2.0: it was the whitening
    function). ``timings``, if given, receives the seconds spent in ``reward_fn``
    (key ``reward``) and in the forwards (``forwards``). Models are used as they are:
    callers put them in eval mode and under autocast. Memory: ``forward_batch_size`` rows per forward (policy,
    reference, critic and a :class:`~rlhf_book.reward_model.ModelReward`'s scoring; None: the whole batch), and
    ``logprob_chunk_size`` rows per LM-head chunk (:func:`rlhf_book.rollout.teacher_forced`; None: automatic).
    ``reward_shaping(rollout) -> (B,)``: a term of each reply added to its score after the missing-EOS rule (e.g.
    DAPO's overlong penalty); ``raw_scores`` (B,): ``reward_fn``'s scores of this rollout when the caller already has
    them (dynamic sampling scored the replies to choose them): not scored again (:func:`score_replies`).
    ``step_rewards``: a process reward's rewards inside the replies (:meth:`rlhf_book.rewards.StepReward.token_rewards`):
    each step's reward is placed on the token that ends it instead of the reply's summed score on its last token (what
    the missing-EOS rule and the shaping change of that score still goes on the last token).
    """
    if kl_penalty not in KL_PENALTIES:
        raise ValueError(f"kl_penalty must be one of {KL_PENALTIES}, got {kl_penalty!r}")
    mask, T = rollout.response_mask, rollout.temperature
    device = mask.device
    with timed(timings, "reward", device):
        raw, scores = score_replies(rollout, reward_fn, missing_eos_score, reward_shaping, forward_batch_size,
                                    raw_scores)
        gold = score_rollout(gold_fn, rollout, device, "gold_fn") if gold_fn is not None else None
    with timed(timings, "forwards", device):
        if policy is not None:
            old_logprobs = in_row_batches(lambda r: response_logprobs(policy, r, T, logprob_chunk_size), rollout,
                                          forward_batch_size)
        elif rollout.logprobs is not None:
            old_logprobs = rollout.logprobs
        else:
            raise ValueError("the rollout has no log-probs of its own (logprobs=None): pass the policy to recompute them")
        ref_logprobs = in_row_batches(lambda r: response_logprobs(ref_model, r, T, logprob_chunk_size), rollout,
                                      forward_batch_size)
        values = (in_row_batches(lambda r: response_values(critic, r), rollout, forward_batch_size).float()
                  if critic is not None else torch.zeros_like(old_logprobs))
    if whiten is not None:
        warn_deprecated("make_experience(whiten=...)", "make_experience(accelerator=...)", "0.2.0")
    else:
        whiten = partial(global_whiten, accelerator)
    estimator = get_advantage_estimator(advantage_estimator) if isinstance(advantage_estimator, str) else advantage_estimator
    beta_in_reward = kl_coef if kl_penalty == "reward" else 0.0
    if step_rewards is None:
        rewards, kl = per_token_rewards(scores, mask, old_logprobs, ref_logprobs, kl_coef=beta_in_reward)
    else:  # each step's reward where the step ends; the last token keeps only what changed the summed score
        if step_rewards.values.shape != mask.shape or step_rewards.ends.shape != mask.shape:
            raise ValueError(f"step_rewards must have the response mask's shape {tuple(mask.shape)}, got "
                             f"{tuple(step_rewards.values.shape)} and {tuple(step_rewards.ends.shape)}")
        step_sum = (step_rewards.values.float() * mask).sum(1)
        rewards, kl = per_token_rewards(scores - step_sum, mask, old_logprobs, ref_logprobs, kl_coef=beta_in_reward)
        rewards = torch.where(mask.bool(), rewards + step_rewards.values.to(rewards.dtype), rewards)
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    # the reply's reward a group estimator sees: r(x, y) [- beta * sum_t k1_t with the KL in the reward]
    seq_rewards = scores - float(kl_coef) * sequence_kl(kl, mask) if beta_in_reward > 0 else scores
    advantages, returns = estimator(AdvantageInputs(
        rewards, values, mask, seq_rewards, gamma, lam, group_size, whiten_advantages, whiten, accelerator,
        step_rewards))
    return Experience(
        rollout=rollout, raw_scores=raw, scores=scores, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        values=values, kl=kl, rewards=rewards, advantages=advantages, returns=returns, kl_coef=float(kl_coef),
        kl_penalty=kl_penalty, gold=gold,
    )
