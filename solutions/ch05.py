"""Reference solutions for the chapter 5 exercises (try them yourself first!)."""

import torch

# 5.1  token 1: rho = 1.4, A = +2 -> min(2.8, 1.2 * 2) = 2.4; token 2: rho = 0.6, A = -1 -> min(-0.6, 0.8 * -1) = -0.8
answer_clipped_objective = (2.4 - 0.8) / 2

# 5.2  beta = 0 over-optimised the proxy; beta = 50 would freeze the policy at the reference; 0.1 keeps a few nats of KL
answer_beta = "C"


# 5.3
def kl_k3(logprobs, ref_logprobs):
    """k3 = (omega - 1) - log omega, omega = pi_ref / pi_theta, computed with expm1 for precision; (B, T) -> (B, T)."""
    log_omega = ref_logprobs - logprobs
    return torch.expm1(log_omega) - log_omega


# 5.4  k1: unbiased, often negative per token; k2: >= 0, biased; k3: >= 0 and unbiased;
#      k3 as a loss: the gradient of the forward KL, KL(pi_ref || pi_theta) (e fits none)
answer_kl_matching = {"k1": "c", "k2": "d", "k3": "a", "k3_loss": "b"}

# 5.5  a KL below 0 before any update: the two log-probs are not of the same distribution (a temperature on one side)
answer_negative_kl = "A"

# 5.6  ten times the learning rate: clip fraction and approx-KL grow by an order of magnitude, the steps are too large
answer_lr_experiment = "B"
