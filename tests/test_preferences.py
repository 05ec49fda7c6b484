"""Preference data: validation of records and files, generation from the world, the shipped sample."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import rlhf_book
from rlhf_book.gold import Annotator, gold_reward, gold_reward_fn, gold_rewards
from rlhf_book.preferences import (
    PREFERENCE_RECIPES,
    build_preference_data,
    generate_preferences,
    load_preference_data,
    load_preferences,
    preference_data_info,
    preference_data_key,
    preference_data_path,
    save_preferences,
    split_prompts,
    to_trl_dataset,
    to_trl_records,
    validate_preferences,
)
from rlhf_book.reward_model import _encode_pairs
from rlhf_book.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]

GOOD = {"prompt": "Review Luigi's.", "chosen": "The food was great.", "rejected": "The food was bad."}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = ["Review Luigi's.\nThe food was great. The soup was bad."] * 20
    return train_tokenizer(texts, vocab_size=300)


def test_load_valid_file_keeps_extra_fields(tmp_path):
    extra = {**GOOD, "chosen_gold": 0.5, "rejected_gold": -0.5, "chosen_terminated": True, "note": "anything"}
    path = _write(tmp_path / "p.jsonl", [GOOD, "", extra])  # blank lines are skipped
    recs = load_preferences(path)
    assert recs == [GOOD, extra]


BAD_CASES = [
    # (record or raw line, words the message must contain)
    ({"chosen": "a", "rejected": "b"}, ["line 2", "'prompt'", "missing"]),
    ({"prompt": "p", "rejected": "b"}, ["line 2", "'chosen'", "missing"]),
    ({"prompt": "p", "chosen": "a"}, ["line 2", "'rejected'", "missing"]),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, ["line 2", "'chosen'", "string"]),
    ({"prompt": ["p"], "chosen": "a", "rejected": "b"}, ["line 2", "'prompt'", "string"]),
    ({"prompt": "p", "chosen": "a", "rejected": None}, ["line 2", "'rejected'", "string"]),
    ({"prompt": "p", "chosen": "   ", "rejected": "b"}, ["line 2", "'chosen'", "empty"]),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, ["line 2", "'rejected'", "empty"]),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, ["line 2", "'prompt'", "empty"]),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, ["line 2", "'chosen'", "'rejected'", "same"]),
    ({**GOOD, "chosen_terminated": "yes"}, ["line 2", "'chosen_terminated'"]),
    ('{"prompt": "p", "chosen": ', ["line 2", "not valid JSON"]),
    ('["p", "a", "b"]', ["line 2", "JSON object"]),
]


@pytest.mark.parametrize("bad,words", BAD_CASES, ids=[f"case{i}" for i in range(len(BAD_CASES))])
def test_bad_record_in_file_names_line_and_field(tmp_path, bad, words):
    path = _write(tmp_path / "p.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("bad,words", [c for c in BAD_CASES if not isinstance(c[0], str)], ids=lambda x: None)
def test_bad_record_writes_nothing(tmp_path, bad, words):
    out = tmp_path / "out" / "prefs.jsonl"
    with pytest.raises(ValueError) as e:
        save_preferences([GOOD, bad], out)
    assert "record 1" in str(e.value)
    for w in words[1:]:
        assert w in str(e.value)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


GOOD_LINE = json.dumps(GOOD).encode()
BOM = b"\xef\xbb\xbf"


def _with(**fields) -> bytes:
    """A line of GOOD plus ``fields`` given as raw JSON text (so NaN, Infinity, escapes reach the file)."""
    return (json.dumps(GOOD)[:-1] + "".join(f', "{k}": {v}' for k, v in fields.items()) + "}").encode("ascii")


FILE_CASES = [
    # (file bytes, None if the file loads as [GOOD, GOOD], else words the message must contain)
    (BOM + GOOD_LINE + b"\n" + GOOD_LINE + b"\n", None),
    (GOOD_LINE + b"\r\n" + GOOD_LINE + b"\r\n", None),
    (
        GOOD_LINE + b"\n" + json.dumps({**GOOD, "chosen": "Caf\u00e9 food."}, ensure_ascii=False).encode("latin-1"),
        ["line 2", "not valid UTF-8", "0xe9"],
    ),
    (GOOD_LINE + b"\n" + BOM + GOOD_LINE, ["line 2", "not valid JSON"]),  # a BOM only at the start
    (GOOD_LINE + b'\n{"prompt": "p", "chosen": "\\ud800", "rejected": "b"}', ["line 2", "'chosen'", "lone surrogate"]),
    (GOOD_LINE + b"\n" + _with(note='"\\udfff"'), ["line 2", "'note'", "lone surrogate"]),
    (GOOD_LINE + b"\n" + _with(chosen_gold='"high"'), ["line 2", "'chosen_gold'", "finite number", "'high'"]),
    (GOOD_LINE + b"\n" + _with(chosen_gold="NaN"), ["line 2", "'chosen_gold'", "finite number", "nan"]),
    (GOOD_LINE + b"\n" + _with(rejected_gold="null"), ["line 2", "'rejected_gold'", "finite number", "None"]),
    (GOOD_LINE + b"\n" + _with(rejected_gold="-Infinity"), ["line 2", "'rejected_gold'", "finite number", "-inf"]),
    (GOOD_LINE + b"\n" + _with(chosen_gold="true"), ["line 2", "'chosen_gold'", "finite number", "True"]),
    (GOOD_LINE + b"\n" + _with(chosen_temperature="0"), ["line 2", "'chosen_temperature'", "> 0", "got 0"]),
    (GOOD_LINE + b"\n" + _with(rejected_temperature="-1.5"), ["line 2", "'rejected_temperature'", "> 0"]),
    (GOOD_LINE + b"\n" + _with(rejected_temperature='"1.0"'), ["line 2", "'rejected_temperature'", "'1.0'"]),
    (GOOD_LINE + b"\n" + _with(chosen_temperature="Infinity"), ["line 2", "'chosen_temperature'", "inf"]),
]


@pytest.mark.parametrize("data,words", FILE_CASES, ids=[f"file{i}" for i in range(len(FILE_CASES))])
def test_file_encoding_and_numeric_fields(tmp_path, data, words):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(data)
    if words is None:
        assert load_preferences(path) == [GOOD, GOOD]
        return
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert not isinstance(e.value, UnicodeError), repr(e.value)  # a message, not a bare codec error
    assert str(e.value).startswith(f"{path} line 2: "), str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_numeric_fields_and_surrogates_in_memory(tmp_path):
    ok = {**GOOD, "chosen_gold": 1, "rejected_gold": -0.25, "chosen_temperature": 2, "rejected_temperature": 0.5}
    assert validate_preferences([ok]) == [ok]
    bad = [
        ({**GOOD, "rejected": "\ud800"}, "field 'rejected' is not valid Unicode (lone surrogate)"),
        ({**GOOD, "chosen_gold": float("nan")}, "field 'chosen_gold' must be a finite number, got nan"),
        ({**GOOD, "rejected_gold": False}, "field 'rejected_gold' must be a finite number, got False"),
        ({**GOOD, "chosen_temperature": -1}, "field 'chosen_temperature' must be a finite number > 0, got -1"),
    ]
    for rec, msg in bad:
        with pytest.raises(ValueError) as e:
            validate_preferences([GOOD, rec])
        assert str(e.value) == f"record 1: {msg}"
        out = tmp_path / "out.jsonl"
        with pytest.raises(ValueError, match="record 1"):
            save_preferences([GOOD, rec], out)
        assert not out.exists()


def test_prompt_longer_than_context_is_rejected(tmp_path, small_tokenizer):
    long_prompt = "Review Luigi's. " * 40
    n = len(small_tokenizer(long_prompt + "\n")["input_ids"])
    path = _write(tmp_path / "p.jsonl", [GOOD, {**GOOD, "prompt": long_prompt}])
    assert load_preferences(path)  # without a tokenizer there is no context to check against
    with pytest.raises(ValueError, match=r"line 2: field 'prompt' is \d+ tokens.*context window of 32"):
        load_preferences(path, tokenizer=small_tokenizer, max_length=32)
    assert load_preferences(path, tokenizer=small_tokenizer, max_length=n + 50)
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="record 1: field 'prompt'"):
        save_preferences([GOOD, {**GOOD, "prompt": long_prompt}], out, small_tokenizer, 32)
    assert not out.exists()


def test_reply_longer_than_context_is_rejected(small_tokenizer):
    rec = {**GOOD, "rejected": "The soup was bad. " * 30}
    with pytest.raises(ValueError, match="record 0: prompt \\+ field 'rejected' \\+ EOS"):
        validate_preferences([rec], small_tokenizer, 48)


def test_empty_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="no records"):
        load_preferences(_write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(ValueError, match="no such preference file"):
        load_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="empty"):
        validate_preferences([])


def test_save_then_load_roundtrip(tmp_path):
    recs = [GOOD, {**GOOD, "chosen": "The soup was lovely.", "chosen_gold": 0.4}]
    path = save_preferences(recs, tmp_path / "a" / "p.jsonl")
    assert load_preferences(path) == recs


def test_shipped_sample_is_valid():
    recs = load_preferences(REPO / "data" / "preferences_sample.jsonl")
    assert len(recs) >= 10
    for r in recs:  # the sample carries the generator's extra fields, consistent with the gold score
        assert abs(gold_reward(r["prompt"], r["chosen"], r["chosen_terminated"]) - r["chosen_gold"]) < 1e-4
        assert abs(gold_reward(r["prompt"], r["rejected"], r["rejected_terminated"]) - r["rejected_gold"]) < 1e-4


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_generate_preferences_labels_follow_the_annotator(tiny_cache):
    model, tok = rlhf_book.load_base_model("tiny", progress=False)
    prompts = ["Review Luigi's.", "Tell me about the new phone.", "Review the film Night Train."]
    recs = generate_preferences(
        model,
        tok,
        prompts,
        24,
        Annotator(gold_reward_fn, 0.25, seed=3),
        gold_fn=gold_reward_fn,
        temperatures=(1.0, 2.0),
        max_new_tokens=12,
        seed=1,
        progress=False,
    )
    assert 0 < len(recs) <= 24
    validate_preferences(recs)
    assert {r["prompt"] for r in recs} <= set(prompts)
    for r in recs:
        assert r["chosen"] != r["rejected"]
        assert r["chosen_gold"] == pytest.approx(
            gold_reward(r["prompt"], r["chosen"], r["chosen_terminated"]), abs=1e-5
        )
        assert r["rejected_gold"] == pytest.approx(
            gold_reward(r["prompt"], r["rejected"], r["rejected_terminated"]), abs=1e-5
        )
    # with a near-zero annotator temperature the label is the gold ordering
    sharp = generate_preferences(
        model, tok, prompts, 24, Annotator(gold_rewards, 1e-6, seed=0), gold_fn=gold_rewards, max_new_tokens=12,
        seed=1, progress=False,
    )
    assert all(r["chosen_gold"] >= r["rejected_gold"] for r in sharp)
    again = generate_preferences(
        model, tok, prompts, 24, Annotator(gold_rewards, 1e-6, seed=0), gold_fn=gold_rewards, max_new_tokens=12,
        seed=1, progress=False,
    )
    assert again == sharp  # deterministic for a seed
    # without a gold function the records carry no gold, and the labels are the same
    no_gold = generate_preferences(
        model, tok, prompts, 24, Annotator(gold_rewards, 1e-6, seed=0), max_new_tokens=12, seed=1, progress=False
    )
    assert no_gold == [{k: v for k, v in r.items() if not k.endswith("_gold")} for r in sharp]
    with pytest.raises(ValueError, match="n_pairs"):
        generate_preferences(model, tok, prompts, 0, Annotator(gold_reward_fn))
    with pytest.raises(ValueError, match="annotator must have a method prefers_first"):
        generate_preferences(model, tok, prompts, 4, gold_reward_fn)
    with pytest.raises(ValueError, match="prompts must be a list of strings"):
        generate_preferences(model, tok, "Review Luigi's.", 4, Annotator(gold_reward_fn))
    with pytest.raises(ValueError, match="gold_fn returned 1 scores"):
        generate_preferences(model, tok, prompts, 4, Annotator(gold_reward_fn), gold_fn=lambda p, r, t: [0.0],
                             max_new_tokens=4, progress=False)


def test_any_annotator_object_labels_pairs(tiny_cache):
    """A reader's own annotators: anything with prefers_first (here: always the shorter reply)."""
    model, tok = rlhf_book.load_base_model("tiny", progress=False)

    class Shorter:
        def prefers_first(self, prompt, a, b, a_terminated=True, b_terminated=True):
            return len(a) <= len(b)

    recs = generate_preferences(model, tok, ["Review Luigi's."], 8, Shorter(), max_new_tokens=12, progress=False)
    assert recs and all(len(r["chosen"]) <= len(r["rejected"]) and "chosen_gold" not in r for r in recs)


def test_build_preference_data_splits_by_prompt(tiny_cache):
    data = load_preference_data("tiny", progress=False)
    recipe = PREFERENCE_RECIPES["tiny"]
    assert set(data) == {"train", "validation", "test"}
    assert len(data["train"]) > 0.9 * recipe.n_train
    prompts = {k: {r["prompt"] for r in v} for k, v in data.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    eval_prompts = {p["prompt"] for p in rlhf_book.prompt_split()[1]}
    assert not set().union(*prompts.values()) & eval_prompts  # the RL eval prompts stay unseen
    path = preference_data_path("tiny")
    assert (path / "COMPLETE.json").is_file() and (path / "metadata.json").is_file()
    info = preference_data_info("tiny")
    for split, recs in data.items():
        s = info["splits"][split]
        strict = [r for r in recs if r["chosen_gold"] != r["rejected_gold"]]
        assert s["pairs"] == len(recs) and s["gold_ties"] == len(recs) - len(strict)
        agree = sum(r["chosen_gold"] > r["rejected_gold"] for r in strict) / len(strict)
        assert s["label_agrees_with_gold"] == round(agree, 4)
    with pytest.raises(ValueError, match="unknown base preset"):
        preference_data_path("huge")


def test_build_preference_data_given_path(tiny_cache, tmp_path):
    model, tok = rlhf_book.load_base_model("tiny", progress=False)
    meta = build_preference_data(model, tok, PREFERENCE_RECIPES["tiny"], tmp_path / "out", gold_fn=gold_rewards,
                                 progress=False)
    for split in ("train", "validation", "test"):
        assert (
            len(load_preferences(tmp_path / "out" / f"{split}.jsonl", tok, model.config.n_positions))
            == meta["splits"][split]["pairs"]
        )
    with pytest.raises(TypeError, match="gold_fn"):
        build_preference_data(model, tok, PREFERENCE_RECIPES["tiny"], tmp_path / "x")  # the gold is never implied


READER_PROMPTS = [f"Describe the {thing}." for thing in ("garden", "museum", "bakery", "bridge", "library", "harbour")]


def test_a_readers_prompts_and_gold(tiny_cache, tmp_path):
    model, tok = rlhf_book.load_base_model("tiny", progress=False)

    def brevity(prompts, responses, terminated):
        return [-float(len(r.split())) for r in responses]

    meta = build_preference_data(model, tok, PREFERENCE_RECIPES["tiny"], tmp_path / "mine",
                                 prompts=[{"prompt": p} for p in READER_PROMPTS], gold_fn=brevity, progress=False)
    groups = split_prompts(READER_PROMPTS, PREFERENCE_RECIPES["tiny"].prompt_fractions)
    for split in ("train", "validation", "test"):
        recs = load_preferences(tmp_path / "mine" / f"{split}.jsonl")
        assert {r["prompt"] for r in recs} <= set(groups[split])
        assert all(r["chosen_gold"] == -len(r["chosen"].split()) for r in recs)  # the reader's gold, not the book's
        assert meta["splits"][split]["prompts"] == len(groups[split])
    assert sum(map(len, groups.values())) == len(READER_PROMPTS)
    assert split_prompts(READER_PROMPTS[::-1] + READER_PROMPTS[:2]) == split_prompts(READER_PROMPTS)  # order, repeats
    with pytest.raises(ValueError, match="needs >= 3"):
        split_prompts(["a", "b", "a"])
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty string"):
        split_prompts(["a", "", "c"])
    with pytest.raises(ValueError, match=r"prompts\[0\]: missing field 'prompt'"):
        split_prompts([{"text": "a"}])


def test_the_cache_key_follows_the_prompts():
    book = preference_data_key("tiny")
    mine = preference_data_key("tiny", READER_PROMPTS)
    assert mine != book and mine == preference_data_key("tiny", [{"prompt": p} for p in reversed(READER_PROMPTS)])
    assert preference_data_key("tiny", READER_PROMPTS[:-1]) != mine
    with pytest.raises(ValueError, match="needs >= 3"):
        preference_data_path("tiny", prompts=["only one"])  # before any build


# ------------------------------------------------------------------- TRL bridge
def _trl_ids(tokenizer, prompt: str, reply: str) -> list[int]:
    """Ids as TRL's DPOTrainer builds them: prompt and reply tokenized apart, concatenated, EOS appended."""
    return (
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
        + tokenizer(reply, add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
    )


def _terminated(r: dict) -> bool:
    return r.get("chosen_terminated", True) and r.get("rejected_terminated", True)


def test_trl_dataset_gives_the_books_ids(tiny_world):
    pytest.importorskip("datasets")
    _, tok = tiny_world
    sample = load_preferences(REPO / "data" / "preferences_sample.jsonl")
    cut = {**sample[0], "chosen_terminated": False}  # a reply that ended without EOS
    records = sample + [cut]
    before = json.dumps(records)

    ds = to_trl_dataset(records)  # unterminated="drop"
    kept = [r for r in records if _terminated(r)]
    assert len(ds) == len(kept) == len(records) - 1
    assert all(ds["chosen_terminated"]) and all(ds["rejected_terminated"])
    assert ds.column_names[:3] == ["prompt", "chosen", "rejected"] and set(ds.column_names) == set(sample[0])
    for row, rec, (chosen_ids, rejected_ids) in zip(ds, kept, _encode_pairs(tok, kept, None)):
        assert row == {**rec, "prompt": rec["prompt"] + "\n"}  # extra fields kept unchanged
        assert _trl_ids(tok, row["prompt"], row["chosen"]) == chosen_ids
        assert _trl_ids(tok, row["prompt"], row["rejected"]) == rejected_ids
        # tokenizing prompt + reply as one string gives the same ids with this tokenizer
        assert tok(row["prompt"] + row["chosen"])["input_ids"] + [tok.eos_token_id] == chosen_ids
        # the raw prompt (no separator) does not: the check above can fail
        assert _trl_ids(tok, rec["prompt"], rec["chosen"]) != chosen_ids
        assert _trl_ids(tok, rec["prompt"], rec["rejected"]) != rejected_ids

    keep = to_trl_dataset(records, unterminated="keep")
    assert len(keep) == len(records) and keep["chosen_terminated"].count(False) == 1
    ((chosen_ids, rejected_ids),) = _encode_pairs(tok, [cut], None)
    assert chosen_ids[-1] != tok.eos_token_id  # the book scores the cut reply without EOS ...
    assert _trl_ids(tok, keep[-1]["prompt"], keep[-1]["chosen"]) == chosen_ids + [tok.eos_token_id]  # ... TRL adds one
    assert _trl_ids(tok, keep[-1]["prompt"], keep[-1]["rejected"]) == rejected_ids
    assert json.dumps(records) == before  # the input records are not modified


def test_trl_records_arguments(monkeypatch):
    cut = {**GOOD, "rejected_terminated": False}
    assert to_trl_records([GOOD, cut]) == [{**GOOD, "prompt": GOOD["prompt"] + "\n"}]
    assert len(to_trl_records([GOOD, cut], unterminated="keep")) == 2
    for bad in ("maybe", None, True):
        with pytest.raises(ValueError, match=r"unterminated must be one of 'drop', 'keep', got"):
            to_trl_records([GOOD], unterminated=bad)
    with pytest.raises(ValueError, match="unterminated='keep'"):
        to_trl_records([cut])
    with pytest.raises(ValueError, match="record 1: missing field 'rejected'"):
        to_trl_records([GOOD, {"prompt": "p", "chosen": "a"}])
    with pytest.raises(ValueError, match="empty"):
        to_trl_records([])
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if datasets were not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        to_trl_dataset([GOOD])
