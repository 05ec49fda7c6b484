"""The sampling engine: how :func:`rlhf_book.rollout.generate` turns prompts into tokens and log pi_old.

Every sampler of the library (the trainers' rollouts, best-of-n, pass@k, preference
generation, evaluation) goes through :func:`rlhf_book.rollout.generate_from_ids`, which asks
:func:`decode` for the tokens. Two engines, one contract (the same arguments, the same four
tensors back):

* ``"plain"``: the reference loop. transformers' ``DynamicCache`` grows by one column per
  step (``torch.cat`` of every layer's keys and values), the attention mask grows with it, and
  the model builds its mask from the 2-D one each step.
* ``"static"`` (the default): a preallocated KV cache of B rows x L = P + max_new_tokens
  slots (transformers' ``StaticCache``), filled by the same prefill as the plain loop (one per
  prompt, repeated K times for a group, see ``samples_per_prompt``), then one token per step
  written in place. The mask is a (B, L) buffer written one column a step; the model gets it as
  a ready 4-D mask (boolean for SDPA, additive for eager attention), so it builds none. Finished
  rows stay in the batch (their token is PAD and their mask column 0: nothing is reallocated).
  The per-step work (the forward of one token, the temperature, the sampling, the log-prob of
  the sampled token, the stop test) is one function, :func:`decode_step`, that
  ``torch.compile`` takes whole (``compile=True``; ``mode="reduce-overhead"``, CUDA graphs, on a
  GPU: written, not run here, as no GPU was at hand). Sampling draws the same random numbers as
  ``torch.multinomial`` (its one-sample path is ``argmax(p / q)`` with ``q ~ Exp(1)`` drawn from
  the generator; done here in the open, so a compiled step needs no generator), so both engines
  sample the same tokens from the same logits.

Numerics. Uncompiled, each layer of the static cache returns a view of the slots written so far
(:class:`ViewLayer`), so attention runs over exactly the keys the plain loop holds, in the same
order: the two engines give the same tokens and log-probs bit for bit (tests/test_engine.py on five
architectures; the book's tiny GPT-2 and the benchmark's, checked against the plain loop). Compiled, the step needs
static shapes, so attention runs over all L slots (L rounded up to a multiple of 64, so prompts
of different lengths share one compiled step) with the unwritten and padded ones masked to
weight 0; a matrix product over a longer reduction may round the last bit differently (about
1e-6 on log-probs of GPT-2; the tokens stayed the same in every check). Either way the recorded
log pi_old is log softmax(logits / tau) in fp32 of the logits the sampler computed, equal to the
teacher-forced :func:`rlhf_book.rollout.response_logprobs` up to float rounding (1e-5 in fp32 on
GPT-2, Llama, Qwen2/3 and GPT-NeoX). Speed: ``benchmarks/results/cpu_decode.md``.

A model the static engine cannot drive (a legacy tuple cache, sliding-window or other
non-full attention layers, an attention implementation other than SDPA or eager, cross
attention, a transformers without ``StaticCache``) takes the plain loop, with the reason
logged once per model class and reason.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SAMPLING_ENGINES", "Decoded", "decode", "decode_step", "static_engine_unsupported", "default_engine",
           "set_default_engine", "static_cache_len"]

logger = logging.getLogger(__name__)

SAMPLING_ENGINES = ("plain", "static")
_default = {"engine": os.environ.get("RLHF_BOOK_SAMPLING_ENGINE", "static"), "compile": False}
_warned: set = set()
_compiled: dict = {}
_kept: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (key, StaticCache) when compiled


def default_engine() -> str:
    """The engine :func:`rlhf_book.rollout.generate` uses when none is named: ``"static"`` unless
    :func:`set_default_engine` (or the ``RLHF_BOOK_SAMPLING_ENGINE`` environment variable) says otherwise."""
    return _check_engine(_default["engine"])


def set_default_engine(engine: str, compile: bool | None = None) -> None:
    """Make ``engine`` ("plain" or "static") the process default; ``compile``: compile the static step by default."""
    _default["engine"] = _check_engine(engine)
    if compile is not None:
        _default["compile"] = bool(compile)


def _check_engine(engine) -> str:
    if engine not in SAMPLING_ENGINES:
        raise ValueError(f"sampling engine must be one of {list(SAMPLING_ENGINES)}, got {engine!r}")
    return engine


@dataclass
class Decoded:
    """What a decode returns: tokens (B, n) (PAD after a stop), log pi of each (B, n) (0 after a stop), alive (B, n)
    (1 where the token was generated, the stop token included), finished (B,) (ended with a stop token); the logits
    and cache of the prompts are repeated K times, so B is the prompts' rows times K. ``engine``: the engine that
    ran."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    alive: torch.Tensor
    finished: torch.Tensor
    engine: str


def _log_once(model, reason: str) -> None:
    key = (type(model).__name__, reason)
    if key not in _warned:
        _warned.add(key)
        logger.warning("sampling: the plain engine for %s (the static one cannot drive it: %s)", key[0], reason)


def static_engine_unsupported(model) -> str | None:
    """Why the static engine cannot drive ``model`` (a string), or None if it can."""
    try:
        return _unsupported(model)
    except Exception as e:  # an unusual model: say why, sample with the plain loop
        return f"{type(e).__name__}: {e}"


def _unsupported(model) -> str | None:
    from .rollout import _causal_lm

    lm = _causal_lm(model)
    cfg = getattr(lm, "config", None)
    if cfg is None:
        return f"{type(lm).__name__} has no config"
    try:
        from transformers import StaticCache  # noqa: F401
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return "this transformers has no StaticCache"
    if not hasattr(StaticLayer, "lazy_initialization") \
            or not hasattr(StaticLayer(max_cache_len=1), "cumulative_length"):
        return ("this transformers' StaticLayer has no lazy_initialization / cumulative_length "
                "(transformers >= 5 needed)")
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (the engine builds SDPA and eager masks only)"
    if getattr(cfg, "add_cross_attention", False) or getattr(cfg, "is_encoder_decoder", False):
        return "cross attention"
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)} (only full attention layers)"
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) \
            and getattr(text, "layer_types", None) is None:
        return "a sliding attention window"
    return None


def static_cache_len(prompt_len: int, max_new_tokens: int, context: int | None, compile: bool) -> int:
    """Slots of the static cache: P + max_new_tokens; compiled, rounded up to a multiple of 64 (within the context)
    so that prompts of different lengths share one compiled step instead of recompiling it."""
    n = prompt_len + max_new_tokens
    if compile:
        n = -(-n // 64) * 64
        if context is not None:
            n = max(prompt_len + max_new_tokens, min(n, context))
    return n


def _four_d(mask2d: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 0/1 -> the (B, 1, 1, L) mask transformers' ``sdpa`` (boolean) or ``eager`` (0 / dtype min) attention
    takes."""
    m = mask2d[:, None, None, :].bool()
    if impl == "eager":
        return torch.where(m, torch.zeros((), dtype=dtype, device=m.device),
                           torch.full((), torch.finfo(dtype).min, dtype=dtype, device=m.device))
    return m


def sample_token(logits: torch.Tensor, temperature: float, greedy: bool, noise: torch.Tensor | None):
    """log softmax(logits / tau) in fp32 (B, V) and the token: the argmax (greedy) or argmax(p / noise), which with
    ``noise`` ~ Exp(1) drawn by ``torch.empty_like(p).exponential_(1, generator=g)`` is
    ``torch.multinomial(p, 1, g)``."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    tok = logp.argmax(-1) if greedy else (logp.exp() / noise).argmax(-1)
    return logp, tok


def _record(logp, tok, finished, stop_t, pad: int):
    """PAD for finished rows, the token's log-prob (0 if finished), the new finished flags."""
    tok = torch.where(finished, torch.full_like(tok, pad), tok)
    lp = logp.gather(-1, tok[:, None]).squeeze(-1)
    lp = torch.where(finished, torch.zeros_like(lp), lp)
    return tok, lp, finished | torch.isin(tok, stop_t)


def decode_step(model, cache_name: str, cache, tok, pos, mask2d, noise, finished, stop_t, pad: int,
                temperature: float, greedy: bool, impl: str, dtype: torch.dtype):
    """One decode step, whole: forward ``tok`` (B,) at positions ``pos`` (B,) through the static ``cache`` under the
    (B, L) ``mask2d``, then sample the next token -> (token, its log-prob, finished). What ``torch.compile`` takes.

    ``mask2d`` may be the first n columns of the mask only, for a cache of :class:`ViewLayer` (which returns its
    first n slots) — the uncompiled engine's way to compute exactly what the plain loop computes."""
    out = model(input_ids=tok[:, None], attention_mask=_four_d(mask2d, impl, dtype), position_ids=pos[:, None],
                use_cache=True, **{cache_name: cache})
    logp, nxt = sample_token(out.logits[:, -1], temperature, greedy, noise)
    return _record(logp, nxt, finished, stop_t, pad)


def _step_fn(compile: bool, mode: str | None):
    if not compile:
        return decode_step
    key = mode or "default"
    if key not in _compiled:
        _compiled[key] = torch.compile(decode_step, mode=mode, dynamic=False)
    return _compiled[key]


def _view_layer_class():
    from transformers.cache_utils import StaticLayer

    class ViewLayer(StaticLayer):
        """A StaticLayer whose ``update`` returns the slots written so far (a view, no copy) instead of all of them:
        the attention then runs over exactly the keys the plain loop's DynamicCache holds, in the same order, so its
        floats are the same; nothing is reallocated (the DynamicCache concatenates every layer every step)."""

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self.length += key_states.shape[-2]
            return keys[:, :, : self.length], values[:, :, : self.length]

    return ViewLayer


def _static_cache(model, lm, rows: int, length: int, keep: bool, view: bool):
    """A StaticCache of ``length`` slots for ``lm`` (kept on ``model`` for the next call when ``keep``: compiled
    steps, CUDA graphs above all, want the same buffers every call); ``view``: of :class:`ViewLayer` layers."""
    from transformers import StaticCache

    key = (rows, length)
    if view:
        cache = StaticCache(config=lm.config, max_cache_len=length)
        layer = _view_layer_class()
        cache.layers = [layer(max_cache_len=length) for _ in cache.layers]
        return cache
    if keep:
        try:
            old = _kept.get(model)
        except TypeError:
            old = None
        if old is not None and old[0] == key:
            return old[1]
    cache = StaticCache(config=lm.config, max_cache_len=length)
    if keep:
        try:
            _kept[model] = (key, cache)
        except TypeError:
            pass
    return cache


def _fill(static, dynamic, k: int, prompt_len: int) -> None:
    """Copy the prefill's DynamicCache (B rows, P slots) into the static one's first P slots, each row k times."""
    layers = getattr(dynamic, "layers", None)
    if layers is None or len(layers) != len(static.layers):
        raise TypeError(f"a prefill cache of type {type(dynamic).__name__} without matching layers")
    for src, dst in zip(layers, static.layers):
        keys, values = src.keys, src.values
        if k > 1:
            keys, values = keys.repeat_interleave(k, dim=0), values.repeat_interleave(k, dim=0)
        if not dst.is_initialized or dst.keys.shape[0] != keys.shape[0] or dst.keys.dtype != keys.dtype:
            dst.is_initialized = False
            dst.lazy_initialization(keys, values)
        dst.keys[:, :, :prompt_len].copy_(keys)
        dst.values[:, :, :prompt_len].copy_(values)
        dst.cumulative_length.fill_(prompt_len)
        dst.length = prompt_len


@torch.no_grad()
def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, temperature: float,
           greedy: bool, generator: torch.Generator | None, stop: list[int], pad: int, samples_per_prompt: int = 1,
           engine: str | None = None, compile: bool | None = None, compile_mode: str | None = None,
           views: bool | None = None, _on_prefill=None) -> Decoded:
    """Sample up to ``max_new_tokens`` tokens for the left-padded prompts (B, P), K = ``samples_per_prompt`` per prompt.

    ``engine``: "plain" or "static" (None: :func:`default_engine`); a model the static engine
    cannot drive falls back to "plain" (logged once). ``compile`` (None: the default set by
    :func:`set_default_engine`, off): ``torch.compile`` the static engine's step; ``compile_mode``
    e.g. "reduce-overhead" (CUDA graphs; None: "reduce-overhead" on CUDA, the default mode
    elsewhere). The model is called as it is (a PEFT, DDP or compiled wrapper included) and must
    be in eval mode. ``views`` (None: uncompiled only): attend over views of the slots written so far (the
    plain loop's numbers) rather than over all slots, masked (what a compiled step must do).
    ``_on_prefill(cache, P)``: a test hook, called after the static cache is filled.
    """
    from .rollout import _causal_lm, _context_size, _step_with_cache, logits_to_keep_kwargs, position_ids_from_mask

    engine = default_engine() if engine is None else _check_engine(engine)
    compile = _default["compile"] if compile is None else bool(compile)
    views = not compile if views is None else bool(views)
    if views and compile:
        raise ValueError("views=True needs compile=False: a compiled step needs static shapes")
    K = samples_per_prompt
    device = prompt_ids.device
    stop_t = torch.tensor(stop, dtype=torch.long, device=device)
    lm = _causal_lm(model)
    if engine == "static":
        reason = static_engine_unsupported(model)
        if reason is not None:
            _log_once(lm, reason)
            engine = "plain"

    logits, past = _step_with_cache(model, None, input_ids=prompt_ids, attention_mask=prompt_mask,
                                    position_ids=position_ids_from_mask(prompt_mask), **logits_to_keep_kwargs(model, 1))
    if engine == "static":
        P = prompt_ids.size(1)
        L = static_cache_len(P, max_new_tokens, _context_size(lm), compile)
        try:
            cache = _static_cache(model, lm, prompt_ids.size(0) * K, L, keep=compile, view=views)
            _fill(cache, past, K, P)
        except (TypeError, AttributeError, RuntimeError) as e:
            _log_once(lm, f"{type(e).__name__}: {e}")
            engine = "plain"
    if engine == "plain":
        return _plain(model, past, logits, prompt_mask, max_new_tokens, temperature, greedy, generator, stop_t, pad, K)
    del past
    state = _rng_state(generator, device)
    try:
        if _on_prefill is not None:
            _on_prefill(cache, P)
        return _static(model, lm, cache, P, L, logits, prompt_mask, max_new_tokens, temperature, greedy, generator,
                       stop_t, pad, K, compile, compile_mode, views)
    except Exception as e:  # noqa: BLE001  (e.g. a model whose forward rejects a 4-D mask, a compiler missing)
        _log_once(lm, f"the static decode failed ({type(e).__name__}: {str(e)[:200]}); the random stream is rewound")
        _set_rng_state(generator, device, state)
        return decode(model, prompt_ids, prompt_mask, max_new_tokens, temperature,
                      greedy, generator, stop, pad, K, engine="plain")


def _rng_state(generator, device):
    if generator is not None:
        return generator.get_state()
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(generator, device, state) -> None:
    if generator is not None:
        generator.set_state(state)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _static(model, lm, cache, P, L, logits, prompt_mask, max_new_tokens, temperature, greedy, generator, stop_t, pad,
            K, compile, compile_mode, views) -> Decoded:
    """The static engine's loop, after the prefill has filled ``cache``'s first P slots (see :func:`decode`)."""
    from .rollout import cache_kwarg

    device = logits.device
    if K > 1:
        logits, prompt_mask = logits.repeat_interleave(K, dim=0), prompt_mask.repeat_interleave(K, dim=0)
    B = logits.size(0)
    mask2d = torch.zeros(B, L, dtype=torch.long, device=device)
    mask2d[:, :P] = prompt_mask
    pos = prompt_mask.long().sum(-1) - 1  # the last prompt token's position; the next token's is one more
    impl = lm.config._attn_implementation
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    dtype = emb.weight.dtype if emb is not None else next(lm.parameters()).dtype  # what the model's own masks use
    name = cache_kwarg(model)
    mode = compile_mode if compile_mode is not None else ("reduce-overhead" if device.type == "cuda" else None)
    step = _step_fn(compile, mode)
    check_every = 1 if device.type == "cpu" else 8  # a host sync is free on a CPU, a stall on a GPU

    def noise_like(x):
        return None if greedy else torch.empty_like(x, dtype=torch.float32).exponential_(1, generator=generator)

    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logp, tok = sample_token(logits, temperature, greedy, noise_like(logits))
    alive = [~finished]
    tok, lp, finished = _record(logp, tok, finished, stop_t, pad)
    tokens, logps = [tok], [lp]
    V = logits.size(-1)
    for t in range(1, max_new_tokens):
        if (t % check_every == 0) and bool(finished.all()):
            break
        mask2d[:, P + t - 1] = alive[-1].long()
        pos = pos + alive[-1].long()
        noise = None if greedy else \
            torch.empty(B, V, dtype=torch.float32, device=device).exponential_(1, generator=generator)
        was = finished
        seen = mask2d[:, : P + t] if views else mask2d  # else every slot, masked (static shapes)
        tok, lp, finished = step(model, name, cache, tok, pos.clamp(min=0), seen, noise, finished, stop_t, pad,
                                 float(temperature), bool(greedy), impl, dtype)
        if compile:  # a compiled (CUDA-graphed) step may reuse its output buffers on the next call
            tok, lp, finished = tok.clone(), lp.clone(), finished.clone()
        alive.append(~was)
        tokens.append(tok)
        logps.append(lp)
    return Decoded(torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(alive, 1).long(), finished, "static")


def _plain(model, past, logits, prompt_mask, max_new_tokens, temperature, greedy, generator, stop_t, pad, K) -> Decoded:
    """The reference loop (a DynamicCache grown one column a step): the library's sampler before the engine."""
    from .rollout import _repeat_cache, _step_with_cache

    device = logits.device
    mask = prompt_mask
    if K > 1:  # one prefill per prompt, K copies of its cache
        logits, past = logits.repeat_interleave(K, dim=0), _repeat_cache(past, K)
        mask = prompt_mask.repeat_interleave(K, dim=0)
    B = logits.size(0)
    check_every = 1 if device.type == "cpu" else 8  # a host sync is free on a CPU, a stall on a GPU
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps, alive = [], [], []
    for t in range(max_new_tokens):
        logp = F.log_softmax(logits.float() / temperature, dim=-1)
        if greedy:
            tok = logp.argmax(-1)
        else:
            tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        lp = logp.gather(-1, tok[:, None]).squeeze(-1)
        alive.append(~finished)
        logps.append(torch.where(finished, torch.zeros_like(lp), lp))
        tokens.append(tok)
        finished = finished | torch.isin(tok, stop_t)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(finished.all())):
            break
        mask = torch.cat([mask, alive[-1].long()[:, None]], dim=1)
        pos = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        logits, past = _step_with_cache(model, past, input_ids=tok[:, None], attention_mask=mask, position_ids=pos)
    return Decoded(torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(alive, 1).long(), finished, "plain")
