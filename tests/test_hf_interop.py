"""Saved models behave the same in plain transformers as in the library (tokenizer settings, scores, log-probs)."""

import json

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_book.preferences import load_preferences
from rlhf_book.reward_model import reward_scores
from rlhf_book.rollout import generate, response_logprobs
from rlhf_book.tokenizer import format_prompt

PROMPTS = ["Review the film Night Train.", "Tell me about the food at Maple House.", "How was the hotel?"]
REPLIES = ["The food was great.", "It was our first time. The music was reliable, but the ending was stale.", "Fine."]


def test_saved_tokenizers_describe_themselves(tiny_artifacts):
    for kind, side in (("base", "left"), ("rm", "right")):
        d = tiny_artifacts[kind]
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        # a class name transformers 4.x loads too (5.x writes "TokenizersBackend", which 4.x does not know)
        assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast", kind
        assert not {"is_local", "local_files_only"} & set(cfg), kind
        tok = AutoTokenizer.from_pretrained(d)
        n_positions = json.loads((d / "config.json").read_text())["n_positions"]
        assert tok.padding_side == side and tok.model_max_length == n_positions, kind
        assert tok.pad_token_id != tok.eos_token_id
        assert not (d / "tokenizer").exists(), kind  # no training-time leftovers
        card = (d / "README.md").read_text()  # the model card names no temporary build folder
        assert "from_pretrained(path)" in card and ".partial" not in card, kind


def test_truncation_and_context_checks_use_the_saved_context(tiny_artifacts, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_artifacts["base"])
    assert len(tok("word " * 200, truncation=True)["input_ids"]) == tok.model_max_length
    # load_preferences with the tokenizer alone now checks the context window
    long = {"prompt": "Review " + "the film " * 60 + "Night Train.", "chosen": "Good.", "rejected": "Bad."}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(long) + "\n")
    with pytest.raises(ValueError, match=r"line 1: field 'prompt' is \d+ tokens, too long for the context window"):
        load_preferences(path, tokenizer=tok)


def test_plain_reward_model_gives_the_librarys_scores(tiny_artifacts):
    d = tiny_artifacts["rm"]
    tok = AutoTokenizer.from_pretrained(d)
    rm = AutoModelForSequenceClassification.from_pretrained(d).eval()
    texts = [format_prompt(p) + r + tok.eos_token for p, r in zip(PROMPTS, REPLIES)]
    enc = tok(texts, padding=True, return_tensors="pt")  # the saved side (right); lengths differ, so padding is used
    assert int((enc["attention_mask"] == 0).sum()) > 0
    with torch.no_grad():
        raw = rm(**enc).logits[:, 0]
    torch.testing.assert_close(raw, reward_scores(rm, tok, PROMPTS, REPLIES, normalize=False), atol=1e-5, rtol=1e-5)
    normalised = rm.config.reward_gain * raw + rm.config.reward_bias  # the documented custom fields
    torch.testing.assert_close(normalised, reward_scores(rm, tok, PROMPTS, REPLIES), atol=1e-5, rtol=1e-5)


def test_plain_generate_gives_the_librarys_tokens_and_logprobs(tiny_artifacts):
    d = tiny_artifacts["base"]
    tok = AutoTokenizer.from_pretrained(d)
    lm = AutoModelForCausalLM.from_pretrained(d).eval()
    enc = tok([format_prompt(p) for p in PROMPTS], padding=True, return_tensors="pt")  # left padding, as saved
    assert int((enc["attention_mask"][:, 0] == 0).sum()) > 0
    with torch.no_grad():
        out = lm.generate(**enc, do_sample=False, max_new_tokens=12, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ro = generate(lm, tok, PROMPTS, max_new_tokens=12, greedy=True)
    R = ro.response_ids.size(1)
    hf_ids = out.sequences[:, enc["input_ids"].size(1):][:, :R]
    m = ro.response_mask.bool()
    assert torch.equal(hf_ids[m], ro.response_ids[m])
    hf_lp = torch.stack(out.logits[:R], 1).float().log_softmax(-1).gather(-1, hf_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(hf_lp[m], ro.logprobs[m], atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and the library's teacher-forced forward agrees with both
        tf = response_logprobs(lm, ro)
    torch.testing.assert_close(tf[m], ro.logprobs[m], atol=1e-4, rtol=1e-4)


def test_generation_past_the_context_is_a_clear_error(tiny_world):
    model, tok = tiny_world
    ctx = model.config.n_positions
    with pytest.raises(ValueError, match=f"max_new_tokens={ctx} leaves no room for a prompt.*context of {ctx}"):
        generate(model, tok, PROMPTS, max_new_tokens=ctx)
    with pytest.raises(ValueError, match="longer than the"):
        generate(model, tok, ["Review " + "the film " * 60 + "Night Train."], max_new_tokens=8)


def test_sampling_uses_the_current_cache_argument(tiny_world):
    """transformers 5.24 deprecates ``past_key_values`` (gone in 5.40): sampling must not rely on it."""
    import warnings

    from rlhf_book.rollout import cache_kwarg

    model, tok = tiny_world
    params = __import__("inspect").signature(type(model).forward).parameters
    assert cache_kwarg(model) == ("cache" if "cache" in params else "past_key_values")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning about the old name would fail here
        ro = generate(model, tok, PROMPTS, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert ro.response_ids.size(1) >= 1
