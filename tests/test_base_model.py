import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import rlhf_book
from rlhf_book import base_model as bm
from rlhf_book.base_model import PRESETS, _val_loss, encode_examples, load_base_model
from rlhf_book.corpus import generate_examples


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_tiny_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tmp_path / "a"))
    m1, tok = load_base_model("tiny", device="cpu", progress=False)
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tmp_path / "b"))
    m2, _ = load_base_model("tiny", device="cpu", progress=False)
    assert torch.equal(_weights(m1), _weights(m2))
    calls = []
    monkeypatch.setattr(bm, "build_base_model", lambda *a, **k: calls.append(1))
    load_base_model("tiny", device="cpu", progress=False)  # second load: from the cache, no build
    assert calls == []
    assert not m1.training and tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id


def test_interrupted_build_resumes_to_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tmp_path / "ref"))
    reference, _ = load_base_model("tiny", device="cpu", progress=False)

    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tmp_path / "crash"))
    real_save = bm.save_checkpoint
    saves = []

    def save_then_die(*a, **k):
        real_save(*a, **k)
        saves.append(k["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(bm, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_base_model("tiny", device="cpu", progress=False)
    assert not (tmp_path / "crash" / bm.artifact_name("tiny", PRESETS["tiny"])).exists()
    monkeypatch.setattr(bm, "save_checkpoint", real_save)
    resumed, _ = load_base_model("tiny", device="cpu", progress=False)
    assert saves == [10, 20]
    assert torch.equal(_weights(resumed), _weights(reference))


def test_local_directory_loads_like_a_hub_model(tmp_path, tiny_world):
    model, tok = tiny_world
    model.save_pretrained(tmp_path / "mine")
    tok.save_pretrained(tmp_path / "mine")
    again, tok2 = load_base_model(str(tmp_path / "mine"), device="cpu")
    assert torch.equal(_weights(again), _weights(model))
    assert tok2.pad_token_id == tok.pad_token_id


def test_hub_style_tokenizer_without_pad_gets_a_distinct_pad(tmp_path, tiny_world):
    _, tok = tiny_world
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hub")
    tok.save_pretrained(tmp_path / "hub")
    # make it look like GPT-2 on the hub: PAD == EOS
    import json

    cfg_path = tmp_path / "hub" / "tokenizer_config.json"
    c = json.loads(cfg_path.read_text())
    c["pad_token"] = c["eos_token"]
    cfg_path.write_text(json.dumps(c))
    model, t = load_base_model(str(tmp_path / "hub"), device="cpu")
    assert t.pad_token_id != t.eos_token_id
    assert model.get_input_embeddings().num_embeddings >= len(t)


def test_unknown_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a preset .*could not be fetched"):
        load_base_model("no-such-org/no-such-model", device="cpu")


def test_directory_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="directory without a saved model"):
        load_base_model(str(tmp_path), device="cpu")


def test_lm_loss_ignores_padding(tiny_world):
    model, tok = tiny_world
    seqs = encode_examples(tok, generate_examples(4, seed=3))
    a = _val_loss(model, seqs, tok.pad_token_id, "cpu", batch_size=4)  # padded to the longest
    b = sum(_val_loss(model, [s], tok.pad_token_id, "cpu") * (len(s) - 1) for s in seqs) / sum(len(s) - 1 for s in seqs)
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.slow
def test_cpu_preset_learns_the_corpus(cpu_world):
    """The cpu preset's validation loss. Measured: 0.910 nats/token after 600 steps (unigram ~ 3.9).

    Bound 1.0: far below a model that only learned word frequencies, with margin for
    a different BLAS. Also: the samples end with EOS and are fluent by the gold labeler.
    """
    model, tok = cpu_world
    meta = bm.base_model_metadata("cpu")
    val = [r for r in meta["history"] if "val_loss" in r]
    assert meta["final_val_loss"] == val[-1]["val_loss"] < 1.0
    assert val[0]["val_loss"] > meta["final_val_loss"]
    assert [r["step"] for r in meta["history"]] == list(range(1, 601))
    assert [r["step"] for r in val] == list(range(100, 601, 100))
    held_out = encode_examples(tok, generate_examples(256, seed=4242))
    assert _val_loss(model, held_out, tok.pad_token_id, "cpu") < 1.0
    from rlhf_book.corpus import prompt_split
    from rlhf_book.gold import gold_score

    _, held_out = prompt_split()
    roll = rlhf_book.generate(model, tok, [p["prompt"] for p in held_out], generator=torch.Generator().manual_seed(0))
    assert roll.terminated.float().mean() > 0.9
    fluency = sum(gold_score(p, r).fluency for p, r in zip(roll.prompts, roll.responses)) / len(roll)
    assert fluency > 0.9


def test_presets_have_the_promised_sizes():
    def n_params(p):
        cfg = GPT2Config(vocab_size=p.vocab_size, n_positions=p.n_positions, n_embd=p.n_embd, n_layer=p.n_layer, n_head=p.n_head)
        with torch.device("meta"):
            return sum(x.numel() for x in GPT2LMHeadModel(cfg).parameters())

    assert n_params(PRESETS["gpu"]) >= 30e6
    assert 0.3e6 < n_params(PRESETS["cpu"]) < 1e6
    for p in PRESETS.values():
        assert p.n_embd % p.n_head == 0


# ----------------------------------------------------------------------------- a reader's own texts
SMALL = dataclasses.replace(PRESETS["tiny"], steps=6, batch_size=4, eval_every=3, checkpoint_every=2, vocab_size=300)
DOCS = ["The keeper counted ships.", "Rain fell on the old harbour all night.", "Gulls argued over the pier."]
QA = [{"prompt": "Name a colour.", "response": "Blue."}, {"prompt": "Name a fruit.", "response": "A pear."}]


def test_history_rows_on_the_book_build(tiny_cache_dir, tiny_world):
    import json

    meta = json.loads((tiny_cache_dir / bm.artifact_name("tiny", PRESETS["tiny"]) / "metadata.json").read_text())
    h = meta["history"]
    assert [r["step"] for r in h] == list(range(1, 41)) and all("train_loss" in r for r in h)
    assert [r["step"] for r in h if "val_loss" in r] == [20, 40] and meta["final_val_loss"] == h[-1]["val_loss"]


def test_train_base_model_on_own_texts(tmp_path):
    model, tok, history = bm.train_base_model(DOCS + QA, SMALL, device="cpu", progress=False, val_texts=DOCS[:1])
    assert not model.training and len(tok) <= 300 and tok.pad_token_id != tok.eos_token_id
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in history if "val_loss" in r] == [3, 6]
    assert set(history[0]) == {"step", "train_loss"} and set(history[2]) == {"step", "train_loss", "val_loss"}
    # a record is trained on as format_prompt(prompt) + response + EOS, a document as text + EOS
    (doc,) = encode_examples(tok, DOCS[:1])
    assert doc == tok(DOCS[0])["input_ids"] + [tok.eos_token_id]
    (qa,) = encode_examples(tok, QA[:1])
    assert tok.decode(qa) == "Name a colour.\nBlue." + tok.eos_token
    # without validation texts there is no val_loss; the same seed gives the same weights
    again, _, h2 = bm.train_base_model(DOCS + QA, SMALL, tokenizer=tok, device="cpu", progress=False)
    assert torch.equal(_weights(again), _weights(model)) and all("val_loss" not in r for r in h2)
    assert [r["train_loss"] for r in h2] == [r["train_loss"] for r in history]


def test_train_base_model_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    reference, _, ref_history = bm.train_base_model(DOCS + QA, SMALL, device="cpu", progress=False, val_texts=DOCS)
    real_save = bm.save_checkpoint

    def save_then_die(*a, **k):
        real_save(*a, **k)
        if k["step"] == 4:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(bm, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        bm.train_base_model(DOCS + QA, SMALL, device="cpu", progress=False, val_texts=DOCS, checkpoint_dir=tmp_path)
    assert (tmp_path / "tokenizer").is_dir()  # the tokenizer trained there is reused
    monkeypatch.setattr(bm, "save_checkpoint", real_save)
    resumed, _, history = bm.train_base_model(DOCS + QA, SMALL, device="cpu", progress=False, val_texts=DOCS,
                                              checkpoint_dir=tmp_path)
    assert torch.equal(_weights(resumed), _weights(reference)) and history == ref_history
    monkeypatch.setattr(bm, "lm_loss", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again, _, h3 = bm.train_base_model(DOCS + QA, SMALL, device="cpu", progress=False, val_texts=DOCS,
                                       checkpoint_dir=tmp_path)
    assert torch.equal(_weights(again), _weights(reference)) and h3 == ref_history


@pytest.mark.parametrize("texts, kwargs, message", [
    ([], {}, r"texts is empty"),
    ("one long string", {}, r"texts must be a list of documents or records, got str"),
    (DOCS + [3], {}, r"texts\[3\] must be a document \(a string\) or a record"),
    (DOCS + [{"prompt": "Hi."}], {}, r"texts\[3\]: missing field 'response'"),
    (DOCS + [{"prompt": "Hi.", "response": None}], {}, r"texts\[3\]: field 'response' must be a string, got NoneType"),
    (DOCS + [" "], {}, r"texts\[3\] is an empty document"),
    (DOCS + ["word " * 200], {}, r"texts\[3\] is \d+ tokens with EOS, longer than the context of n_positions=96"),
    (DOCS, {"val_texts": [{"response": "x"}]}, r"val_texts\[0\]: missing field 'prompt'"),
    (DOCS, {"preset": "tinyy"}, r"preset must be one of 'tiny', 'cpu', 'gpu' or a Preset, got 'tinyy'"),
])
def test_train_base_model_names_bad_input(texts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bm.train_base_model(texts, **{"preset": SMALL, "device": "cpu", "progress": False, **kwargs})


def test_train_base_model_needs_a_distinct_pad(tiny_world):
    import copy

    _, tok = tiny_world
    same = copy.deepcopy(tok)
    same.pad_token = same.eos_token
    with pytest.raises(ValueError, match="PAD token distinct from EOS"):
        bm.train_base_model(DOCS, SMALL, tokenizer=same, device="cpu", progress=False)
