"""KL divergence to the reference policy: estimators, the penalty's two forms, beta controllers.

The RLHF objective (chapter 5) is

    max_theta  E_{x, y ~ pi_theta}[ r(x, y) ]  -  beta * KL(pi_theta(.|x) || pi_ref(.|x))

with pi_ref the frozen base model. The sequence KL is a sum over response tokens of
per-token KLs, and each per-token KL is estimated from the one token that was sampled.
With a_t ~ pi_theta and the log-ratio ``log omega = log pi_ref(a_t) - log pi_theta(a_t)``
(omega, not rho: rho is PPO's pi_theta / pi_old; see the book's notation page), Schulman's
estimators of the reverse KL, KL(pi_theta || pi_ref), are

    k1 = -log omega                  unbiased, high variance, negative on many tokens
    k2 = 0.5 (log omega)^2           biased (low when the policies are close), low variance
    k3 = (omega - 1) - log omega     unbiased, low variance, always >= 0

Two ways to put the penalty into training:

* **as a reward** (Ziegler et al. 2019, InstructGPT): the per-token reward is
  ``-beta * k1_t`` plus the reward-model score at the last token
  (:func:`rlhf_book.rewards.per_token_rewards`). The penalty is then just part of the
  return that the advantages see; it is a number, never differentiated. This is the
  policy-gradient estimate of the gradient of the KL term, so it is correct.
* **as a loss** (GRPO, DeepSeekMath 2024): add ``beta * mean_t k3_t`` to the loss and
  differentiate it. Beware that the gradient of a *sampled estimate* of the KL is not the
  gradient of the KL, because the sampling distribution depends on theta too and autograd
  does not see that. For a_t ~ pi_theta: E[grad k1] = E[grad log pi_theta(a_t)] = 0, so a k1
  loss does nothing on average; E[grad k3] = grad KL(pi_ref || pi_theta), the *forward* KL
  (a fine regulariser, but a different one). ``tests/test_kl.py`` checks both identities.
"""

from __future__ import annotations

import torch

from .advantage import masked_mean, masked_sum

__all__ = [
    "kl_k1", "kl_k2", "kl_k3", "sequence_kl", "kl_loss",
    "exact_kl", "FixedKLController", "AdaptiveKLController", "make_kl_controller",
]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi_theta(a) - log pi_ref(a) for a ~ pi_theta (unbiased, can be < 0); (B, T) -> (B, T)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (log pi_ref(a) - log pi_theta(a))^2 (biased, low variance, >= 0); (B, T) -> (B, T)."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (omega - 1) - log omega, omega = pi_ref(a) / pi_theta(a) (unbiased, >= 0); (B, T) -> (B, T).

    With x = log omega, k3 = e^x - 1 - x ~ x^2 / 2 is tiny next to x when the policies are
    close, so ``exp(x) - 1 - x`` cancels catastrophically (float32: garbage, even negative,
    for |x| < 1e-3). We use ``expm1(x) - x`` for |x| >= 1e-2 and the Taylor series
    x^2/2 (1 + x/3 (1 + x/4 (1 + x/5))) below (truncation error < 1e-10 relative): accurate to
    float precision everywhere, and >= 0.
    """
    x = ref_logprobs - logprobs
    small = x.abs() < 1e-2
    xs = torch.where(small, x, torch.zeros_like(x))  # keeps the unused branch finite (no NaN grads)
    series = 0.5 * xs * xs * (1 + xs / 3 * (1 + xs / 4 * (1 + xs / 5)))
    xl = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, series, torch.expm1(xl) - xl)


def sequence_kl(per_token_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence KL = sum_t KL_t over real response tokens; (B, T), mask (B, T) -> (B,)."""
    return masked_sum(per_token_kl, mask, dim=-1)


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO-style KL loss: mean over real tokens of k3(logprobs, ref_logprobs); (B, T) -> scalar.

    ``logprobs`` carry gradients, ``ref_logprobs`` do not. Its expected gradient is that of
    KL(pi_ref || pi_theta), not KL(pi_theta || pi_ref) (see the module docstring).
    """
    return masked_mean(kl_k3(logprobs, ref_logprobs), mask)


def exact_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) = sum_a p(a) (log p(a) - log q(a)) of categoricals given by logits; (..., V) -> (...)."""
    lp, lq = torch.log_softmax(logits_p.float(), -1), torch.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, beta: float):
        if beta < 0:
            raise ValueError(f"KL coefficient beta must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Nothing to adapt; returns beta."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019) proportional controller that steers the KL toward ``target``.

    e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)

    ``current_kl`` is the mean *sequence* KL of the last batch (nats) and ``n_steps`` the
    number of episodes (responses) in it. KL above target raises beta, below lowers it;
    the clip bounds the change per batch so one noisy estimate cannot swing beta.
    """

    def __init__(self, init_beta: float, target: float, horizon: float = 10_000):
        if init_beta <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(f"init_beta, target and horizon must be > 0, got {init_beta}, {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_beta), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """One controller step; returns the new beta."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


def make_kl_controller(beta: float, target: float | None = None, horizon: float = 10_000):
    """Adaptive controller when ``target`` is given (and beta > 0), else a fixed beta."""
    if target is None:
        return FixedKLController(beta)
    return AdaptiveKLController(beta, target, horizon)
