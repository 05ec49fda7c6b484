"""Reference solutions for the chapter 1 exercises (try them yourself first!)."""

import math

import torch


def trajectory_logprob(token_logprobs, mask):
    """log pi(y|x) = sum over real tokens of log pi(a_t|s_t); (B, T) -> (B,)."""
    return torch.where(mask.bool(), token_logprobs, torch.zeros_like(token_logprobs)).sum(-1)


def returns_to_go(rewards, mask, gamma):
    """G_t = r_t + gamma G_{t+1}, computed backwards; 0 on padding; (B, T) -> (B, T)."""
    rewards = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), dtype=rewards.dtype)
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running * mask[:, t]
        out[:, t] = running
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# 1.3  log of a product is the sum of the logs
answer_logprob = math.log(0.5) + math.log(0.25) + math.log(0.8)

# 1.4  s_3 = (x, y_1, y_2): the prompt and the tokens before the third
answer_state = "B"

# 1.5  one score for 500 decisions: weak, noisy per-token credit
answer_credit = "D"

# 1.6  G_t: one sampled sum of rewards; V: E[G_t | s_t]; Q: E[G_t | s_t, a_t]; A = Q - V (c is left over)
answer_matching = {"G": "b", "V": "e", "Q": "a", "A": "d"}
