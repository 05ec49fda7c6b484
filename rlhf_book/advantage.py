"""Advantage estimation: TD errors, Monte-Carlo returns and GAE over masked token sequences.

A response is an episode. At token t the state s_t is the prompt plus the tokens
before t, the action is token t, and the per-token reward r_t is whatever
:func:`rlhf_book.rewards.per_token_rewards` put there (usually a KL penalty on every
token plus the reward model's score on the last one). With a critic V:

    TD error       delta_t = r_t + gamma V(s_{t+1}) - V(s_t)
    MC return      G_t     = sum_{k >= t} gamma^(k - t) r_k
    GAE            A_t     = sum_{k >= t} (gamma lam)^(k - t) delta_k,   returns_t = A_t + V(s_t)

``lam = 0`` gives A_t = delta_t (low variance, biased by V); ``lam = 1`` gives
A_t = G_t - V(s_t) (unbiased, high variance).

Masks are 0/1 tensors (B, T) with 1 on real response tokens. A response's tokens
come first and padding after (generation pads on the right of the response), so
the state after the last real token is terminal: V there is 0, nothing is
bootstrapped past the end of a response. Masked positions of every output are 0.

Without a critic (chapter 7) the baseline is made of other samples: :func:`rloo_advantages`,
:func:`grpo_advantages` (Dr. GRPO: ``scale="none"``) and :class:`RunningMeanBaseline` act on
(B, K) sequence rewards, K replies per prompt. Which estimator an experience step uses is
one name in :data:`rlhf_book.experience.ADVANTAGE_ESTIMATORS`.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "last_token_index",
    "td_errors",
    "discounted_returns",
    "gae",
    "process_advantages",
    "SCALE_REWARDS",
    "degenerate_groups",
    "rloo_advantages",
    "grpo_advantages",
    "RunningMeanBaseline",
]

SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's constant in (r - mean) / (std + 1e-4)


def _check_mask(x: torch.Tensor, mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    if mask.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but the values have shape {tuple(x.shape)}")
    return mask.bool()


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real (mask 1) token in each row, for left or right padding; (B, T) -> (B,)."""
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("a row of the mask has no real token")
    cols = torch.arange(mask.size(-1), device=mask.device)
    return torch.where(mask.bool(), cols, torch.full_like(cols, -1)).max(-1).values


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum of x over positions where mask is 1; (B, T) -> scalar, or reduced over ``dim``."""
    m = _check_mask(x, mask)
    x0 = torch.where(m, x, _zero(x))
    return x0.sum() if dim is None else x0.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(m x) / sum(m); (B, T) -> scalar, or reduced over ``dim`` (0 where a row has no valid entry)."""
    m = _check_mask(x, mask)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries, sum(m (x - mean)^2) / (n - 1) (or / n); (B, T) -> scalar.

    Raises ValueError when the mask selects nothing. With one valid entry the
    unbiased correction is skipped and the variance is 0.
    """
    m = _check_mask(x, mask)
    n = int(m.sum())
    if n == 0:
        raise ValueError("mask selects no entries: the variance of nothing is undefined")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over valid entries; ``shift_mean=False`` adds the mean back. (B, T) -> (B, T).

    ``shift_mean=False`` only rescales: it is how rewards are whitened in the
    reference RLHF implementations (a constant shift of the reward would change
    what the policy is rewarded for ending early or late).
    """
    m = _check_mask(x, mask)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, _zero(out))


def _check_prefix_mask(mask: torch.Tensor) -> torch.Tensor:
    """Masks must be 1...1 0...0 along T (each response's tokens first, padding after)."""
    m = mask.long()
    if m.dim() != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    if m.size(1) > 1 and bool((m[:, 1:] > m[:, :-1]).any()):
        row = int((m[:, 1:] > m[:, :-1]).any(1).nonzero()[0])
        raise ValueError(
            f"mask row {row} has a 1 after a 0: responses must be right-padded (real tokens first, padding after)"
        )
    return mask.bool()


def _next(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x_{t+1} where t+1 is a real token, else 0 (terminal); (B, T) -> (B, T)."""
    nxt = torch.zeros_like(x)
    nxt[:, :-1] = torch.where(m[:, 1:], x[:, 1:], _zero(x))
    return nxt


def td_errors(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """TD error delta_t = r_t + gamma V(s_{t+1}) - V(s_t), V = 0 after the last valid token; (B, T) -> (B, T).

    Not detached: pass detached values when the result is used as a target.
    """
    _check_mask(values, mask)
    m = _check_prefix_mask(mask)
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must have the same shape")
    r = torch.where(m, rewards, _zero(rewards))
    v = torch.where(m, values, _zero(values))
    delta = r + gamma * _next(v, m) - v
    return torch.where(m, delta, _zero(delta))


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Monte-Carlo return-to-go G_t = r_t + gamma G_{t+1}, 0 after the last valid token; (B, T) -> (B, T), detached."""
    _check_mask(rewards, mask)
    m = _check_prefix_mask(mask)
    r = torch.where(m, rewards.detach(), _zero(rewards))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.size(1) - 1, -1, -1):  # padding after the end has r = 0, so G stays 0 there
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(m, out, _zero(out))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE A_t = delta_t + gamma lam A_{t+1} and returns = A + V; (B, T) -> ((B, T), (B, T)), detached, masked 0.

    ``lam=0``: A_t is the TD error; ``lam=1``: A_t = G_t - V(s_t) (Monte-Carlo return minus baseline).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    m = _check_mask(values, mask)
    values = values.detach()
    delta = td_errors(rewards.detach(), values, mask, gamma)
    adv = torch.zeros_like(delta)
    running = torch.zeros_like(delta[:, 0])
    T = delta.size(1)
    for t in range(T - 1, -1, -1):
        carry = m[:, t + 1].to(delta.dtype) if t + 1 < T else torch.zeros_like(running)
        running = delta[:, t] + gamma * lam * running * carry
        adv[:, t] = running
    adv = torch.where(m, adv, _zero(adv))
    returns = torch.where(m, adv + values, _zero(adv))
    return adv, returns


# ------------------------------------------------------------------ group baselines on (B, K) sequence rewards (chapter 7)
def _check_groups(rewards: torch.Tensor, min_k: int, who: str) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        raise ValueError(f"{who}: rewards must be a (B, K) tensor (B prompts, K samples each), got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    if rewards.size(1) < min_k:
        raise ValueError(f"{who} needs K >= {min_k} samples per prompt, got rewards of shape {tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"{who}: rewards contain NaN or inf")
    return rewards.float()


def degenerate_groups(rewards: torch.Tensor) -> torch.Tensor:
    """True for each group whose K rewards are all equal (no learning signal); (B, K) -> (B,) bool."""
    r = _check_groups(rewards, 1, "degenerate_groups")
    return r.amax(1) == r.amin(1)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i - mean of the other K - 1 rewards of its group (Kool et al. 2019); (B, K) -> (B, K).

    Equal to K/(K-1) (r_i - group mean): unbiased, since the baseline of r_i does not use r_i.
    A degenerate group gets exactly 0 (computed, the baseline could differ from r_i by rounding).
    """
    r = _check_groups(rewards, 2, "rloo_advantages")
    K = r.size(1)
    baseline = (r.sum(1, keepdim=True) - r) / (K - 1)
    return torch.where(degenerate_groups(r)[:, None], torch.zeros_like(r), r - baseline)


def grpo_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = STD_EPS) -> torch.Tensor:
    """GRPO: A_i = (r_i - group mean) / (std + eps), std of the group, of the batch or none; (B, K) -> (B, K).

    ``scale``: "group" (GRPO, TRL's default), "batch" (std of all B * K rewards: Lite PPO) or
    "none" (Dr. GRPO: only the group mean is subtracted). The std is Bessel-corrected and
    eps = 1e-4, as TRL 1.16 computes it (``nanstd``); a degenerate group gets exactly 0,
    even with eps = 0.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {list(SCALE_REWARDS)}, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    r = _check_groups(rewards, 2, "grpo_advantages")
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (r.std() + eps)
    return torch.where(degenerate_groups(r)[:, None], torch.zeros_like(adv), adv)


def process_advantages(step_rewards: torch.Tensor, step_ends: torch.Tensor, mask: torch.Tensor, group_size: int,
                       eps: float = STD_EPS) -> torch.Tensor:
    """Process supervision with a group baseline (DeepSeekMath, Shao et al. 2024, sec. 4.1.3); (B, R) x3 -> (B, R).

    ``step_rewards`` (B, R): a reward at each token that ends a step (``step_ends`` True there);
    rows are B / K groups of ``group_size`` = K adjacent replies. Each step reward is normalised
    by the mean and std of *all* the step rewards of its group, r~ = (r - mean) / (std + eps), and
    a token's advantage is the sum of the normalised rewards of the steps that end at or after it,
    A_t = sum_{j: end_j >= t} r~_j: a token is credited with what follows it, not with what came
    before. A group whose step rewards are all equal (or that has fewer than two) gets 0.
    """
    for name, t in (("step_ends", step_ends), ("mask", mask)):
        if t.shape != step_rewards.shape:
            raise ValueError(f"process_advantages: {name} has shape {tuple(t.shape)}, step_rewards has "
                             f"{tuple(step_rewards.shape)}")
    B, R = step_rewards.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"process_advantages: {B} replies are not groups of group_size={group_size}")
    ends = step_ends.bool() & mask.bool()
    r = step_rewards.float()
    if not bool(torch.isfinite(r[ends]).all()):
        raise ValueError("process_advantages: step rewards contain NaN or inf")
    g_ends, g_r = ends.view(-1, group_size * R), r.view(-1, group_size * R)
    n = g_ends.sum(1, keepdim=True)
    mean = torch.where(g_ends, g_r, 0.0).sum(1, keepdim=True) / n.clamp_min(1)
    var = torch.where(g_ends, (g_r - mean) ** 2, 0.0).sum(1, keepdim=True) / (n - 1).clamp_min(1)
    normed = (g_r - mean) / (var.sqrt() + eps)
    inf = float("inf")
    spread = torch.where(g_ends, g_r, -inf).amax(1, keepdim=True) > torch.where(g_ends, g_r, inf).amin(1, keepdim=True)
    flat = torch.where(g_ends & spread, normed, 0.0).view(B, R)  # equal rewards: exact zeros, whatever the rounding
    adv = flat.flip(1).cumsum(1).flip(1)  # sum over the steps ending at or after t
    return torch.where(mask.bool(), adv, torch.zeros_like(adv))


class RunningMeanBaseline:
    """REINFORCE's baseline b: an exponential moving average of past batches' mean reward, bias-corrected.

    After batches with means m_1..m_n, b = sum_j decay^(n-j) m_j / sum_j decay^(n-j) (so
    b = m_1 after one batch, whatever the decay; ``decay=0``: the last batch's mean). b = 0
    before any batch. :meth:`advantages` uses the b of *past* batches only, so A = r - b is
    an unbiased policy-gradient weight (b does not depend on the samples it is subtracted from).
    """

    def __init__(self, decay: float = 0.9):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        self.decay, self._ema, self.count = float(decay), 0.0, 0

    @property
    def value(self) -> float:
        """The current baseline b (0 before the first batch)."""
        return self._ema / (1.0 - self.decay ** self.count) if self.count else 0.0

    def update(self, rewards: torch.Tensor) -> float:
        """Fold one batch's mean reward into b; returns the new b."""
        self._ema = self.decay * self._ema + (1.0 - self.decay) * float(rewards.float().mean())
        self.count += 1
        return self.value

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """A = r - b with the b of past batches, then fold this batch in; any shape -> same shape."""
        adv = rewards.float() - self.value
        self.update(rewards)
        return adv

    def state_dict(self) -> dict:
        return {"decay": self.decay, "ema": self._ema, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self._ema, self.count = float(state["decay"]), float(state["ema"]), int(state["count"])
