"""Reference solutions for the chapter 8 exercises (try them yourself first!)."""

import math

import torch

# log n - (n - 1)/n in nats: log 4 - 3/4 = 0.636, log 16 - 15/16 = 1.835
answer_kl_bound = [math.log(4) - 3 / 4, math.log(16) - 15 / 16]

# best-of-2 ends on the reward-0 reply only when both draws are it: pi_2 = (1/4, 3/4); KL(pi_2 || p) =
# 1/4 log(1/4 / 1/2) + 3/4 log(3/4 / 1/2) = 0.131 nats, below the bound log 2 - 1/2 = 0.193 (two atoms, not continuous)
answer_kl_coin = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)

# R(d) = 0.9 d - 0.25 d^2: R'(d) = 0.9 - 0.5 d = 0 at d* = 1.8; KL* = d*^2 = 3.24; R(d*) = 0.9^2 / (4 * 0.25) = 0.81;
# log 68 - 67/68 = 3.234 < 3.24 <= log 69 - 68/69 = 3.249: n = 69 (beyond it, more samples lower the fitted gold gain)
answer_gao_peak = {"d_peak": 1.8, "kl_peak": 3.24, "gain": 0.81, "n": 69}


def best_of_n_probs(p, rewards, n):
    """pi_n(y) = F(r(y))^n - F(r(y)^-)^n for a categorical p with distinct rewards, in the atoms' own order."""
    order = torch.argsort(rewards)  # accumulate the CDF in reward order
    F = torch.cumsum(p[order], 0).clamp(max=1.0)  # F(r(y)): P(reward <= r(y))
    F_below = F - p[order]  # F(r(y)^-): P(reward < r(y)), rewards distinct
    pi = torch.empty_like(p)
    pi[order] = F**n - F_below.clamp(min=0.0) ** n
    return pi


# mean gives the exploit (0 + 0 + 0 + 5)/4 = 1.25 > 0: it rises with any one member's error and does not penalise
# disagreement. min gives 0 and mean - std gives 1.25 - 2.17 < 0: the exploit stops paying (Coste et al. 2023: worst
# case and uncertainty-weighted optimisation both reduce over-optimisation); "mean + std" rewards the disagreement.
answer_ensemble = "A"

# proxy and gold rise together to iteration ~300 (KL ~3), then the proxy keeps rising while the gold falls: the policy
# over-optimises the proxy; stop at the gold peak, raise the KL coefficient, or use an ensemble
answer_diagnosis = "D"

# bon: d (alpha - beta d) = 0 at d = alpha/beta; rl: alpha - beta log d = 0 at d = exp(alpha/beta); the bound depends on
# n alone and grows like log n; the exact KL of a 0/1 reward tends to log(1/q) (pi_n -> p given "right") and stays below
answer_forms = {"bon_fit": "c", "rl_fit": "d", "kl_bound": "a", "kl_exact": "b"}

# 8.8  the gold lost by picking with the reward model rather than the gold grows with n': about 0.03 at n' = 2,
#      0.05-0.11 at n' = 64; the more candidates, the likelier the top proxy score is a reply the proxy overrates
answer_selection_experiment = "B"
