import pytest
import torch

from rlhf_book.rollout import Rollout, encode_prompts, forward_logits, generate, position_ids_from_mask, response_logprobs, sequence_logprob

PROMPTS = ["Review Luigi's.", "How was your trip to the old town?", "Tell me about the book The Long Road."]


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forced_logprobs(tiny_world, temperature):
    """The off-by-one test: log-probs recorded while sampling == one teacher-forced pass."""
    model, tok = tiny_world
    r = generate(model, tok, PROMPTS, max_new_tokens=20, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert r.prompt_mask[:, 0].tolist() != [1, 1, 1], "prompts of different lengths: left padding is exercised"
    with torch.no_grad():
        lp = response_logprobs(model, r, temperature)
    torch.testing.assert_close(lp, r.logprobs, atol=1e-5, rtol=1e-5)
    # the classic bug: slicing the logits without the shift gives different numbers
    P = r.prompt_ids.size(1)
    with torch.no_grad():
        unshifted = torch.log_softmax(forward_logits(model, r.input_ids, r.attention_mask)[:, P:] / temperature, -1)
    wrong = unshifted.gather(-1, r.response_ids[..., None]).squeeze(-1)
    m = r.response_mask.bool()
    assert (wrong[m] - r.logprobs[m]).abs().max() > 1e-2


def test_extra_padding_changes_no_logprob(tiny_world):
    model, tok = tiny_world
    r = generate(model, tok, PROMPTS, max_new_tokens=16, generator=torch.Generator().manual_seed(1))
    k = 5
    pad_left = lambda x, v: torch.cat([torch.full((x.size(0), k), v, dtype=x.dtype), x], 1)
    pad_right = lambda x, v: torch.cat([x, torch.full((x.size(0), k), v, dtype=x.dtype)], 1)
    with torch.no_grad():
        base = response_logprobs(model, r)
        more = response_logprobs(model, Rollout(
            pad_left(r.prompt_ids, tok.pad_token_id), pad_left(r.prompt_mask, 0),
            pad_right(r.response_ids, tok.pad_token_id), pad_right(r.response_mask, 0),
        ))
    torch.testing.assert_close(more[:, : base.size(1)], base, atol=1e-5, rtol=1e-5)
    assert more[:, base.size(1):].abs().sum() == 0
    torch.testing.assert_close(sequence_logprob(more, pad_right(r.response_mask, 0)), sequence_logprob(base, r.response_mask))


def test_forward_without_position_ids_is_wrong_under_left_padding(tiny_world):
    """Why every scoring pass derives positions from the mask."""
    model, tok = tiny_world
    ids, mask = encode_prompts(tok, PROMPTS)
    with torch.no_grad():
        good = forward_logits(model, ids, mask)
        naive = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1][mask[:1].bool()][None]).logits
    m = mask.bool()
    assert (good[0][m[0]] - alone[0]).abs().max() < 1e-4
    assert (naive[0][m[0]] - alone[0]).abs().max() > 1e-3


def test_stops_at_eos_and_pads_after(tiny_world):
    model, tok = tiny_world
    r = generate(model, tok, PROMPTS * 4, max_new_tokens=30, generator=torch.Generator().manual_seed(2))
    for ids, m, lp, done in zip(r.response_ids, r.response_mask, r.logprobs, r.terminated):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any(), "mask is a prefix"
        assert (ids[n:] == tok.pad_token_id).all() and (lp[n:] == 0).all()
        assert bool(done) == bool(ids[n - 1] == tok.eos_token_id)
        assert (ids[: n - 1] != tok.eos_token_id).all()


def test_sampling_is_reproducible_with_a_generator(tiny_world):
    model, tok = tiny_world
    a = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(5))
    b = generate(model, tok, PROMPTS, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.response_ids, b.response_ids) and a.responses == b.responses


def test_bad_inputs_raise_clear_errors(tiny_world):
    model, tok = tiny_world
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, tok, [])
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty string"):
        generate(model, tok, ["Review Luigi's.", "   "])
    with pytest.raises(ValueError, match="longer than the .* allowed"):
        generate(model, tok, ["Review Luigi's. " * 40], max_new_tokens=8)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, PROMPTS, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, PROMPTS, max_new_tokens=0)


def test_samples_per_prompt_shares_the_prefill_and_equals_repeated_prompts(tiny_world):
    """K samples of each prompt from one prefill: the same rollout as the prompts repeated K times."""
    model, tok = tiny_world
    prompts = ["Review the film Night Train.", "Tell me about the coffee maker.", "Hi"]
    K = 3
    shared = generate(model, tok, prompts, 10, generator=torch.Generator().manual_seed(5), samples_per_prompt=K)
    repeated = generate(model, tok, [p for p in prompts for _ in range(K)], 10, generator=torch.Generator().manual_seed(5))
    assert shared.prompts == repeated.prompts and shared.responses == repeated.responses
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "terminated"):
        assert torch.equal(getattr(shared, name), getattr(repeated, name)), name
    torch.testing.assert_close(shared.logprobs, repeated.logprobs)
    torch.testing.assert_close(response_logprobs(model, shared), shared.logprobs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="samples_per_prompt must be an integer >= 1"):
        generate(model, tok, prompts, 4, samples_per_prompt=0)


def test_repeat_cache_of_the_legacy_tuple_format():
    from rlhf_book.rollout import _repeat_cache

    k, v = torch.arange(2.0)[:, None, None, None].expand(2, 1, 3, 4), torch.ones(2, 1, 3, 4)
    (k2, v2), = _repeat_cache(((k, v),), 3)
    assert k2.shape == (6, 1, 3, 4) and k2[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1] and torch.equal(v2, torch.ones(6, 1, 3, 4))
    with pytest.raises(TypeError, match="cannot repeat a KV cache"):
        _repeat_cache(object(), 2)
