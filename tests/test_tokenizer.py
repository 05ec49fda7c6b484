import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_book.base_model import PRESETS, artifact_name, encode_examples
from rlhf_book.corpus import generate_examples
from rlhf_book.reward_model import encode_replies
from rlhf_book.tokenizer import (
    EOS,
    PAD,
    SEP,
    default_prompt_format,
    encode_prompt_response,
    format_prompt,
    prompt_format_tag,
    set_prompt_format,
    train_tokenizer,
)


def _tok():
    ex = generate_examples(3000, seed=0)
    return train_tokenizer((format_prompt(e.prompt) + e.response for e in ex), vocab_size=600)


def test_round_trip_and_special_tokens(tmp_path):
    tok = _tok()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.pad_token == PAD and tok.eos_token == EOS
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= 600
    for e in generate_examples(200, seed=5):
        text = format_prompt(e.prompt) + e.response
        assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok("The soup was lovely.")["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "The soup was lovely."
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("The soup was lovely.")["input_ids"] == ids[:-1]
    assert again.pad_token_id == tok.pad_token_id and again.eos_token_id == tok.eos_token_id


def test_left_padding_for_generation():
    tok = _tok()
    enc = tok(["Review Luigi's.", "How was your trip to the lake?"], padding=True)
    assert enc["input_ids"][0][0] == tok.pad_token_id and enc["attention_mask"][0][0] == 0


# ------------------------------------------------------------------- the prompt format
CHAT = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


@pytest.fixture
def restore_prompt_format():
    """Whatever a test sets with set_prompt_format is undone afterwards."""
    previous = set_prompt_format(None)
    set_prompt_format(previous)
    yield
    set_prompt_format(previous)


def test_plain_tokenizer_gets_the_separator():
    tok = _tok()
    assert format_prompt("Review Luigi's.") == format_prompt("Review Luigi's.", tok) == "Review Luigi's." + SEP
    assert SEP == "\n"
    assert default_prompt_format("x", tok) == "x\n" and prompt_format_tag() is None


def test_chat_template_tokenizer_gets_its_template():
    pytest.importorskip("jinja2")
    tok = _tok()
    tok.chat_template = CHAT
    assert format_prompt("Review Luigi's.", tok) == "<u>Review Luigi's.</u><a>"
    ids = encode_prompt_response(tok, ["Review Luigi's."], ["The food was great."])[0]
    reply = tok("The food was great.")["input_ids"]
    assert ids == tok("<u>Review Luigi's.</u><a>", add_special_tokens=False)["input_ids"] + reply + [tok.eos_token_id]
    assert format_prompt("Review Luigi's.") == "Review Luigi's.\n"  # no tokenizer: the plain format


def test_set_prompt_format_changes_every_encoding_and_is_restored(restore_prompt_format):
    tok = _tok()
    rec = {"prompt": "Review Luigi's.", "response": "The food was great."}
    plain_lm = encode_examples(tok, [rec])
    plain_rm = encode_replies(tok, [rec["prompt"]], [rec["response"]])
    assert plain_lm == plain_rm
    seen = []

    def question(prompt, tokenizer):
        seen.append(tokenizer)
        return f"Q: {prompt}\nA:"

    assert set_prompt_format(question) is None  # the default was in effect
    try:
        assert format_prompt("hi", tok) == "Q: hi\nA:" and seen == [tok]
        want = tok("Q: Review Luigi's.\nA:")["input_ids"] + tok("The food was great.")["input_ids"] + [tok.eos_token_id]
        assert encode_examples(tok, [rec]) == [want]
        assert encode_replies(tok, [rec["prompt"]], [rec["response"]]) == [want]
        assert encode_replies(tok, [rec["prompt"]], [rec["response"]], [False]) == [want[:-1]]
        assert prompt_format_tag() == "Q: <prompt>\nA:"  # custom formats get their own cache keys
        set_prompt_format(lambda p, t: 3)
        with pytest.raises(ValueError, match="must return a string, got int"):
            format_prompt("hi")
    finally:
        assert set_prompt_format(None) is not None
    assert encode_examples(tok, [rec]) == plain_lm and prompt_format_tag() is None
    with pytest.raises(ValueError, match="set_prompt_format: fn must be a function"):
        set_prompt_format("Q: {prompt}")


def test_a_custom_prompt_format_gets_its_own_base_model_key(restore_prompt_format):
    book = artifact_name("tiny", PRESETS["tiny"])
    set_prompt_format(lambda p, t: f"Q: {p}\nA:")
    assert artifact_name("tiny", PRESETS["tiny"]) != book
    set_prompt_format(None)
    assert artifact_name("tiny", PRESETS["tiny"]) == book
