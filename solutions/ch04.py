"""Reference solutions for the chapter 4 exercises (try them yourself first!)."""

import torch

# 4.1  target = r_t + gamma V(s_{t+1}) = -0.2 + 1.0; V(s_t) = 0.4 is too low by 0.4
answer_value_target = 0.8


# 4.2
def gae_advantages(rewards, values, mask, gamma, lam):
    """GAE: delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the end), A_t = delta_t + gamma lam A_{t+1}; (B, T)."""
    m = mask.bool()
    r = torch.where(m, rewards, torch.zeros_like(rewards))
    v = torch.where(m, values, torch.zeros_like(values))
    next_v = torch.zeros_like(v)
    next_v[:, :-1] = v[:, 1:]  # already 0 where t+1 is padding
    delta = r + gamma * next_v - v
    adv = torch.zeros_like(delta)
    running = torch.zeros(delta.size(0), dtype=delta.dtype)
    for t in reversed(range(delta.size(1))):
        running = delta[:, t] + gamma * lam * running
        adv[:, t] = running
    return torch.where(m, adv, torch.zeros_like(adv))


# 4.3  the critic has not learned anything (explained variance ~ 0, value loss flat), so the TD
#      advantages are mostly noise; the actor moves (KL grows) but not in a useful direction
answer_stalled_run = "B"

# 4.4  lam = 1: A_t = G_t - V(s_t), the critic only enters as a baseline
answer_lambda = "D"

# 4.5  with lam = 1 the frozen critic (V = 0) no longer matters: A_t = G_t, whitened (a batch-mean baseline),
#      and the proxy rises; with lam = 0 only the last token saw the score
answer_frozen_critic = "C"
