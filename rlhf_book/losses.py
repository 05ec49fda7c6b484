"""Losses of actor-critic training: the policy-gradient (actor) loss, the value (critic) loss, entropy.

All are means over valid tokens of the batch (``masked_mean``), so a long response
weighs more than a short one, the convention of the reference RLHF implementations.
"""

from __future__ import annotations

import torch

from .advantage import masked_mean
from .rollout import response_logprobs

__all__ = ["policy_gradient_loss", "value_loss", "entropy_from_logits", "entropy_bonus", "policy_gradient_variance"]


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A2C actor loss -mean_t[A_t log pi(a_t | s_t)] with A detached; (B, T) -> scalar.

    Its gradient is -mean_t[A_t grad log pi(a_t | s_t)]: gradient descent raises the
    probability of tokens with A_t > 0 and lowers it for A_t < 0.
    """
    if logprobs.shape != advantages.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and advantages {tuple(advantages.shape)} differ in shape")
    return -masked_mean(advantages.detach() * logprobs, mask)


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip_range: float | None = None,
) -> torch.Tensor:
    """Critic loss 0.5 mean_t[(V(s_t) - target_t)^2] (targets detached); (B, T) -> scalar.

    The factor 0.5 makes the gradient w.r.t. V(s_t) exactly V(s_t) - target_t.
    With ``clip_range`` (PPO style) V is also clipped to old_values +- clip_range and
    the larger of the two squared errors is used: 0.5 mean max((V - R)^2, (V_clip - R)^2).
    """
    if values.shape != returns.shape:
        raise ValueError(f"values {tuple(values.shape)} and returns {tuple(returns.shape)} differ in shape")
    returns = returns.detach()
    err = (values - returns) ** 2
    if clip_range is not None:
        if old_values is None:
            raise ValueError("clip_range needs old_values (the critic's values at rollout time)")
        if clip_range <= 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        old = old_values.detach()
        clipped = old + (values - old).clamp(-clip_range, clip_range)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = logsumexp(z) - sum_v softmax(z)_v z_v of the next-token distribution; (B, T, V) -> (B, T)."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    plogits = torch.where(p > 0, p * logits, torch.zeros((), dtype=logits.dtype, device=logits.device))  # -inf logits
    return torch.logsumexp(logits, dim=-1) - plogits.sum(-1)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float = 0.01) -> torch.Tensor:
    """Loss term -coef * mean_t H(pi(. | s_t)); adding it to the loss rewards keeping the policy spread out."""
    return -coef * masked_mean(entropy, mask)


def policy_gradient_variance(
    model: torch.nn.Module, rollout, weights: torch.Tensor, temperature: float = 1.0
) -> dict:
    """Spread of the one-sample policy-gradient estimates g_i = sum_t w_it grad log pi(a_it | s_it).

    ``weights`` (B,) (one number per response, e.g. its reward) or (B, R) (per token, e.g.
    advantages). Returns the mean gradient's norm, the total variance
    E||g_i - mean g||^2 (trace of the covariance) and the mean squared norm E||g_i||^2,
    over the B responses of ``rollout`` (a :class:`~rlhf_book.rollout.Rollout`): the variance
    a batch of size N divides by N.
    """
    mask = rollout.response_mask
    if weights.dim() == 1 and weights.size(0) == mask.size(0):
        weights = weights[:, None].expand_as(mask)
    if weights.shape != mask.shape:
        raise ValueError(f"weights must be (B,) or (B, R) = {tuple(mask.shape)}, got {tuple(weights.shape)}")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(len(rollout)):
        sl = slice(i, i + 1)
        lp = response_logprobs(model, rollout.select(torch.tensor([i], device=mask.device)), temperature)
        obj = torch.where(mask[sl].bool(), weights[sl].detach() * lp, 0.0).sum()
        g = torch.autograd.grad(obj, params, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)]))
    G = torch.stack(grads)
    mean = G.mean(0)
    return {
        "mean_grad_norm": float(mean.norm()),
        "total_variance": float(((G - mean) ** 2).sum(1).mean()),
        "mean_sq_norm": float((G**2).sum(1).mean()),
    }
