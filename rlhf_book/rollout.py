"""Rollouts: the policy (an LM) acting in the world, and the log-probs of what it did.

RL view: the state s_t is the prompt plus the tokens generated so far, the action
a_t is the next token, and pi_theta(a_t | s_t) is the LM's softmax. ``generate``
samples actions with a KV cache and records log pi(a_t | s_t) as it goes;
``response_logprobs`` recomputes the same numbers in one teacher-forced forward
pass (what every trainer does later). Two details make them agree:

* position ids come from the attention mask. Prompts are left-padded, so the
  first real token of a short prompt sits at column 3, say, yet must get
  position 0. A plain ``model(input_ids, attention_mask)`` does not do that for
  GPT-2 and its logits are then wrong (off by up to 1.35 here).
* logits at column t predict the token at column t + 1 (the off-by-one).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .advantage import masked_sum
from .engine import decode
from .rewards import check_scores, terminated_flags
from .runtime import intra_op_threads
from .tokenizer import check_prompt, format_prompts, prompt_add_special_tokens

__all__ = [
    "Rollout", "generate", "generate_from_ids", "response_logprobs", "sequence_logprob", "token_logprobs",
    "position_ids_from_mask", "forward_logits", "logits_to_keep_kwargs", "encode_prompts", "decode_responses", "prompt_texts", "score_rollout",
    "stop_token_ids", "teacher_forcing_batch", "teacher_forced", "logprob_chunk_rows", "LOGPROB_CHUNK_VALUES",
    "in_row_batches", "cat_rollouts",
]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, 2, ... counted over real tokens only; (B, T) -> (B, T), pads get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_type: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):
        return False


# under torch.compile: read once while tracing, not traced; it must wrap the cached function, not decorate it (Dynamo
# still traces through an lru_cache under assume_constant_result and warns, tests/test_speed.py checks)
@torch.compiler.assume_constant_result
def _takes_logits_to_keep(model_type: type) -> bool:
    return _forward_takes_logits_to_keep(model_type)


def logits_to_keep_kwargs(model, n: int) -> dict:
    """``{"logits_to_keep": n}`` if ``model``'s forward takes it (transformers' causal LMs do), else ``{}``.

    The LM head then runs on the last ``n`` columns only: the prompt's columns predict
    prompt tokens, which no RL loss needs (with a 50k vocabulary the full logits of
    64 x 512 tokens are 6.6 GB in fp32). A DDP wrapper passes it on to its module.
    """
    return {"logits_to_keep": n} if n > 0 and _takes_logits_to_keep(type(_signature_owner(model))) else {}


def _signature_owner(model):
    """The module whose forward signature says what ``model`` takes: inside torch.compile, DDP and ``peft.PeftModel``
    wrappers (whose ``forward(**kwargs)`` passes ``logits_to_keep`` and the cache on but hides their names)."""
    from .adapters import is_peft_model

    if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's wrapper
        model = model._orig_mod
    model = unwrap(model)
    while is_peft_model(model):
        model = model.get_base_model()
    return model


def unwrap(model):
    """The module inside a DDP wrapper (``.module``), else ``model`` itself."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_type: type) -> str:
    try:
        params = inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier).

    transformers 5.24 renamed the argument and the output field (the old name goes in
    5.40); looking the name up in the signature keeps old and new releases working. A
    wrapper with an ``lm`` attribute (:class:`~rlhf_book.critic.PolicyWithValueHead`) uses its LM's name, and
    a ``peft.PeftModel`` its base model's (:func:`rlhf_book.adapters.hf_model`).
    """
    from .adapters import hf_model

    return _cache_kwarg_of(type(hf_model(model)))


def output_cache(out, name: str):
    """The KV cache a forward returned, read under ``name`` (see :func:`cache_kwarg`); None if there is none."""
    return getattr(out, "cache", None) if name == "cache" else getattr(out, "past_key_values", None)


def _step_with_cache(model, past, **inputs):
    """One forward that takes and returns the KV cache -> (logits of the last column (B, V), cache)."""
    name = cache_kwarg(model)
    if past is not None:
        inputs[name] = past
    out = model(**inputs, use_cache=True)
    return out.logits[:, -1], output_cache(out, name)


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits (B, T, V) of a padded batch, with position ids derived from the mask; (B, n, V) for the last n = ``logits_to_keep``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                **logits_to_keep_kwargs(model, logits_to_keep))
    return out.logits[:, -logits_to_keep:] if logits_to_keep > 0 else out.logits


@dataclass
class Rollout:
    """A batch of sampled responses. B = batch, P = padded prompt length, R = response length.

    prompt_ids (B, P) left-padded; prompt_mask (B, P); response_ids (B, R), PAD after EOS;
    response_mask (B, R) is 1 on generated tokens including the EOS; logprobs (B, R) are
    log pi(a_t | s_t) under the sampling temperature, 0 where the mask is 0;
    terminated (B,) says whether the response ended with EOS (any of the model's
    :func:`stop_token_ids`); ``prompts`` are the prompts as the caller gave them (strings, or
    lists of ``{"role", "content"}`` messages): what a reward function receives. Only the four id/mask
    tensors are needed to re-score a batch, so ``Rollout(prompt_ids, prompt_mask,
    response_ids, response_mask)`` is a valid (teacher-forcing) batch too.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None = None
    terminated: torch.Tensor | None = None
    prompts: list | None = None
    responses: list[str] | None = None
    temperature: float = 1.0

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and response side by side, (B, P + R)."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """1 on every real token of prompt and response, (B, P + R)."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        """Number of generated tokens (EOS included) per response, (B,)."""
        return self.response_mask.sum(-1)

    def select(self, rows: Sequence[int] | torch.Tensor) -> "Rollout":
        """The rows ``rows`` (row numbers: a list or a LongTensor) as a Rollout of their own; columns are kept."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Rollout(
            self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx],
            pick(self.logprobs), pick(self.terminated),
            None if self.prompts is None else [self.prompts[i] for i in rows],
            None if self.responses is None else [self.responses[i] for i in rows], self.temperature,
        )

    def __len__(self) -> int:
        return self.prompt_ids.size(0)


def cat_rollouts(rollouts: Sequence[Rollout], pad_id: int = 0) -> Rollout:
    """The rows of ``rollouts``, one after another, as one Rollout: prompts left-padded and responses right-padded
    (ids with ``pad_id``, masks and log-probs with 0) to the widest; (B_1, ...), (B_2, ...) -> (B_1 + B_2 + ..., ...).

    The rollouts must share their temperature; an optional field (log-probs, flags, texts) is kept only when every
    rollout has it. Padding changes no real token's log-prob (positions come from the mask), up to float rounding.
    """
    rollouts = list(rollouts)
    if not rollouts:
        raise ValueError("cat_rollouts needs at least one rollout")
    if len({r.temperature for r in rollouts}) > 1:
        raise ValueError(f"cannot concatenate rollouts sampled at different temperatures "
                         f"{sorted({r.temperature for r in rollouts})}")
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_ids.size(1) for r in rollouts)
    R = max(r.response_ids.size(1) for r in rollouts)

    def cat(name: str, width: int | None = None, value=0, left: bool = False):
        ts = [getattr(r, name) for r in rollouts]
        if any(t is None for t in ts):
            return None
        if width is not None:
            pads = [torch.full((t.size(0), width - t.size(1)), value, dtype=t.dtype, device=t.device) for t in ts]
            ts = [torch.cat([p, t] if left else [t, p], 1) for p, t in zip(pads, ts)]
        return torch.cat(ts)

    texts = lambda name: None if any(getattr(r, name) is None for r in rollouts) else [  # noqa: E731
        x for r in rollouts for x in getattr(r, name)]
    return Rollout(cat("prompt_ids", P, pad_id, True), cat("prompt_mask", P, 0, True), cat("response_ids", R, pad_id),
                   cat("response_mask", R), cat("logprobs", R), cat("terminated"), texts("prompts"), texts("responses"),
                   rollouts[0].temperature)


def encode_prompts(tokenizer, prompts: Sequence, device=None, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, (B, P), of the formatted prompts (strings or messages, see
    :func:`rlhf_book.tokenizer.format_prompt`); ValueError naming ``prompts[i]`` on an empty list or a bad prompt."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    prompts = [check_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(format_prompts(prompts, tokenizer), padding=True, return_tensors="pt",
                        add_special_tokens=prompt_add_special_tokens(tokenizer))
    finally:
        tokenizer.padding_side = side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if max_length is not None and ids.size(1) > max_length:
        longest = int(mask.sum(-1).argmax())
        raise ValueError(f"prompt {longest} has {int(mask[longest].sum())} tokens, longer than the {max_length} allowed")
    return ids.to(device), mask.to(device)


def _context_size(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    threads: int | None = None,
    samples_per_prompt: int = 1,
    engine: str | None = None,
    compile: bool | None = None,
) -> Rollout:
    """Sample ``samples_per_prompt`` responses per prompt (KV cache, stop at EOS) and record log pi(a_t | s_t).

    ``prompts``: strings, lists of ``{"role", "content"}`` messages, or ``{"prompt": ...}`` records
    (:func:`prompt_texts`); a reply ends at any of :func:`stop_token_ids` (the tokenizer's EOS and
    the model's ``generation_config.eos_token_id``).

    Sampling uses softmax(logits / temperature); ``greedy`` takes the argmax instead.
    ``generator`` (a torch.Generator on the model's device) makes sampling reproducible.
    ``threads``: CPU intra-op threads while sampling (None: the process setting; see
    :func:`rlhf_book.runtime.intra_op_threads`). Raises ValueError for an empty prompt
    list, an empty prompt, or a prompt that leaves no room for ``max_new_tokens`` in
    the model's context. With K = ``samples_per_prompt`` > 1 the rollout has B * K rows, rows
    i*K .. i*K + K - 1 answering prompt i (a GRPO/RLOO group), and each prompt is encoded and
    prefilled once (see :func:`generate_from_ids`). ``engine`` / ``compile``: the sampling engine
    (:mod:`rlhf_book.engine`; None: its default, the static KV cache, uncompiled).
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got one string: wrap a single prompt in a list, [prompt]")
    prompts = prompt_texts(prompts)
    _check_sampling(max_new_tokens, temperature)
    device = next(model.parameters()).device
    ctx = _context_size(model)
    if ctx is not None and max_new_tokens >= ctx:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of {ctx} "
                         f"tokens: use at most {ctx - 2}")
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device, None if ctx is None else ctx - max_new_tokens)
    return generate_from_ids(
        model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, temperature, greedy, generator, prompts, threads,
        samples_per_prompt, engine, compile,
    )


def _repeat_cache(past, k: int):
    """The KV cache of B prompts as the cache of B * k rows, each prompt's row repeated k times in a row."""
    if hasattr(past, "batch_repeat_interleave"):  # transformers' Cache classes (in place)
        past.batch_repeat_interleave(k)
        return past
    if isinstance(past, (tuple, list)):  # the legacy format: per layer (key, value), batch first
        return type(past)(tuple(t.repeat_interleave(k, dim=0) for t in layer) for layer in past)
    raise TypeError(f"cannot repeat a KV cache of type {type(past).__name__} for samples_per_prompt > 1")


@torch.no_grad()
def generate_from_ids(
    model,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    prompts: Sequence[str] | None = None,
    threads: int | None = None,
    samples_per_prompt: int = 1,
    engine: str | None = None,
    compile: bool | None = None,
) -> Rollout:
    """:func:`generate` for already-tokenized, left-padded prompts (B, P); ``prompts`` is their text (decoded if None).

    ``samples_per_prompt`` = K > 1: the prompts are prefilled once and the KV cache, the
    last logits and the mask are repeated K times (``repeat_interleave``), so a group of K
    samples shares its prompt's forward; the sampling, and the rollout of B * K rows, are
    those of the prompts repeated K times (up to float rounding of the prefill).

    On a GPU the loop asks "has every response ended?" only every 8 tokens: the answer
    is a device-to-host copy that stalls the queue of kernels. Columns sampled after
    the last EOS are PAD and are cut off, so the rollout is the same as checking every token.

    ``engine``: the sampling engine, "static" (a preallocated KV cache) or "plain" (the reference loop);
    both give the same tokens and log-probs, bit for bit (None: :func:`rlhf_book.engine.default_engine`,
    "static"). ``compile``: ``torch.compile`` the static engine's decode step (None: the engine's
    default, off). See :mod:`rlhf_book.engine`.
    """
    _check_sampling(max_new_tokens, temperature)
    K = samples_per_prompt
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"samples_per_prompt must be an integer >= 1, got {K!r}")
    ctx = _context_size(model)
    if ctx is not None and prompt_ids.size(1) + max_new_tokens > ctx:
        raise ValueError(f"{prompt_ids.size(1)} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's context of {ctx}")
    pad = tokenizer.pad_token_id
    stop = stop_token_ids(model, tokenizer)
    device = prompt_ids.device
    was_training = model.training
    model.eval()
    try:
        with intra_op_threads(threads if device.type == "cpu" else None):
            out = decode(model, prompt_ids, prompt_mask, max_new_tokens, temperature, greedy, generator, stop, pad, K,
                         engine=engine, compile=compile)
    finally:
        if was_training:
            model.train()
    if K > 1:
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(K, dim=0), prompt_mask.repeat_interleave(K, dim=0)
        if prompts is not None:
            prompts = [p for p in prompts for _ in range(K)]
    finished, logps = out.finished, out.logprobs
    R = int(out.alive.any(0).nonzero().max()) + 1  # drop columns sampled after every response ended
    response_ids, response_mask = out.tokens[:, :R], out.alive[:, :R]
    texts = decode_responses(tokenizer, response_ids, response_mask, stop)
    if prompts is None:
        prompts = [tokenizer.decode(p[m.bool()], skip_special_tokens=True) for p, m in zip(prompt_ids, prompt_mask)]
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
        logprobs=logps[:, :R], terminated=finished, prompts=list(prompts), responses=texts, temperature=temperature,
    )


@torch.no_grad()
def sample_groups(model, tokenizer, texts: Sequence[str], n: int, score_fn, *, max_new_tokens: int = 40,
                  temperature: float = 1.0, seed: int = 0, batch_size: int = 256,
                  threads: int | None = 1) -> list[tuple[Rollout, torch.Tensor]]:
    """n replies to each prompt (adjacent rows), scored by ``score_fn``; -> [(rollout, scores (rows,) on the CPU)].

    In eval mode, with a generator of its own seeded with ``seed``; at most ``batch_size``
    replies (but at least one prompt's n) per :func:`generate` call, each prompt prefilled
    once. What best-of-n and pass@k both start from.
    """
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    per_call = max(1, batch_size // n)
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), per_call):
            ro = generate(model, tokenizer, list(texts[start : start + per_call]), max_new_tokens, temperature,
                          generator=g, threads=threads, samples_per_prompt=n)
            out.append((ro, score_rollout(score_fn, ro, "cpu")))
    finally:
        model.train(was_training)
    return out


def _check_sampling(max_new_tokens, temperature) -> None:
    """ValueError unless max_new_tokens is an integer >= 1 and temperature a finite number > 0."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 (use greedy=True for argmax), got {temperature!r}")


def prompt_texts(prompts: Sequence) -> list:
    """The prompts of strings, message lists or ``{"prompt": ...}`` records (as :func:`rlhf_book.corpus.prompt_split` gives).

    A prompt is a string or a list of ``{"role", "content"}`` messages (TRL's conversational
    format, see :func:`rlhf_book.tokenizer.format_prompt`), bare or in a record's ``prompt``
    field; they come back as given (messages as a list of dicts). ValueError naming
    ``prompts[i]`` (and the message and field) for a record without ``prompt`` or an empty or
    malformed prompt.
    """
    if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of strings or {{'prompt': ...}} records, got {type(prompts).__name__}"
                         + (": wrap a single prompt in a list, [prompt]" if isinstance(prompts, str) else ""))
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Mapping):
            if "prompt" not in p:
                hint = (": a prompt made of messages is a list of them, so pass [messages] (a list of such lists)"
                        if "role" in p and "content" in p else "")
                raise ValueError(f"prompts[{i}]: missing field 'prompt' in {dict(p)!r}{hint}")
            p = p["prompt"]
        out.append(check_prompt(p, f"prompts[{i}]"))
    return out


def score_rollout(reward_fn, rollout: "Rollout", device=None, name: str = "reward_fn") -> torch.Tensor:
    """``reward_fn(prompts, responses, terminated)`` of a rollout as a finite float tensor (B,) on ``device``.

    Checked by :func:`rlhf_book.rewards.check_scores`: a NaN, an infinity, a string, None or a
    wrong count raises a ValueError naming ``name``, the function, the row and the value.
    """
    out = reward_fn(rollout.prompts, rollout.responses, rollout.terminated)
    return check_scores(out, len(rollout), name, reward_fn,
                        device if device is not None else rollout.response_ids.device)


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor,
                     stop_ids: Sequence[int] | None = None) -> list[str]:
    """Text of each response (B, R) without PAD and stop tokens (``stop_ids``, default the tokenizer's EOS), stripped."""
    stop = {tokenizer.eos_token_id} if stop_ids is None else set(stop_ids)
    out = []
    for ids, m in zip(response_ids.tolist(), response_mask.tolist()):
        out.append(tokenizer.decode([i for i, k in zip(ids, m) if k and i not in stop], skip_special_tokens=True).strip())
    return out


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a reply: the tokenizer's EOS first, then the model's ``generation_config.eos_token_id`` (an
    int or a list, as Llama 3 and Qwen chat checkpoints list their end-of-turn tokens), without repeats.

    The one place the library asks "has this reply ended?": sampling stops at any of them, a
    reply that ends with one is ``terminated``, and decoding strips them all.
    """
    ids = [tokenizer.eos_token_id]
    m = unwrap(model)
    m = getattr(m, "lm", m)  # a PolicyWithValueHead: its LM's
    extra = getattr(getattr(m, "generation_config", None), "eos_token_id", None)
    ids += list(extra) if isinstance(extra, (list, tuple)) else [extra]
    out = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    if not out:
        raise ValueError("the tokenizer has no EOS token (eos_token_id is None) and the model's generation_config "
                         "lists none: set tokenizer.eos_token")
    return out


def teacher_forcing_batch(tokenizer, prompts: Sequence, replies: Sequence[str], terminated: Sequence[bool] | None = None,
                          device=None, eos_ids: Sequence[int | None] | None = None) -> Rollout:
    """Prompts (formatted, left-padded by :func:`encode_prompts`) and their given replies (right-padded, + EOS where
    ``terminated``, default all) as one :class:`Rollout` to teacher-force: the tokens the policy would have produced.

    ``eos_ids`` (optional, one per reply): the end id a reply ended with (None: the tokenizer's
    EOS). DPO's pairs, SFT's completions and their evaluation all go through it.
    """
    ended = terminated_flags(terminated, len(replies))
    if not (len(prompts) == len(replies) == len(ended)):
        raise ValueError(f"{len(prompts)} prompts, {len(replies)} replies and {len(ended)} terminated flags")
    eos_ids = [None] * len(replies) if eos_ids is None else list(eos_ids)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    ids = tokenizer(list(replies), add_special_tokens=False)["input_ids"]
    ids = [r + [tokenizer.eos_token_id if e is None else int(e)] if t else r for r, t, e in zip(ids, ended, eos_ids)]
    width = max(1, max(map(len, ids)))
    response_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, r in enumerate(ids):
        response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, : len(r)] = 1
    dev = prompt_ids.device
    return Rollout(prompt_ids, prompt_mask, response_ids.to(dev), response_mask.to(dev),
                   terminated=torch.tensor(ended, device=dev), prompts=list(prompts), responses=list(replies))


def sequence_logprob(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) = sum_t log pi(a_t | s_t) over real response tokens; (B, R) -> (B,)."""
    return masked_sum(token_logprobs, mask, dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / tau) (tau: ``temperature``) at ``tokens``: logits (B, R, V), tokens (B, R) -> (B, R)."""
    return F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def response_logprobs(model, rollout: Rollout, temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """Teacher-forced log pi(a_t | s_t) of each response token of ``rollout``, (B, R); 0 where response_mask is 0.

    The logits at column P - 1 + t (last prompt token, then each response token)
    predict response token t: that is the ``[:, P - 1 : -1]`` slice, i.e. the last
    R + 1 columns but the very last (only those go through the LM head).
    ``chunk_size``: rows per LM-head chunk (:func:`teacher_forced`; None: automatic).
    """
    return teacher_forced(model, rollout, temperature, chunk_size)[0]


# ------------------------------------------------------------------ bounded memory: the LM head in row chunks
def in_row_batches(fn, rollout: Rollout, batch_size: int | None = None) -> torch.Tensor:
    """``fn(rows)`` on ``rollout``'s rows ``batch_size`` at a time (None: all at once), concatenated: (B, ...).

    What ``forward_batch_size`` does to every forward of the experience step: its memory is
    that of ``batch_size`` rows, its numbers those of the whole batch (columns are kept, so each
    row sees the same padding).
    """
    B = len(rollout)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    if batch_size is None or batch_size >= B:
        return fn(rollout)
    return torch.cat([fn(rollout.select(range(a, min(a + batch_size, B)))) for a in range(0, B, batch_size)])



LOGPROB_CHUNK_VALUES = 2**25  # automatic chunks: at most this many fp32 logits (128 MiB) per chunk of rows


def logprob_chunk_rows(columns: int, vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows per LM-head chunk: ``chunk_size`` if given, else the most rows whose fp32 logits (rows x ``columns`` x
    ``vocab_size``) stay within :data:`LOGPROB_CHUNK_VALUES` (at least 1).

    The book's model (a 1k vocabulary, 40-token replies) fits a whole batch in one chunk; a 152k
    vocabulary at 128 tokens gets 1 row per chunk (19M logits a row).
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be None or an integer >= 1 (rows per chunk), got {chunk_size!r}")
        return chunk_size
    return max(1, LOGPROB_CHUNK_VALUES // max(1, columns * vocab_size))


def _causal_lm(model):
    """The transformers causal LM inside ``model``'s wrappers: torch.compile, DDP, an adapter-disabled reference,
    a :class:`~rlhf_book.critic.PolicyWithValueHead` (its ``lm``) and a ``peft.PeftModel``."""
    from .adapters import AdapterDisabledReference, hf_model

    for _ in range(6):
        inner = getattr(model, "_orig_mod", None)  # torch.compile's wrapper
        if isinstance(inner, torch.nn.Module):
            model = inner
        elif isinstance(model, AdapterDisabledReference):
            model = model.policy
        else:
            nxt = hf_model(model)
            if nxt is model:
                break
            model = nxt
    return model


def _logit_scaling(config):
    """What a causal LM does to ``lm_head(h)`` before returning its logits, from its config (None: nothing):
    Gemma 2/3's final soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``."""
    cap = getattr(config, "final_logit_softcapping", None)
    kind = str(getattr(config, "model_type", ""))
    scale = getattr(config, "logit_scale", None) if kind.startswith("cohere") else None
    divide = getattr(config, "logits_scaling", None) if kind.startswith("granite") else None
    if not (cap or scale or divide):
        return None

    def apply(z: torch.Tensor) -> torch.Tensor:
        if scale:
            z = z * scale
        if divide:
            z = z / divide
        if cap:
            z = torch.tanh(z / cap) * cap
        return z
    return apply


def _lm_head_parts(model):
    """(trunk, LM head, logit scaling or None) of ``model``'s causal LM for the chunked path, or a string: why not."""
    lm = _causal_lm(model)
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Module):
        return f"{type(lm).__name__} has no get_output_embeddings() module"
    body = getattr(lm, "base_model", None)
    if not isinstance(body, torch.nn.Module) or body is lm:
        return f"{type(lm).__name__} has no separate trunk (base_model)"
    if not logits_to_keep_kwargs(model, 1):
        return f"{type(lm).__name__}.forward takes no logits_to_keep"
    return body, head, _logit_scaling(lm.config)


def _last_hidden(output) -> torch.Tensor:
    """The trunk's last hidden state (B, T, H) from its output (a ModelOutput or a tuple)."""
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if isinstance(hidden, torch.Tensor) else output[0]


def _head_chunk(head, scaling, temperature: float, entropy: str | None, hidden: torch.Tensor, tokens: torch.Tensor):
    """One chunk of rows: hidden (c, R + 1, H), tokens (c, R) -> log pi (c, R) and entropy (c, R) (or None).

    The same operations as the one-pass path (LM head on the last R + 1 columns, drop the last,
    fp32, / tau, log_softmax), so each row's numbers are those of the whole batch.
    """
    from .losses import entropy_from_logits

    logits = head(hidden)
    if scaling is not None:
        logits = scaling(logits)
    z = logits[:, :-1].float() / temperature
    lp = token_logprobs(z, tokens)
    if entropy is None:
        return lp, None
    with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
        return lp, entropy_from_logits(z)


def _warn_full(reason: str) -> None:
    import warnings

    warnings.warn(f"log-probs: the whole batch's logits at once (no LM-head chunks): {reason}", stacklevel=3)


def teacher_forced(model, rollout: Rollout, temperature: float = 1.0, chunk_size: int | None = None,
                   entropy: str | None = None):
    """One teacher-forced forward -> (log pi(a_t | s_t) (B, R), entropy (B, R) or None, the forward's output); masked 0.

    ``entropy``: None (not computed), "grad" (in the graph, for an entropy bonus) or "no_grad"
    (logged only). Memory: with rows per chunk (:func:`logprob_chunk_rows` of ``chunk_size``)
    below B, the forward asks for the logits of one column only, a hook keeps the trunk's last
    hidden state, and the LM head, ``logsumexp`` and gather run on one chunk of rows at a time,
    under activation checkpointing when gradients flow: no (B, R, V) fp32 tensor is ever held,
    only (rows, R, V). The numbers are those of the one-pass path (the same operations per
    row). A model the chunks cannot read (no ``get_output_embeddings``, no trunk, no
    ``logits_to_keep``, or a head whose last-column logits differ from the model's own) takes
    the one-pass path with a warning. The output then has ``logits`` of the last column only.
    """
    R = rollout.response_ids.size(1)
    ids, mask = rollout.input_ids, rollout.attention_mask
    pos = position_ids_from_mask(mask)
    m = rollout.response_mask.bool()
    lm = _causal_lm(model)
    vocab = int(getattr(lm.config, "vocab_size", 0) or 0) if hasattr(lm, "config") else 0
    rows = logprob_chunk_rows(R + 1, vocab, chunk_size)
    parts = _lm_head_parts(model) if rows < ids.size(0) else None
    if isinstance(parts, str):
        _warn_full(parts)
        parts = None
    out = None
    if parts is not None:
        body, head, scaling = parts
        kept = []
        handle = body.register_forward_hook(lambda module, args, output: kept.append(_last_hidden(output)))
        try:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **logits_to_keep_kwargs(model, 1))
        finally:
            handle.remove()
        hidden = kept[-1][:, -(R + 1):]
        with torch.no_grad():  # the head read as the model reads it (else e.g. a LoRA'd head under disable_adapter)
            own = head(hidden[:, -1:])
            own = (scaling(own) if scaling is not None else own).float()
            theirs = out.logits[:, -1:].float()
            ok = own.shape == theirs.shape and torch.allclose(own, theirs, rtol=1e-3, atol=1e-3)
        if not ok:
            _warn_full(f"{type(lm).__name__}'s logits are not its get_output_embeddings() of the trunk's last hidden state")
            out = None
    if out is None:  # one pass: the whole batch's logits
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **logits_to_keep_kwargs(model, R + 1))
        lp, ent = _head_chunk(lambda x: x, None, temperature, entropy, out.logits[:, -(R + 1):], rollout.response_ids)
    else:
        use_checkpoint = torch.is_grad_enabled() and (
            hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
        lps, ents = [], []
        for a in range(0, ids.size(0), rows):
            args = (head, scaling, temperature, entropy, hidden[a : a + rows], rollout.response_ids[a : a + rows])
            if use_checkpoint:
                lp, ent = torch.utils.checkpoint.checkpoint(_head_chunk, *args, use_reentrant=False)
            else:
                lp, ent = _head_chunk(*args)
            lps.append(lp)
            ents.append(ent)
        lp = torch.cat(lps)
        ent = None if entropy is None else torch.cat(ents)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return torch.where(m, lp, zero), (None if ent is None else torch.where(m, ent, zero)), out
