"""Reference solutions for the chapter 5 exercises (try them yourself first!)."""

import torch

# token 1: r = 1.4, A = +2 -> min(2.8, 1.2 * 2) = 2.4; token 2: r = 0.6, A = -1 -> min(-0.6, 0.8 * -1) = -0.8
answer_clipped_objective = (2.4 - 0.8) / 2

# beta = 0 over-optimised the proxy; beta = 50 would freeze the policy at the reference; 0.1 keeps a few nats of KL
answer_beta = "B"


def kl_k3(logprobs, ref_logprobs):
    """k3 = (r - 1) - log r, r = pi_ref / pi_theta, computed with expm1 for precision; (B, T) -> (B, T)."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r
