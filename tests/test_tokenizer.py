from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_book.corpus import generate_examples
from rlhf_book.tokenizer import EOS, PAD, format_prompt, train_tokenizer


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
