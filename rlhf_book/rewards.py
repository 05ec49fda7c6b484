"""Per-token rewards for RL on a language model: a sequence score plus a KL penalty on every token.

A reward model (or the gold labeler) gives one number per response. RL with a
critic needs a reward per token, so the score is placed on the *last* real token
of the response (the EOS, or the last token when the response was cut off), and
every token pays for moving away from the reference model:

    r_t = - beta (log pi(a_t | s_t) - log pi_ref(a_t | s_t))  +  [t = last] * score

The bracket is the k1 estimate of KL(pi || pi_ref) at token t: its sum over a
sampled response is an unbiased estimate of the sequence-level KL.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .advantage import last_token_index
from .kl import kl_k1

__all__ = ["per_token_rewards", "apply_missing_eos_score", "soft_overlong_penalty", "check_scores",
           "reward_fn_from_verifier", "terminated_flags", "StepReward", "StepRewards", "char_end_tokens"]


def _fn_name(fn) -> str:
    """How an error message names a reward function: its ``__name__``, else its class."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def check_scores(values, n: int, name: str = "reward_fn", fn=None, device=None) -> torch.Tensor:
    """What a reward function returned, as a finite float32 tensor (n,) on ``device``; ValueError otherwise.

    Accepted: a tensor (any device; shape (n,) or (n, 1)), a NumPy array or a sequence of
    ``n`` real numbers (bools count as 0 / 1). Anything else (strings, None, a wrong length,
    a NaN or an infinity) raises a ValueError naming ``name`` (and ``fn``'s own name), the
    row and the value, before the score can reach a loss, the weights or a checkpoint.
    """
    who = f"{name} ({_fn_name(fn)})" if fn is not None else name
    if isinstance(values, torch.Tensor):
        if values.is_complex() or values.device.type == "meta":
            raise ValueError(f"{who} must return real scores, got a {values.dtype} tensor on {values.device}")
        t = values.detach().reshape(-1).to("cpu", torch.float64)
        rows = t.tolist()
    else:
        if isinstance(values, (str, bytes)) or values is None or not hasattr(values, "__len__"):
            raise ValueError(f"{who} must return {n} scores (a tensor or a list of numbers), got "
                             f"{type(values).__name__}: {values!r:.80}")
        rows = values.reshape(-1).tolist() if hasattr(values, "reshape") else list(values)
    if len(rows) != n:
        raise ValueError(f"{who} returned {len(rows)} scores for {n} responses; it must return one per response")
    for i, x in enumerate(rows):
        if isinstance(x, (list, tuple)) and len(x) == 1:
            x = rows[i] = x[0]
        if not isinstance(x, numbers.Real) or not math.isfinite(x):
            raise ValueError(f"{who} returned {x!r} for row {i}: scores must be finite numbers (a NaN or an "
                             f"infinity would reach the weights and every checkpoint after)")
    out = torch.tensor([float(x) for x in rows], dtype=torch.float32)
    return out if device is None else out.to(device)


def terminated_flags(terminated, n: int) -> list[bool]:
    """A reward function's ``terminated`` argument as n Python bools: None (every reply ended) -> [True] * n; a
    tensor or a sequence -> its values as bools (the caller checks the length, naming its own arguments)."""
    if terminated is None:
        return [True] * n
    return [bool(t) for t in (terminated.tolist() if hasattr(terminated, "tolist") else terminated)]


def reward_fn_from_verifier(verify, name: str | None = None, require_eos: bool = False):
    """A reward function ``(prompts, responses, terminated) -> (B,)`` from a check of one reply: a verifiable reward.

    ``verify(prompt, response) -> bool or number`` (True: 1.0, False: 0.0) is called per row, with
    the prompt as the trainer has it (a string or chat messages). ``require_eos``: a reply cut off
    before EOS (``terminated`` False) scores 0 without being checked. The scores pass
    :func:`check_scores` (a NaN or a string from ``verify`` raises, naming the row).
    """
    if not callable(verify):
        raise ValueError(f"verify must be a function (prompt, response) -> bool or number, got {verify!r}")
    label = name or f"{_fn_name(verify)}_reward"

    def reward_fn(prompts, responses, terminated=None) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{label}: {len(prompts)} prompts but {len(responses)} responses")
        ended = terminated_flags(terminated, len(responses))
        if len(ended) != len(responses):
            raise ValueError(f"{label}: {len(ended)} terminated flags for {len(responses)} responses")
        scores = [verify(p, r) if (t or not require_eos) else 0.0 for p, r, t in zip(prompts, responses, ended)]
        return check_scores(scores, len(responses), label, verify)

    reward_fn.__name__ = reward_fn.__qualname__ = label
    return reward_fn


def apply_missing_eos_score(scores: torch.Tensor, terminated: torch.Tensor, missing_eos_score: float | None) -> torch.Tensor:
    """Scores with every response that never produced EOS set to ``missing_eos_score``; (B,), (B,) -> (B,).

    The "EOS trick" of Huang et al. (2024): a reward model has rarely seen cut-off
    replies, so it may score them well; a fixed low score teaches the policy to stop.
    ``None`` keeps the scores as they are.
    """
    if missing_eos_score is None:
        return scores
    term = torch.as_tensor(terminated, dtype=torch.bool, device=scores.device)
    return torch.where(term, scores, torch.full_like(scores, float(missing_eos_score)))


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of replies of ``lengths`` tokens; (B,) -> (B,) <= 0.

    With L_max = ``max_length`` and L_cache = ``buffer`` (1 <= L_cache <= L_max)::

        0                                        |y| <= L_max - L_cache
        (L_max - L_cache - |y|) / L_cache * p    L_max - L_cache < |y| <= L_max   (reaches -p at |y| = L_max)
        -p                                       |y| > L_max

    p = ``penalty`` (verl's ``overlong_penalty_factor``; the paper and TRL's
    ``get_soft_overlong_punishment`` have p = 1), branch for branch as TRL computes it. ``lengths``
    counts a reply's generated tokens, EOS included, as ``Rollout.response_lengths`` does. A
    reply sampled with ``max_new_tokens`` = L_max never has more than L_max tokens, so there
    the last branch is never reached: a reply cut off at L_max gets -p from the middle one.
    A float32 tensor on the device of ``lengths``.
    """
    lengths = torch.as_tensor(lengths)
    for name, v in (("max_length", max_length), ("buffer", buffer)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if buffer > max_length:
        raise ValueError(f"buffer must be at most max_length ({max_length}), got {buffer}")
    if isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or not math.isfinite(penalty) or penalty <= 0:
        raise ValueError(f"penalty must be a finite number > 0, got {penalty!r}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape (B,), got {tuple(lengths.shape)}")
    ramp = ((max_length - buffer) - lengths.float()) / buffer  # >= 0 inside the safe range, -1 at L_max
    return ramp.clamp(-1.0, 0.0) * float(penalty)


def per_token_rewards(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -kl_coef (log pi - log pi_ref) + score on the last valid token; -> (rewards (B, T), kl (B, T)).

    ``scores`` (B,); ``response_mask``, ``logprobs``, ``ref_logprobs`` (B, T). ``kl`` is the
    per-token k1 estimate log pi - log pi_ref (0 at masked positions; all 0 when no
    log-probs are given). Both outputs are detached: rewards are constants to the optimizer.
    """
    if scores.dim() != 1 or scores.size(0) != response_mask.size(0):
        raise ValueError(f"scores must have shape (B,) = ({response_mask.size(0)},), got {tuple(scores.shape)}")
    if (logprobs is None) != (ref_logprobs is None):
        raise ValueError("pass both logprobs and ref_logprobs (for the KL penalty) or neither")
    if kl_coef != 0.0 and logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs logprobs and ref_logprobs")
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must have shape (B, T), got {tuple(response_mask.shape)}")
    m = response_mask.bool()
    empty = ~m.any(-1)
    if bool(empty.any()):
        raise ValueError(
            f"response_mask row {int(empty.nonzero()[0])} has no valid token: there is nowhere to put its score"
        )
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    zero = torch.zeros((), dtype=dtype, device=scores.device)
    if logprobs is not None:
        for name, t in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
            if t.shape != response_mask.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, response_mask has {tuple(response_mask.shape)}")
        kl = torch.where(m, kl_k1(logprobs.detach(), ref_logprobs.detach()).to(dtype), zero)
    else:
        kl = torch.zeros(response_mask.shape, dtype=dtype, device=scores.device)
    rewards = -kl_coef * kl
    last = last_token_index(response_mask)
    rewards = rewards.scatter_add(1, last[:, None], scores.detach().to(dtype)[:, None])
    return torch.where(m, rewards, zero), kl


# ------------------------------------------------------------------ process rewards: a reward at the end of each step
@dataclass
class StepRewards:
    """Rewards inside replies (process rewards), B replies of R tokens: ``values`` (B, R) float, the reward of the step
    that ends at each token (0 elsewhere), ``ends`` (B, R) bool, True at the tokens that end a step, and ``totals``
    (B,) their sums per reply, as the reward function scores the replies (None: not computed)."""

    values: torch.Tensor
    ends: torch.Tensor
    totals: torch.Tensor | None = None  # (B,) each reply's summed step rewards, what calling the reward returns


def char_end_tokens(tokenizer, ids: Sequence[int], char_ends: Sequence[int], stop_ids: Sequence[int] = ()) -> list[int]:
    """The column of the token in which each character offset ends, for a reply's token ids -> one column per offset.

    Offsets count characters of the reply as the rollout decodes it (stop tokens left out, leading
    whitespace stripped: :func:`rlhf_book.rollout.decode_responses`); offset c ends in the first
    token whose decoded prefix reaches c characters, found by bisection (prefix lengths grow, but for a
    multi-byte character decoded in part), so a
    reply of R tokens costs O(log R) decodes per offset, not R. An offset past the text lands on the last
    kept token.
    """
    stop = set(stop_ids)
    cols = [j for j, i in enumerate(ids) if i not in stop]
    if not cols:
        return [max(len(ids) - 1, 0)] * len(char_ends)
    kept = [ids[j] for j in cols]
    full = tokenizer.decode(kept, skip_special_tokens=True)
    lead = len(full) - len(full.lstrip())
    lengths: dict[int, int] = {len(kept) - 1: len(full)}

    def length(t: int) -> int:  # characters decoded from the first t + 1 kept tokens
        if t not in lengths:
            lengths[t] = len(tokenizer.decode(kept[: t + 1], skip_special_tokens=True))
        return lengths[t]

    out = []
    for c in char_ends:
        lo, hi = 0, len(kept) - 1  # the first t with length(t) >= c + lead, else the last token
        while lo < hi:
            mid = (lo + hi) // 2
            if length(mid) >= c + lead:
                hi = mid
            else:
                lo = mid + 1
        t = lo
        out.append(cols[t])
    return out


class StepReward:
    """A process reward: ``steps(prompt, response, terminated) -> [(char_end, reward), ...]``, one pair per step.

    Called as a reward function ``(prompts, responses, terminated) -> (B,)`` it returns each reply's
    summed step rewards, so it works wherever a reward does (and is logged as one); an on-policy
    trainer sees that it is a ``StepReward`` and places each step's reward on the token that ends the
    step (:meth:`token_rewards`) instead of the whole sum on the last token: GAE then credits each
    step, and ``CriticFreeConfig(advantage="process")`` normalises the step rewards within a group
    (:func:`rlhf_book.advantage.process_advantages`). ``char_end`` is a character offset into the
    response text as the reward sees it. A step that ends where the reply ends (``char_end =
    len(response)``, e.g. the final answer's) goes on the reply's last token, its EOS when it ended, as an
    outcome reward does: whether the answer counts can depend on the reply stopping there, so the reward must
    come after that decision, not before it (on the answer's last digit, the choice to stop would get no credit).
    """

    def __init__(self, steps: Callable, name: str | None = None):
        if not callable(steps):
            raise ValueError(f"steps must be a function (prompt, response, terminated) -> [(char_end, reward), ...], "
                             f"got {steps!r}")
        self.steps_fn = steps
        self.__name__ = name or f"{_fn_name(steps)}_process_reward"

    def spans(self, prompts, responses, terminated=None) -> list[list[tuple[int, float]]]:
        """``[(char_end, reward), ...]`` of each reply, checked: offsets in 0..len(reply), rewards finite numbers."""
        if len(prompts) != len(responses):
            raise ValueError(f"{self.__name__}: {len(prompts)} prompts but {len(responses)} responses")
        ended = terminated_flags(terminated, len(responses))
        if len(ended) != len(responses):
            raise ValueError(f"{self.__name__}: {len(ended)} terminated flags for {len(responses)} responses")
        out = []
        for i, (p, r, t) in enumerate(zip(prompts, responses, ended)):
            steps = [(c, v) for c, v in self.steps_fn(p, r, t)]
            for c, v in steps:
                if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= len(r):
                    raise ValueError(f"{self.__name__}: row {i}: a step's end must be a character offset in "
                                     f"0..{len(r)}, got {c!r}")
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                    raise ValueError(f"{self.__name__}: row {i}: a step's reward must be a finite number, got {v!r}")
            out.append([(c, float(v)) for c, v in steps])
        return out

    def __call__(self, prompts, responses, terminated=None) -> torch.Tensor:
        return self._totals(self.spans(prompts, responses, terminated))

    def _totals(self, spans: list) -> torch.Tensor:
        """Each reply's summed step rewards, (B,) float32 (:func:`check_scores`)."""
        return check_scores([sum(v for _, v in row) for row in spans], len(spans), self.__name__)

    def token_rewards(self, rollout, tokenizer, stop_ids: Sequence[int] | None = None) -> StepRewards:
        """Each step's reward on the token that ends it: (B, R) :class:`StepRewards` of ``rollout`` (its texts), with
        the replies' totals (so a trainer need not call the reward a second time for its scores). ``stop_ids``: the
        ids that end a reply (:func:`rlhf_book.rollout.stop_token_ids` of the policy; None: the tokenizer's EOS)."""
        from .rollout import stop_token_ids

        stop = stop_token_ids(None, tokenizer) if stop_ids is None else list(stop_ids)  # None: the tokenizer's EOS
        mask = rollout.response_mask.bool()
        values = torch.zeros(mask.shape, dtype=torch.float32)
        ends = torch.zeros(mask.shape, dtype=torch.bool)
        spans = self.spans(rollout.prompts, rollout.responses, rollout.terminated)
        for b, (row, ids, m, text) in enumerate(zip(spans, rollout.response_ids.tolist(), mask.tolist(),
                                                    rollout.responses)):
            if not row:
                continue
            valid = [i for i, k in zip(ids, m) if k]
            cols = char_end_tokens(tokenizer, valid, [c for c, _ in row], stop)
            for col, (c, v) in zip(cols, row):
                col = len(valid) - 1 if c >= len(text) else col  # a step that ends with the reply: on its last token
                values[b, col] += v
                ends[b, col] = True
        dev = rollout.response_mask.device
        return StepRewards(values.to(dev), ends.to(dev), self._totals(spans).to(dev))
