"""Monte-Carlo estimates of V(s_t) and Q(s_t, a_t) for a language model, by sampling.

In the LM view a state is the prompt plus the tokens so far, s_t = (x, y_<t), and
taking the action a_t = y_t leads *deterministically* to s_{t+1} = (x, y_<=t).
With the reward only at the end (r_t = 0 before EOS) and gamma = 1 this gives

    Q(s_t, a_t) = r_t + gamma V(s_{t+1})    and    A(s_t, a_t) = Q(s_t, a_t) - V(s_t),

so one needs only V, estimated here as the mean reward of ``n`` sampled completions
of each prefix. Chapter 1 uses it to show which tokens carry the credit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .rollout import decode_responses, generate_from_ids

__all__ = ["PrefixValues", "mc_prefix_values"]


@dataclass
class PrefixValues:
    """V(s_t) estimates for t = 0..T (T+1 states: before each token, then after the last one).

    values (T+1,), stderr (T+1,) the standard error of each mean, tokens the T response
    tokens (strings), final_reward r(x, y) of the response itself.
    """

    values: torch.Tensor
    stderr: torch.Tensor
    tokens: list[str]
    final_reward: float

    @property
    def advantages(self) -> torch.Tensor:
        """A_t = r_t + V(s_{t+1}) - V(s_t) with gamma = 1 and r_t = 0 until the end, (T,)."""
        nxt = self.values[1:].clone()
        nxt[-1] = self.final_reward  # after EOS the episode is over: Q = r_T
        return nxt - self.values[:-1]


@torch.no_grad()
def mc_prefix_values(
    model,
    tokenizer,
    prompt_ids: torch.Tensor,
    response_ids: torch.Tensor,
    reward_fn: Callable,
    prompt: str,
    n: int = 32,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> PrefixValues:
    """Estimate V(s_t) for every prefix of one response: prompt_ids (P,), response_ids (T,) incl. EOS.

    For each t, ``n`` completions of (prompt, y_<t) are sampled and scored by
    ``reward_fn(prompts, responses, terminated)``; V(s_t) is their mean.
    """
    device = prompt_ids.device
    eos = tokenizer.eos_token_id
    T = response_ids.numel()
    vals, errs = [], []
    for t in range(T):
        prefix = torch.cat([prompt_ids, response_ids[:t]])
        ids = prefix.unsqueeze(0).expand(n, -1).contiguous()
        mask = torch.ones_like(ids)
        budget = max(1, max_new_tokens - t)
        roll = generate_from_ids(model, tokenizer, ids, mask, budget, temperature, generator=generator)
        full = torch.cat([response_ids[:t].unsqueeze(0).expand(n, -1), roll.response_ids], 1)
        full_mask = torch.cat([torch.ones(n, t, dtype=torch.long, device=device), roll.response_mask], 1)
        texts = decode_responses(tokenizer, full, full_mask)
        r = reward_fn([prompt] * n, texts, roll.terminated).float()
        vals.append(r.mean())
        errs.append(r.std() / n**0.5)
    resp_text = decode_responses(tokenizer, response_ids[None], torch.ones(1, T, dtype=torch.long))
    terminated = torch.tensor([bool(response_ids[-1] == eos)])
    final = float(reward_fn([prompt], resp_text, terminated)[0])
    vals.append(torch.tensor(final))
    errs.append(torch.tensor(0.0))
    tokens = [tokenizer.decode([i]) for i in response_ids.tolist()]
    return PrefixValues(torch.stack(vals), torch.stack(errs), tokens, final)
