"""Reference solutions for the chapter 3 exercises (try them yourself first!)."""

import torch

# 3.1  A_t = r_t + gamma V(s_{t+1}) - V(s_t) = -0.1 + 0.95 * 2.5 - 2.0
answer_advantage = -0.1 + 0.95 * 2.5 - 2.0  # = 0.275


# 3.2
def a2c_actor_loss(logprobs, advantages, mask):
    """-mean over real tokens of A_t log pi(a_t|s_t), with A treated as a constant; (B, T) -> scalar."""
    m = mask.bool()
    terms = torch.where(m, advantages.detach() * logprobs, torch.zeros_like(logprobs))
    return -terms.sum() / m.sum()


# 3.3  D (sample a response) -> B (reward model scores it) -> E (critic values every prefix)
#      -> A (advantages from rewards and values) -> C (gradient step on actor and critic)
answer_order = "DBEAC"

# 3.4  the probability of that token in that state goes up
answer_high_advantage = "D"

# 3.5  proxy up, gold down, KL in the tens of nats, rising entropy: reward hacking; put the KL penalty back
answer_run_diagnosis = "A"
