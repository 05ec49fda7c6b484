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
"""

from __future__ import annotations

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
]


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
