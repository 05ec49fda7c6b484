"""RL without a critic: REINFORCE, RLOO, GRPO and its variants (Dr. GRPO, DAPO, GSPO), and pass@k.

A critic-free algorithm replaces the value model V(s_t) of A2C/PPO by a baseline made of
*other samples*: each prompt x gets K responses y_1..y_K (``num_generations``), each is
scored once, r_i = r(x, y_i) [- beta * sum_t k1_t when the KL is in the reward], and the
sequence advantage A_i is broadcast to every token of y_i. On (B, K) rewards:

    REINFORCE + running mean   A_i = r_i - b,   b = bias-corrected EMA of past batch means
                               (Williams 1992; the moving-average baseline of Ahmadian et al. 2024)
    RLOO (leave one out)       A_i = r_i - 1/(K-1) sum_{j != i} r_j  =  K/(K-1) (r_i - mean_j r_j)
                               (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!";
                               Ahmadian et al. 2024, "Back to basics")
    GRPO                       A_i = (r_i - mean_j r_j) / (std_j r_j + eps)
                               (Shao et al. 2024, DeepSeekMath; std over the group, TRL scale_rewards="group")
    Lite PPO                   A_i = (r_i - mean_j r_j) / (std over the whole batch + eps)   (scale="batch",
                               Liu et al. 2025, "Tricks or traps?")
    Dr. GRPO                   A_i = r_i - mean_j r_j   (scale="none", Liu et al. 2025, "Understanding R1-Zero-like
                               training": dividing by the group std weighs prompts by their difficulty)

A group whose K rewards are all equal ("degenerate": every answer right, or every one wrong)
carries no signal; its advantages are exactly 0 (no 0/0). The update is PPO's clipped
surrogate without a value loss, on the ratio w = pi_theta / pi_old at one of two levels:

    token    (GRPO)   w_{i,t} = exp(log pi_theta(y_it) - log pi_old(y_it))
    sequence (GSPO)   w_i     = exp(1/|y_i| sum_t [log pi_theta(y_it) - log pi_old(y_it)])  (Zheng et al. 2025)

    l_{i,t} = -min(w A_i, clip(w, 1 - epsilon, 1 + epsilon_high) A_i)  [+ beta * k3_{i,t}]

(``epsilon_high`` > ``epsilon``: DAPO's "clip-higher", Yu et al. 2025), and the per-token
losses l_{i,t} are reduced to one number by ``loss_type``, with TRL 1.16's names and
normalisers (``trl/trainer/grpo_trainer.py``, ``GRPOTrainer._compute_loss``); N sequences in
the optimizer step, m the response mask, L = ``max_completion_length``:

    grpo      1/N sum_i (1/|y_i| sum_t l_it)        per-sequence mean: a long reply's tokens weigh less
    bnpo      sum_it l_it / sum_it m_it             token mean over the step's (local) batch
    dr_grpo   sum_it l_it / (N L)                   a constant normaliser (Dr. GRPO)
    dapo      sum_it l_it / num_items               token mean over the whole generation batch (DAPO): TRL divides
                                                    by the batch's active tokens over the number of optimizer steps
                                                    it is split into, so with one step dapo == bnpo

The KL to the reference goes either into the reward (RLOO's form: k1 summed over the reply,
``kl_penalty="reward"``, as in the experience step of every on-policy trainer) or into the
loss (GRPO's form: beta * k3 per token, ``kl_penalty="loss"``, aggregated like the policy
term, as TRL does; :func:`rlhf_book.kl.kl_k3`). ``kl_coef`` is TRL's ``beta``.

DAPO (Yu et al. 2025) adds two more switches besides clip-higher and the token-level loss:

    overlong reward shaping   r_i += R_length(|y_i|) (eq. 13, :func:`rlhf_book.rewards.soft_overlong_penalty`):
    (``overlong_buffer``)     0 up to L_max - L_cache tokens, then a linear ramp down to -``overlong_penalty``
                              at L_max = ``max_new_tokens``; added to every reply's score before the advantages
    dynamic sampling          drop the degenerate groups (all K scores equal: advantage 0) and sample the next
    (``dynamic_sampling``)    prompts until ``batch_size`` groups remain, or ``max_sampling_rounds`` rounds
                              (:meth:`CriticFreeTrainer.dynamic_sample`)

Where this departs from the papers (and follows TRL 1.16): the std gets eps = 1e-4 (GRPO
divides by the bare std) and degenerate groups are zeroed explicitly; dynamic sampling judges a
group by the scores the advantages see (r after the missing-EOS rule and the overlong penalty,
not the KL of ``kl_penalty="reward"``), where verl's DAPO recipe looks at accuracy alone, so an
all-correct group whose replies differ in overlong penalty is kept (its advantages are not 0);
when the round cap is hit the batch is filled up with degenerate groups (verl raises instead),
the surplus groups of the last round are dropped (as verl does), and it runs in one process
only; DAPO's overlong *filtering* (TRL's ``mask_truncated_completions``: no loss on cut-off
replies) is not implemented (``missing_eos_score`` is this library's rule for them); the k3 term
is not multiplied by the ratio unless ``use_bias_correction_kl`` (TRL 1.16 multiplies by
default); GSPO's paper clips the sequence ratio at ~3e-4 / 4e-4, not 0.2 (set ``epsilon`` for
it, with ``loss_type="grpo"``: the token-level normalisers weigh a reply's one sequence loss by
its length). RLOO and REINFORCE here use the same clipped,
token-level loss as GRPO (with one step per batch, w = 1 and the clip never binds, so it is
the REINFORCE gradient); TRL's RLOOTrainer instead takes the ratio of *summed* log-probs per
reply and averages over replies, whose on-policy gradient is -1/N sum_i A_i sum_t grad log
pi(y_it): ``loss_type="dr_grpo"`` times max_completion_length (the same direction; under Adam
the scale matters only through epsilon and gradient clipping).

pass@k (Chen et al. 2021) measures whether RL sharpens (pass@1 up, pass@k for large k flat
or down) or widens (pass@k up too): :func:`pass_at_k` is the unbiased estimator from n
samples with c correct, :func:`evaluate_pass_at_k` samples n replies per held-out prompt.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .advantage import (SCALE_REWARDS, RunningMeanBaseline, degenerate_groups, grpo_advantages, masked_mean, masked_sum,
                        rloo_advantages)
from .config import option, redefault
from ._deprecation import warn_deprecated
from .distributed import local_size
from .experience import Experience, score_replies
from .kl import kl_k3, sequence_kl
from .rewards import StepReward, soft_overlong_penalty
from .rollout import Rollout, cat_rollouts, prompt_texts, sample_groups
from .runtime import timed
from .trainer import OnPolicyConfig, OnPolicyTrainer

__all__ = [
    "ADVANTAGES", "SCALE_REWARDS", "LOSS_TYPES", "IMPORTANCE_SAMPLING_LEVELS",
    "degenerate_groups", "rloo_advantages", "grpo_advantages", "RunningMeanBaseline",
    "sequence_rewards", "aggregate_loss", "critic_free_policy_loss", "soft_overlong_penalty",
    "CriticFreeConfig", "CriticFreeTrainer", "pass_at_k", "evaluate_pass_at_k",
]

ADVANTAGES = ("grpo", "rloo", "reinforce", "process")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

def sequence_rewards(exp: Experience) -> torch.Tensor:
    """The reward of each reply the advantages see: r(x, y) [- beta sum_t k1_t with the KL in the reward]; -> (N,).

    ``exp.scores`` is r(x, y) after the missing-EOS rule; with ``kl_penalty="reward"`` the
    sequence k1 KL of pi_old to pi_ref is subtracted, as TRL's RLOOTrainer does (the sum of
    the experience's per-token rewards, without their optional whitening).
    """
    if exp.kl_penalty == "reward" and exp.kl_coef > 0:
        return exp.scores - exp.kl_coef * sequence_kl(exp.kl, exp.mask)
    return exp.scores


# ------------------------------------------------------------------ the loss
def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo",
                   max_completion_length: int | None = None, num_items: float | torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Reduce per-token losses (B, T) (or (B, 1), broadcast) to a scalar, as TRL 1.16's ``loss_type`` does.

    "grpo": mean over sequences of each one's token mean; "bnpo": sum / active tokens of
    this batch; "dr_grpo": sum / (B * ``max_completion_length``); "dapo": sum / ``num_items``
    (TRL's ``num_items_in_batch``: active tokens of the whole generation batch, per optimizer
    step; None: this batch's, which makes it "bnpo"). Positions where ``mask`` is 0 never count.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    x = per_token_loss.expand_as(mask) if per_token_loss.shape != mask.shape else per_token_loss
    m = mask.bool()
    if loss_type == "grpo":
        return (masked_sum(x, m, dim=-1) / m.sum(-1).clamp(min=1).to(x.dtype)).mean()
    total = masked_sum(x, m)
    if loss_type == "bnpo":
        return total / m.sum().clamp(min=1).to(x.dtype)
    if loss_type == "dr_grpo":
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) \
                or max_completion_length < 1:
            raise ValueError(f"loss_type='dr_grpo' needs max_completion_length, an integer >= 1, "
                             f"got {max_completion_length!r}")
        return total / (m.size(0) * max_completion_length)
    n = m.sum() if num_items is None else torch.as_tensor(num_items, device=x.device)
    return total / n.clamp(min=1).to(x.dtype)


def critic_free_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = False,
    as_tensors: bool = False,
) -> tuple[torch.Tensor, dict]:
    """-min(w A, clip(w, 1-eps, 1+eps_high) A) [+ beta k3] per token, reduced by ``loss_type``; -> (scalar, stats).

    logprobs, old_logprobs, mask (B, T); advantages (B,) per sequence or (B, T). w is the
    token ratio or GSPO's sequence ratio exp(mean_t log-ratio) (``importance_sampling_level``);
    ``epsilon_high`` None means ``epsilon``. With ``ref_logprobs`` and beta > 0, beta * k3 of
    KL(pi_theta || pi_ref) is added per token before aggregation (TRL's GRPO form; unlike
    :meth:`~rlhf_book.trainer.OnPolicyTrainer.kl_penalty_loss`, a token mean, it then follows
    ``loss_type``). ``use_bias_correction_kl``: multiply that k3 by the (differentiable) ratio
    w, TRL 1.16's default (DeepSeek-V3.2): the same value on-policy, but the gradient gains
    k3 * grad log pi, which makes it the unbiased gradient of KL(pi_theta || pi_ref) under samples
    of pi_old. Garbage (NaN, inf) where ``mask`` is 0 does not reach loss or gradient.

    ``stats``: ``policy_loss`` (without the KL term), ``kl_loss`` (token mean of k3, when
    given ``ref_logprobs``), ``clipfrac`` = ``clip_low`` + ``clip_high`` (share where the clip
    is active: w < 1 - eps with A < 0, w > 1 + eps_high with A > 0; of tokens, or of sequences
    at sequence level, as TRL counts them), ``approx_kl`` (k3 of KL(pi_old || pi_theta) per
    token), ``approx_kl_k1``, ``ratio_mean`` (of w). ``as_tensors=True``: 0-d tensors.
    """
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    for name, v in (("epsilon", eps_low), ("epsilon_high", eps_high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {list(IMPORTANCE_SAMPLING_LEVELS)}, "
                         f"got {importance_sampling_level!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logprobs has {tuple(logprobs.shape)}")
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1]):
        raise ValueError(f"advantages must have shape (B,) or (B, T) = {tuple(logprobs.shape)}, "
                         f"got {tuple(advantages.shape)}")
    m = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), zero)  # 0 on padding: no inf/NaN there
    adv = advantages.detach().to(logprobs.dtype)
    adv = torch.where(m, adv[:, None] if adv.dim() == 1 else adv, zero)
    sequence_level = importance_sampling_level == "sequence"
    if sequence_level:  # GSPO: one ratio per reply, the geometric mean of its token ratios
        log_w = masked_sum(log_ratio, m, dim=-1)[:, None] / m.sum(-1, keepdim=True).clamp(min=1).to(log_ratio.dtype)
    else:
        log_w = log_ratio
    w = torch.exp(log_w)  # (B, T) or (B, 1)
    w_clipped = w.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(w * adv, w_clipped * adv)
    policy_loss = aggregate_loss(per_token, mask, loss_type, max_completion_length, num_items)
    loss, kl = policy_loss, None
    if ref_logprobs is not None:
        kl = kl_k3(torch.where(m, logprobs, zero), torch.where(m, ref_logprobs.detach(), zero))
        if beta:
            weighted = kl * w if use_bias_correction_kl else kl  # w: (B, T) or GSPO's (B, 1), broadcast
            loss = loss + beta * aggregate_loss(weighted, mask, loss_type, max_completion_length, num_items)
    with torch.no_grad():
        rows = m.any(-1)

        def share(x: torch.Tensor) -> torch.Tensor:  # of tokens, or of sequences at sequence level (TRL's counting)
            x = x.float().expand_as(m)
            return masked_mean(x, m) if not sequence_level else masked_mean(masked_mean(x, m, dim=-1), rows)

        low = share((w < 1.0 - eps_low) & (adv < 0))
        high = share((w > 1.0 + eps_high) & (adv > 0))
        stats = {
            "policy_loss": policy_loss.detach(), "clipfrac": low + high, "clip_low": low, "clip_high": high,
            "approx_kl": masked_mean(kl_k3(old_logprobs.detach(), torch.where(m, logprobs.detach(), zero)), m),
            "approx_kl_k1": masked_mean(-log_ratio.detach(), m),
            "ratio_mean": share(w.detach()),
        }
        if kl is not None:
            stats["kl_loss"] = masked_mean(kl.detach(), m)
    return loss, (stats if as_tensors else {k: v.item() for k, v in stats.items()})


# ------------------------------------------------------------------ the trainer
@dataclass
class CriticFreeConfig(OnPolicyConfig):
    """:class:`~rlhf_book.trainer.OnPolicyConfig` without a critic, plus the group and loss fields (TRL's names).

    ``kl_coef`` is TRL's ``beta``; ``kl_penalty`` says where it goes ("loss": GRPO's k3 in
    the loss, the default; "reward": RLOO's k1 in the sequence reward). ``gamma``, ``lam``,
    ``vf_coef``, ``critic_lr`` and ``detach_value_head`` have no effect (there is no critic and
    the advantage is one number per reply); ``whiten_advantages`` normalises the sequence
    advantages over the batch, (A - mean) / (std + 1e-4), like TRL RLOO's ``normalize_advantages``.
    """

    batch_size: int = option(8, "prompts per iteration; each gets num_generations responses (batch_size * "
                                "num_generations in all)", ">= 1")
    critic: str = option("none", "no critic: the baseline is made of the other samples of a prompt", choices=("none",))
    whiten_advantages: bool = redefault(OnPolicyConfig, "whiten_advantages", False)
    kl_penalty: str = redefault(OnPolicyConfig, "kl_penalty", "loss")
    # --- the advantage
    advantage: str = option("grpo", "'grpo': (r - group mean) / scale_rewards; 'rloo': r - mean of the other K-1; "
                                    "'reinforce': r - running mean of past batches; 'process': per-step rewards of a "
                                    "rlhf_book.rewards.StepReward, normalised over the group's steps, summed over "
                                    "the steps to come (DeepSeekMath's process supervision)", choices=ADVANTAGES)
    num_generations: int = option(4, "K, responses per prompt (>= 2 for 'grpo' and 'rloo')", ">= 1")
    scale_rewards: str = option("group", "GRPO's divisor: the group std ('group'), the batch std ('batch', Lite "
                                         "PPO) or none ('none', Dr. GRPO); only with advantage='grpo'",
                                choices=SCALE_REWARDS)
    baseline_decay: float = option(0.9, "REINFORCE's running-mean baseline: weight of the past per batch (< 1); only "
                                        "with advantage='reinforce'", "[0, 1]")
    # --- the loss
    loss_type: str = option("dapo", "aggregation of the per-token losses, as TRL: 'grpo' (sequence means), 'dr_grpo' "
                                    "(sum / (N * max_new_tokens)), 'dapo' (token mean of the generation batch), "
                                    "'bnpo' (token mean of the optimizer step's batch)", choices=LOSS_TYPES)
    epsilon: float = option(0.2, "lower clip of the ratio, 1 - epsilon (and the upper one unless epsilon_high)", "> 0")
    epsilon_high: float | None = option(None, "upper clip 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); None: "
                                              "epsilon", "> 0")
    use_bias_correction_kl: bool = option(False, "multiply the k3 KL in the loss by the ratio pi_theta / pi_old (TRL "
                                                 "1.16's default is True; same value on-policy, a different gradient)")
    importance_sampling_level: str = option("token", "'token': one ratio per token (GRPO); 'sequence': exp(mean "
                                                     "token log-ratio) per reply (GSPO)",
                                            choices=IMPORTANCE_SAMPLING_LEVELS)
    num_iterations: int = option(1, "mu: passes over each generation batch (1: on-policy, the ratio stays 1 in the "
                                    "first step)", ">= 1")
    minibatch_size: int | None = option(None, "responses per optimizer step (None: all batch_size * num_generations, "
                                              "one step per pass)", ">= 1")
    # --- DAPO's dynamic sampling and overlong reward shaping (Yu et al. 2025)
    dynamic_sampling: bool = option(False, "DAPO's dynamic sampling: drop the groups whose K scores are all equal "
                                           "(advantage 0) and sample the run's next batch_size prompts until "
                                           "batch_size groups remain or max_sampling_rounds is reached (then the "
                                           "batch is filled up with the first degenerate groups); advantage 'grpo' "
                                           "or 'rloo'; one process only (with several, each would keep another "
                                           "number of groups, and they must train on equal shares)")
    max_sampling_rounds: int = option(10, "dynamic sampling: most sampling rounds per iteration, the first one "
                                          "included (verl's max_num_gen_batches; 10 in DAPO's recipe)", ">= 1")
    overlong_buffer: int | None = option(None, "DAPO's soft overlong punishment: L_cache, the last tokens before "
                                               "max_new_tokens over which a reply's score falls linearly to "
                                               "-overlong_penalty (rlhf_book.rewards.soft_overlong_penalty; verl's "
                                               "overlong_buffer.len, TRL's soft_punish_cache); at most max_new_tokens; "
                                               "None: off", ">= 1")
    overlong_penalty: float = option(1.0, "the overlong punishment of a reply of max_new_tokens tokens, subtracted "
                                          "from its score (verl's overlong_buffer.penalty_factor; only with "
                                          "overlong_buffer)", "> 0")

    def check(self) -> None:
        super().check()
        name = type(self).__name__
        if self.advantage in ("grpo", "rloo", "process") and self.num_generations < 2:
            raise ValueError(f"{name}.num_generations must be >= 2 for advantage={self.advantage!r} (a group baseline "
                             f"needs other samples), got {self.num_generations}")
        if self.baseline_decay >= 1:
            raise ValueError(f"{name}.baseline_decay must be < 1 (1 would never move the baseline), "
                             f"got {self.baseline_decay}")
        if self.whiten_rewards:
            raise ValueError(f"{name}.whiten_rewards must be False: the advantages use the sequence rewards, not the "
                             "per-token ones it scales")
        if self.overlong_buffer is not None and self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"{name}.overlong_buffer must be in 1..max_new_tokens ({self.max_new_tokens}): the "
                             f"punishment ramps over a reply's last tokens, got {self.overlong_buffer}")
        if self.advantage == "process" and self.kl_penalty == "reward" and self.kl_coef > 0:
            raise ValueError(f"{name}.advantage='process' takes the KL in the loss: with kl_penalty='reward' the "
                             f"per-token KL would be left out of the step rewards it normalises; set "
                             f"kl_penalty='loss' (or kl_coef=0)")
        if self.dynamic_sampling and self.advantage not in ("grpo", "rloo"):
            raise ValueError(f"{name}.dynamic_sampling needs advantage='grpo' or 'rloo' (it drops the groups whose "
                             f"group baseline makes every advantage 0), got advantage={self.advantage!r}")
        n = self.batch_size * self.num_generations
        if self.minibatch_size is not None and self.minibatch_size < n and n % self.minibatch_size:
            raise ValueError(f"{name}.minibatch_size ({self.minibatch_size}) must divide batch_size * num_generations "
                             f"({n}): otherwise the last minibatch of every pass is smaller")

    def advantage_spec(self) -> tuple[str, dict]:
        """The group estimator of :data:`rlhf_book.experience.ADVANTAGE_ESTIMATORS` that ``advantage`` names: "grpo"
        with ``scale_rewards`` ("dr_grpo" for "none"), "rloo", "reinforce" with ``baseline_decay``, or "grpo_process"."""
        if self.advantage == "process":
            return "grpo_process", {}
        if self.advantage == "grpo":
            return ("dr_grpo", {}) if self.scale_rewards == "none" else ("grpo", {"scale": self.scale_rewards})
        return (self.advantage, {"decay": self.baseline_decay} if self.advantage == "reinforce" else {})


class CriticFreeTrainer(OnPolicyTrainer):
    """REINFORCE, RLOO or GRPO (``config.advantage``) on a causal LM against ``reward_fn``; no value model.

    ``CriticFreeTrainer(policy, ref_model, tokenizer, reward_fn, config=CriticFreeConfig(...),
    gold_fn=None)``. One iteration is :meth:`OnPolicyTrainer.step
    <rlhf_book.trainer.OnPolicyTrainer.step>` on ``batch_size`` prompts each sampled K times
    (``num_generations``, adjacent: rows i*K .. i*K + K - 1 are prompt i's group; the prompt is
    prefilled once and its KV cache shared by the K samples): sample,
    the shared experience step with V = 0 and the configured group estimator
    (:meth:`CriticFreeConfig.advantage_spec`: the group advantage of each reply broadcast over
    its tokens), :meth:`update` (``num_iterations`` passes of the shared clipped-surrogate loop).
    With ``overlong_buffer``, :meth:`overlong_reward` is the experience step's ``reward_shaping``;
    with ``dynamic_sampling``, :meth:`step` samples with :meth:`dynamic_sample`.
    Evaluation, history, checkpoints and export are the shared ones.
    """

    name = "GRPO"
    config_class = CriticFreeConfig
    NAMES = {"grpo": "GRPO", "rloo": "RLOO", "reinforce": "REINFORCE", "process": "GRPO (process rewards)"}

    def __init__(self, policy, ref_model, tokenizer, reward_fn: Callable, config: CriticFreeConfig | None = None,
                 gold_fn: Callable | None = None, accelerator=None):
        super().__init__(policy, ref_model, tokenizer, reward_fn, config, critic=None, gold_fn=gold_fn,
                         accelerator=accelerator)
        cfg = self.config
        self.name = self.NAMES[cfg.advantage]
        if cfg.advantage == "grpo" and cfg.scale_rewards == "none":
            self.name = "Dr. GRPO"
        self.checkpoint_name = f"{cfg.advantage}_state.pt"
        self.baseline = getattr(self.advantage_estimator, "state", None)  # REINFORCE's running mean (checkpointed)
        if cfg.advantage == "process" and not isinstance(reward_fn, StepReward):
            raise ValueError(f"{type(cfg).__name__}.advantage='process' needs a process reward, a "
                             f"rlhf_book.rewards.StepReward (a reward at the end of each step), got "
                             f"{getattr(reward_fn, '__name__', type(reward_fn).__name__)}")
        if cfg.advantage == "process" and self.world > 1:
            raise ValueError(f"{type(cfg).__name__}.advantage='process' runs in one process only, got {self.world}")
        if cfg.dynamic_sampling and self.world > 1:
            raise ValueError(f"{type(cfg).__name__}.dynamic_sampling runs in one process only, got {self.world} "
                             "processes: each would keep another number of groups, and they must train on equal "
                             "shares of one batch; turn it off or run one process")
        if cfg.overlong_buffer is not None:
            self.reward_shaping = self.overlong_reward

    @property
    def samples_per_prompt(self) -> int:
        """K: :meth:`step` samples each of its B prompts K times, from one prefill of the prompt."""
        return self.config.num_generations

    def overlong_reward(self, rollout: Rollout) -> torch.Tensor:
        """DAPO's soft overlong punishment of each reply of ``rollout`` (eq. 13), L_max = ``max_new_tokens``, L_cache =
        ``overlong_buffer``; -> (B,) in [-overlong_penalty, 0] (:func:`~rlhf_book.rewards.soft_overlong_penalty`)."""
        cfg = self.config
        return soft_overlong_penalty(rollout.response_lengths, cfg.max_new_tokens, cfg.overlong_buffer,
                                     cfg.overlong_penalty)

    def step(self, prompts: Sequence) -> dict:
        """One iteration (:meth:`OnPolicyTrainer.step <rlhf_book.trainer.OnPolicyTrainer.step>`); with
        ``dynamic_sampling`` on the groups :meth:`dynamic_sample` keeps, plus its statistics."""
        if not self.config.dynamic_sampling:
            return super().step(prompts)
        t0, timings = time.perf_counter(), {}
        rollout, raw, stats = self.dynamic_sample(prompt_texts(prompts), timings)
        return {**self.learn(rollout, timings, t0, raw_scores=raw), **stats}

    @torch.no_grad()
    def dynamic_sample(self, texts: Sequence, timings: dict | None = None) -> tuple[Rollout, torch.Tensor, dict]:
        """DAPO's dynamic sampling (§3.2): K replies to each prompt, round after round, until ``len(texts)`` groups are
        not degenerate; -> (rollout of len(texts) groups, their raw scores (N,), statistics).

        Round 1 samples ``texts``; each later round the next prompts of ``prompt_stream`` (the
        run's draw in :meth:`train`; None, e.g. a direct :meth:`step`: ``texts`` again). A group is
        degenerate when its K scores (r after the missing-EOS rule, plus the overlong penalty:
        what the advantages see, the KL of ``kl_penalty="reward"`` aside) are all equal. It stops
        once ``len(texts)`` groups are kept, dropping the last round's surplus, or after
        ``max_sampling_rounds`` rounds, filling the batch up with the degenerate groups sampled
        first. Groups keep their sampling order. Statistics: ``sampling_rounds``,
        ``dropped_groups`` (share of the sampled groups left out of the batch) and
        ``sampled_degenerate_groups`` (share of the sampled groups that were degenerate).
        """
        cfg, K, B = self.config, self.config.num_generations, len(texts)
        rounds: list[tuple[Rollout, torch.Tensor]] = []
        kept, spare = [], []  # (round, group) of the groups with and without a signal
        batch = list(texts)
        while True:
            with timed(timings, "generate", self.device):
                ro = self.sample(batch, samples_per_prompt=K)
            with timed(timings, "filter", self.device), self.autocast():
                raw, scores = score_replies(ro, self.reward_fn, cfg.missing_eos_score, self.reward_shaping,
                                            cfg.forward_batch_size)
            for g, flat in enumerate(degenerate_groups(scores.view(-1, K)).tolist()):
                (spare if flat else kept).append((len(rounds), g))
            rounds.append((ro, raw))
            if len(kept) >= B or len(rounds) >= cfg.max_sampling_rounds:
                break
            batch = prompt_texts(self.prompt_stream()) if self.prompt_stream is not None else list(texts)
        chosen = sorted(kept[:B] + spare[:max(0, B - len(kept))])
        parts = []
        for r, (ro, raw) in enumerate(rounds):
            rows = [g * K + k for rr, g in chosen if rr == r for k in range(K)]
            if rows:
                parts.append((ro.select(rows), raw[rows]))
        sampled = sum(len(ro) for ro, _ in rounds) // K
        stats = {"sampling_rounds": len(rounds), "dropped_groups": 1.0 - B / sampled,
                 "sampled_degenerate_groups": len(spare) / sampled}
        return (cat_rollouts([ro for ro, _ in parts], self.tokenizer.pad_token_id), torch.cat([x for _, x in parts]),
                stats)

    def sequence_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Deprecated since 0.2.0: the estimator is ``self.advantage_estimator`` (its ``sequence_advantages``)."""
        warn_deprecated("CriticFreeTrainer.sequence_advantages", "CriticFreeTrainer.advantage_estimator", "0.2.0")
        return self.advantage_estimator.sequence_advantages(rewards, self.config.num_generations,
                                                            self.config.whiten_advantages, self.accelerator)

    def update(self, exp: Experience) -> dict:
        """``num_iterations`` passes of clipped-surrogate steps over (minibatches of) the batch; returns their stats.

        The shared loop :meth:`~rlhf_book.trainer.OnPolicyTrainer.clipped_update` (PPO's): rows
        permuted only when there are several minibatches; each step's loss normalised as
        ``loss_type`` says, on the whole minibatch however it is split into micro-batches.
        Reported: the mean over optimizer steps of each loss statistic, the first step's ratio,
        clip fraction and approx-KL (``first_*``: 1, 0, 0 up to float rounding when log pi_old is
        the policy's own), the number of optimizer steps (``updates``) and of passes (``epochs``).
        """
        cfg = self.config
        N = len(exp)  # this process's replies; minibatch_size counts the global batch's
        mb = min(local_size(cfg.minibatch_size, self.world, "minibatch_size") if cfg.minibatch_size else N, N)
        # TRL's dapo normaliser: the (global) generation batch's tokens per optimizer step
        tokens = exp.mask.sum() if self.world == 1 else self.accelerator.reduce(exp.mask.sum().clone(), "sum")
        num_items = tokens / math.ceil(N / mb)
        unit = {"grpo": "rows", "dr_grpo": "rows", "bnpo": "tokens", "dapo": None}[cfg.loss_type]
        return self.clipped_update(exp, lambda batch: self.loss(batch, num_items), epochs=cfg.num_iterations,
                                   minibatch_size=cfg.minibatch_size, loss_unit=unit)

    def loss(self, batch: Experience, num_items: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(loss, statistics as 0-d tensors) of one (micro-)batch, with grad; ``num_items``: dapo's normaliser."""
        cfg = self.config
        mask = batch.mask
        logprobs, _, entropy = self.policy_forward(batch.rollout)
        kl_in_loss = batch.kl_penalty == "loss" and batch.kl_coef > 0
        loss, stats = critic_free_policy_loss(
            logprobs, batch.old_logprobs, batch.advantages, mask, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high, importance_sampling_level=cfg.importance_sampling_level,
            max_completion_length=cfg.max_new_tokens, num_items=num_items,
            ref_logprobs=batch.ref_logprobs if kl_in_loss else None, beta=batch.kl_coef if kl_in_loss else 0.0,
            use_bias_correction_kl=cfg.use_bias_correction_kl,
            as_tensors=True,
        )
        ent = masked_mean(entropy, mask)
        loss = loss - cfg.entropy_coef * ent
        stats.update(entropy=ent.detach(), loss=loss.detach())
        return loss, stats  # normalised over this batch as loss_type says (dapo: by num_items); update scales it

    @torch.no_grad()
    def experience_stats(self, exp: Experience) -> dict:
        """The shared statistics plus the groups': ``reward_std``, ``advantage_std``, ``degenerate_groups``.

        ``reward_std``: std of the sequence rewards over the batch; ``group_reward_std``: mean
        std within a group; ``degenerate_groups``: share of groups whose K rewards are all
        equal (TRL's ``frac_reward_zero_std``); ``baseline``: REINFORCE's b after this batch;
        ``overlong_penalty``: the mean overlong punishment (<= 0, included in ``score``), with ``overlong_buffer``.
        """
        stats = super().experience_stats(exp)
        K, m = self.config.num_generations, exp.mask
        rewards = sequence_rewards(exp).float()
        adv = masked_sum(exp.advantages, m, dim=-1) / m.sum(-1).clamp(min=1)
        stats["reward_std"] = rewards.std().item() if rewards.numel() > 1 else 0.0
        stats["advantage_std"] = adv.std().item() if adv.numel() > 1 else 0.0
        if K > 1 and rewards.numel() % K == 0:
            groups = rewards.view(-1, K)
            stats["group_reward_std"] = groups.std(1).mean().item()
            stats["degenerate_groups"] = degenerate_groups(groups).float().mean().item()
        if self.baseline is not None:
            stats["baseline"] = self.baseline.value
        if self.config.overlong_buffer is not None:
            stats["overlong_penalty"] = self.overlong_reward(exp.rollout).mean().item()
        return stats

    def stateful(self) -> dict:
        state = super().stateful()
        if self.baseline is not None:
            state["baseline"] = self.baseline
        return state


# ------------------------------------------------------------------ pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the binomials
    (they overflow floats for n in the hundreds); 1 when fewer than k samples are wrong.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need n >= 1, 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@torch.no_grad()
def evaluate_pass_at_k(
    model,
    tokenizer,
    prompts: Sequence,
    score_fn: Callable,
    tau: float,
    n: int = 8,
    ks: Sequence[int] | None = None,
    *,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    threads: int | None = 1,
) -> dict:
    """Sample ``n`` replies per prompt, call a reply correct when ``score_fn`` >= ``tau``; -> pass@k for each k.

    ``score_fn(prompts, responses, terminated) -> (N,)`` (e.g. the gold reward); ``ks``
    (default 1 and n): the k reported as ``pass@k``, each the mean over prompts of
    :func:`pass_at_k`. Also ``mean_score``, ``accuracy`` (share of correct replies, = pass@1),
    ``correct`` (c per prompt), ``scores`` (the (P, n) scores as lists, to recount at another
    threshold), ``n`` and ``tau``. Sampling uses its own generator seeded
    with ``seed``, at most ``batch_size`` replies (but at least one prompt's n) per
    :func:`~rlhf_book.rollout.generate` call.
    """
    texts = prompt_texts(prompts)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    ks = sorted(set([1, n] if ks is None else ks))
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"every k must be an integer in [1, n={n}], got {k!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    chunks = sample_groups(model, tokenizer, texts, n, score_fn, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, batch_size=batch_size, threads=threads)
    scores = [sc for _, sc in chunks]
    s = torch.cat(scores).view(len(texts), n)
    correct = (s >= tau).sum(1).tolist()
    out = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(texts) for k in ks}
    out.update(mean_score=s.mean().item(), accuracy=sum(correct) / (n * len(texts)), correct=correct,
               scores=s.tolist(), n=n, tau=float(tau))
    return out
