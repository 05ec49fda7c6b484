"""The sampling engine (rlhf_book.engine): the static KV cache against the plain loop and teacher forcing."""

import logging

import pytest
import torch

from rlhf_book import engine as E
from rlhf_book.rollout import encode_prompts, generate, response_logprobs, stop_token_ids
from rlhf_book.testing import save_tiny_model


def _static_layers_available() -> bool:
    """Whether this transformers has the StaticCache layers the engine drives (5.x; not the 4.53 floor)."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return False
    return hasattr(StaticLayer, "lazy_initialization")


# where the engine cannot run (it falls back to the plain loop, which the other tests cover), these have nothing to test
needs_static = pytest.mark.skipif(not _static_layers_available(),
                                  reason="this transformers has no StaticCache layers for the static engine")

ARCHS = ["gpt2", "llama", "qwen2", "qwen3", "gpt_neox"]
PROMPTS = ["Hi", "Tell me a story about a cat.", "What is two plus two, and why?", "ok"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """arch -> (model in eval mode, tokenizer), fp32, with a chat tokenizer and two end ids."""
    import rlhf_book

    out = {}
    for arch in ARCHS:
        d = save_tiny_model(tmp_path_factory.mktemp(arch), arch)
        model, tok = rlhf_book.load_base_model(str(d), device="cpu", progress=False)  # adds a PAD token, pads left
        out[arch] = (model.eval(), tok)
    return out


def _eos_heavy(model, tok, boost: float = 1.5, only: int | None = None):
    """Make the end ids (or the one ``only``) likely by a bias on the LM head, so responses end at different lengths."""
    stop = stop_token_ids(model, tok)
    assert len(stop) >= 2, "several end ids"
    head = model.get_output_embeddings()
    if head.bias is None:
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias.zero_()
        head.bias[stop if only is None else [only]] = boost
    return stop


def _same(a, b) -> None:
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.terminated, b.terminated)
    assert torch.equal(a.logprobs, b.logprobs), float((a.logprobs - b.logprobs).abs().max())
    assert a.responses == b.responses


@pytest.mark.parametrize("arch", ARCHS)
def test_static_engine_logprobs_are_teacher_forced_and_plain_bit_for_bit(tiny_models, arch):
    model, tok = tiny_models[arch]
    stop = _eos_heavy(model, tok)
    flags = set()
    try:
        for k, temperature in ((1, 1.0), (3, 0.7)):
            kw = dict(max_new_tokens=12, temperature=temperature, samples_per_prompt=k)
            r = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(3), engine="static", **kw)
            assert r.prompt_mask[:, 0].sum() < len(r), "left padding is exercised"
            ends = set(r.response_ids[r.terminated, r.response_mask.sum(-1)[r.terminated] - 1].tolist())
            assert ends <= set(stop)
            flags |= set(r.terminated.tolist())
            with torch.no_grad():
                lp = response_logprobs(model, r, temperature)
            torch.testing.assert_close(lp, r.logprobs, atol=1e-5, rtol=1e-5)
            plain = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(3), engine="plain", **kw)
            _same(r, plain)
        assert flags == {True, False}, "rows that end with a stop id and rows cut off at max_new_tokens"
    finally:
        model.get_output_embeddings().bias = None


def test_every_stop_id_ends_a_response(tiny_models):
    """Either end id ends a response (the second, ``<|endoftext|>``, made likely on its own), in both engines alike."""
    for arch in ("llama", "qwen3"):
        model, tok = tiny_models[arch]
        for end in stop_token_ids(model, tok):
            _eos_heavy(model, tok, boost=3.0, only=end)
            try:
                r = generate(model, tok, PROMPTS, 8, generator=torch.Generator().manual_seed(0), engine="static")
                n = r.response_mask.sum(-1)
                assert r.terminated.any() and set(r.response_ids[r.terminated, n[r.terminated] - 1].tolist()) == {end}
                _same(r, generate(model, tok, PROMPTS, 8, generator=torch.Generator().manual_seed(0), engine="plain"))
            finally:
                model.get_output_embeddings().bias = None


def test_engine_is_the_default_and_matches_the_book_model(tiny_world):
    """The book's tiny GPT-2: the default engine (static) gives the plain loop's rollout bit for bit."""
    model, tok = tiny_world
    assert E.default_engine() == "static"
    prompts = ["Review Luigi's.", "How was your trip to the old town?", "Tell me about the book The Long Road."]
    for greedy in (False, True):
        a = generate(model, tok, prompts, 24, generator=torch.Generator().manual_seed(0), greedy=greedy)
        b = generate(model, tok, prompts, 24, generator=torch.Generator().manual_seed(0), greedy=greedy, engine="plain")
        _same(a, b)


def test_sampling_trick_is_multinomial():
    """argmax(p / q), q ~ Exp(1) from the generator, is torch.multinomial(p, 1) on the same generator."""
    p = torch.softmax(torch.randn(8, 300), -1)
    for s in range(5):
        a = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(s)).squeeze(-1)
        q = torch.empty_like(p).exponential_(1, generator=torch.Generator().manual_seed(s))
        assert torch.equal(a, (p / q).argmax(-1))


@pytest.mark.parametrize("views", [True, False])
def test_static_cache_reads_nothing_past_a_rows_length(tiny_models, views):
    """Slots after the prompt (not yet written) and the prompts' left-pad slots poisoned with huge values: nothing
    changes, so no row reads a slot it has not written or a pad (views=False: attention over every slot, masked)."""
    model, tok = tiny_models["llama"]
    ids, mask = encode_prompts(tok, PROMPTS)
    stop, pad = stop_token_ids(model, tok), tok.pad_token_id

    def poison(cache, P):
        rows = mask.repeat_interleave(2, 0).bool()  # K = 2 samples per prompt
        for layer in cache.layers:
            bad = torch.ones(rows.size(0), layer.keys.size(2), dtype=torch.bool)
            bad[:, :P] = ~rows  # the left pads, and every slot after the prompt
            for buf in (layer.keys, layer.values):
                buf.masked_fill_(bad[:, None, :, None], 1e4)

    def run(hook):
        return E.decode(model, ids, mask, 10, 1.0, False, torch.Generator().manual_seed(0), stop, pad, 2,
                        engine="static", views=views, _on_prefill=hook)

    clean, dirty = run(None), run(poison)
    assert torch.equal(clean.tokens, dirty.tokens)
    assert torch.equal(clean.logprobs, dirty.logprobs)
    assert dirty.logprobs.isfinite().all()


@needs_static
def test_full_length_attention_keeps_the_tokens(tiny_models):
    """The compiled layout (every slot, masked) without compiling: the same tokens; log-probs within float rounding."""
    model, tok = tiny_models["gpt2"]
    ids, mask = encode_prompts(tok, PROMPTS)
    stop, pad = stop_token_ids(model, tok), tok.pad_token_id
    a = E.decode(model, ids, mask, 12, 1.0, False, torch.Generator().manual_seed(1), stop, pad, engine="plain")
    b = E.decode(model, ids, mask, 12, 1.0, False, torch.Generator().manual_seed(1), stop, pad, engine="static",
                 views=False)
    assert b.engine == "static" and torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


@needs_static
def test_unsupported_model_falls_back_to_plain_with_a_logged_reason(tiny_models, caplog, monkeypatch):
    model, tok = tiny_models["qwen3"]
    old = list(model.config.layer_types)
    model.config.layer_types = ["sliding_attention"] + old[1:]
    try:
        assert "layer types" in E.static_engine_unsupported(model)
    finally:
        model.config.layer_types = old
    assert E.static_engine_unsupported(model) is None
    monkeypatch.setattr(E, "_unsupported", lambda m: "a reason of the test's")
    ids, mask = encode_prompts(tok, PROMPTS)
    args = (model, ids, mask, 6, 1.0, False)
    rest = (stop_token_ids(model, tok), tok.pad_token_id)
    with caplog.at_level(logging.WARNING, logger="rlhf_book.engine"):
        out = E.decode(*args, torch.Generator().manual_seed(0), *rest, engine="static")
        E.decode(*args, torch.Generator().manual_seed(0), *rest, engine="static")
    assert out.engine == "plain"
    assert caplog.text.count("a reason of the test's") == 1, "logged once"
    ref = E.decode(*args, torch.Generator().manual_seed(0), *rest, engine="plain")
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.logprobs, ref.logprobs)


@needs_static
def test_a_failing_static_decode_falls_back_on_the_same_random_stream(tiny_models, caplog, monkeypatch):
    """A model whose forward rejects what the static engine passes: logged once, then the plain loop from the same
    random numbers (the generator is rewound), so the rollout is what the plain engine gives."""
    model, tok = tiny_models["gpt2"]
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("no 4-D masks here")

    monkeypatch.setattr(E, "decode_step", broken)
    kw = dict(max_new_tokens=6, samples_per_prompt=2)
    with caplog.at_level(logging.WARNING, logger="rlhf_book.engine"):
        a = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(4), engine="static", **kw)
    assert calls and "no 4-D masks here" in caplog.text
    _same(a, generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(4), engine="plain", **kw))


def test_peft_model_uses_the_static_engine(tiny_models):
    peft = pytest.importorskip("peft")
    model, tok = tiny_models["llama"]
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, cfg)
    try:
        ids, mask = encode_prompts(tok, PROMPTS)
        args = (ids, mask, 8, 1.0, False)
        stop = stop_token_ids(lora, tok)
        a = E.decode(lora, *args, torch.Generator().manual_seed(0), stop, tok.pad_token_id, engine="static")
        b = E.decode(lora, *args, torch.Generator().manual_seed(0), stop, tok.pad_token_id, engine="plain")
        assert a.engine == "static"
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    finally:
        lora.unload()


def test_bad_engine_name():
    with pytest.raises(ValueError, match="sampling engine"):
        E.set_default_engine("fast")


@pytest.mark.slow
def test_compiled_step_gives_the_same_tokens(tiny_models):
    """torch.compile of the decode step (inductor on CPU; ~30-60 s to compile): same tokens as uncompiled."""
    model, tok = tiny_models["gpt2"]
    kw = dict(max_new_tokens=10, samples_per_prompt=2)
    a = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(5), engine="static", **kw)
    b = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(5), engine="static", compile=True, **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
