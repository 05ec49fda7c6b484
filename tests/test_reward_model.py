"""Reward model: the Bradley-Terry loss, reading the score at the last real token, training, caching."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import rlhf_book
from rlhf_book import reward_model as rm_mod
from rlhf_book.advantage import last_token_index
from rlhf_book.reward_model import (
    bradley_terry_loss,
    calibration_bins,
    encode_replies,
    evaluate_preferences,
    load_reward_model,
    normalize_reward_model,
    preference_accuracy,
    preference_probabilities,
    reward_fn_from_model,
    reward_model_from_lm,
    reward_model_path,
    reward_scores,
    score_pairs,
    score_sequences,
    train_reward_model,
)
from rlhf_book.rewards import apply_missing_eos_score

# ----------------------------------------------------------------------------- the loss


def test_bt_loss_is_log2_for_equal_scores():
    r = torch.tensor([0.0, 1.5, -3.0])
    torch.testing.assert_close(bradley_terry_loss(r, r.clone()), torch.tensor(math.log(2.0)))


def test_bt_loss_hand_computed_and_margin():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2
    torch.testing.assert_close(bradley_terry_loss(rc, rr), torch.tensor(expected))
    m = torch.tensor([0.5, -1.0])
    torch.testing.assert_close(bradley_terry_loss(rc, rr, m), bradley_terry_loss(rc - m, rr))
    torch.testing.assert_close(bradley_terry_loss(rc, rr, 0.5), bradley_terry_loss(rc - 0.5, rr))


def test_bt_loss_sign_and_stability():
    good = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([-2.0]))
    bad = bradley_terry_loss(torch.tensor([-2.0]), torch.tensor([2.0]))
    assert 0 < good < math.log(2) < bad
    # large gaps: no overflow to inf / nan (logsigmoid, not log(sigmoid))
    big = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert torch.isfinite(big) and big.item() == pytest.approx(400.0)
    assert bradley_terry_loss(torch.tensor([200.0]), torch.tensor([-200.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_bt_gradient_raises_chosen_and_lowers_rejected():
    rc = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    rr = torch.tensor([0.1, 0.5, 2.0], requires_grad=True)
    bradley_terry_loss(rc, rr).backward()
    assert (rc.grad < 0).all()  # gradient *descent* moves r_chosen up
    assert (rr.grad > 0).all()  # and r_rejected down
    torch.testing.assert_close(rc.grad, -rr.grad)
    # d loss / d r_c = -(1 - sigmoid(r_c - r_r)) / B
    torch.testing.assert_close(rc.grad, -(1 - torch.sigmoid(rc - rr)).detach() / 3)


def test_accuracy_and_probabilities():
    rc, rr = torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, -1.0])
    assert preference_accuracy(rc, rr) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    torch.testing.assert_close(preference_probabilities(rc, rr), torch.sigmoid(rc - rr))
    with pytest.raises(ValueError):
        preference_accuracy(torch.zeros(0), torch.zeros(0))


def test_calibration_bins_hand_computed():
    p = torch.tensor([0.05, 0.15, 0.12, 0.95, 1.0, 0.55])
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    out = calibration_bins(p, y, n_bins=10)
    assert out["count"].tolist() == [1, 2, 1, 2]  # bins [0, .1), [.1, .2), [.5, .6), [.9, 1]
    torch.testing.assert_close(out["predicted"], torch.tensor([0.05, 0.135, 0.55, 0.975]))
    torch.testing.assert_close(out["observed"], torch.tensor([0.0, 0.5, 0.0, 1.0]))
    with pytest.raises(ValueError):
        calibration_bins(p, y[:3])


# ----------------------------------------------------------------------------- the score


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 3]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[0, 0]]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny base LM (built in a temporary cache) and a reward model with a random score head."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RLHF_BOOK_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        lm, tok = rlhf_book.load_base_model("tiny", device="cpu", progress=False)
    finally:
        mp.undo()
    torch.manual_seed(0)
    rm = reward_model_from_lm(lm)
    with torch.no_grad():  # a zero head scores everything 0, which would make every invariance trivially true
        rm.score.weight.normal_(0, 1.0)
    return lm, rm.eval(), tok


PROMPTS = ["Review Luigi's.", "Tell me about the new phone.", "How was your trip to the lake?"]
REPLIES = ["The food was great.", "The battery was awful and the screen was broken. Never again.", "Nice."]


def _pad(seqs, pad, side, extra=0):
    T = max(map(len, seqs)) + extra
    ids = torch.full((len(seqs), T), pad)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def test_init_from_base_copies_trunk_and_zero_head(tiny):
    lm, _, tok = tiny
    fresh = reward_model_from_lm(lm)
    for k, v in lm.base_model.state_dict().items():
        torch.testing.assert_close(fresh.base_model.state_dict()[k], v)
    assert (fresh.score.weight == 0).all() and fresh.config.num_labels == 1
    assert reward_scores(fresh, tok, PROMPTS, REPLIES).abs().max() == 0  # so BT loss starts at log 2


def test_score_independent_of_padding_side_and_amount(tiny):
    _, rm, tok = tiny
    seqs = encode_replies(tok, PROMPTS, REPLIES)
    pad = tok.pad_token_id
    with torch.no_grad():
        right = score_sequences(rm, *_pad(seqs, pad, "right"))
        left = score_sequences(rm, *_pad(seqs, pad, "left"))
        right_more = score_sequences(rm, *_pad(seqs, pad, "right", extra=7))
        left_more = score_sequences(rm, *_pad(seqs, pad, "left", extra=7))
        alone = torch.cat(
            [score_sequences(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs]
        )
    assert alone.std() > 1e-3  # the scores differ, so the comparisons below mean something
    for other in (left, right_more, left_more, alone):
        torch.testing.assert_close(right, other, atol=1e-5, rtol=1e-5)


def test_tokens_after_eos_change_nothing(tiny):
    _, rm, tok = tiny
    seqs = encode_replies(tok, PROMPTS, REPLIES)
    assert all(s[-1] == tok.eos_token_id for s in seqs)
    ids, mask = _pad(seqs, tok.pad_token_id, "right", extra=5)
    garbage = ids.clone()
    garbage[mask == 0] = torch.randint(2, len(tok), (int((mask == 0).sum()),))  # real-looking tokens, masked out
    with torch.no_grad():
        torch.testing.assert_close(score_sequences(rm, ids, mask), score_sequences(rm, garbage, mask))
        # what makes it hold: the score is read at the EOS, and a causal model's EOS state ignores later tokens
        longer = [s + tok("The soup was bad.")["input_ids"] for s in seqs]
        hidden_idx = torch.tensor([len(s) - 1 for s in seqs])
        ids2, mask2 = _pad(longer, tok.pad_token_id, "right")
        h = rm.base_model(input_ids=ids2, attention_mask=mask2).last_hidden_state
        at_eos = rm.score(h[torch.arange(3), hidden_idx]).squeeze(-1)
        torch.testing.assert_close(at_eos, score_sequences(rm, ids, mask), atol=1e-5, rtol=1e-5)


def test_left_padding_needs_position_ids(tiny):
    """Guard for the test above: without position ids from the mask, left padding *does* change the score."""
    _, rm, tok = tiny
    seqs = encode_replies(tok, PROMPTS, REPLIES)
    ids, mask = _pad(seqs, tok.pad_token_id, "left", extra=3)
    with torch.no_grad():
        h = rm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        naive = rm.score(h).squeeze(-1)
        assert not torch.allclose(naive, score_sequences(rm, ids, mask), atol=1e-4)


def test_reward_scores_batching_and_terminated(tiny):
    _, rm, tok = tiny
    full = reward_scores(rm, tok, PROMPTS, REPLIES, batch_size=8)
    one_by_one = reward_scores(rm, tok, PROMPTS, REPLIES, batch_size=1)
    torch.testing.assert_close(full, one_by_one, atol=1e-5, rtol=1e-5)
    assert full.dtype == torch.float32 and full.shape == (3,)
    cut = reward_scores(rm, tok, PROMPTS, REPLIES, terminated=[True, False, True])
    assert cut[0] == full[0] and cut[2] == full[2] and cut[1] != full[1]  # no EOS appended to reply 1
    with pytest.raises(ValueError, match="2 responses"):
        reward_scores(rm, tok, PROMPTS, REPLIES[:2])
    with pytest.raises(ValueError, match="pair 0: prompt \\+ response is \\d+ tokens"):
        reward_scores(rm, tok, PROMPTS[:1], ["The food was great. " * 40])


def test_plain_transformers_forward_gives_the_same_raw_score(tiny, tmp_path):
    _, rm, tok = tiny
    rm.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = _pad(encode_replies(tok, PROMPTS, REPLIES), tok.pad_token_id, "right")
    with torch.no_grad():
        hf = loaded(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(hf, reward_scores(rm, tok, PROMPTS, REPLIES, normalize=False), atol=1e-5, rtol=1e-5)


def test_normalisation_and_reward_fn(tiny, tmp_path):
    lm, rm0, tok = tiny
    rm = reward_model_from_lm(lm)
    rm.load_state_dict(rm0.state_dict())
    roll = rlhf_book.generate(lm, tok, PROMPTS * 6, max_new_tokens=10, generator=torch.Generator().manual_seed(0))
    stats = normalize_reward_model(rm, tok, roll.prompts, roll.responses, roll.terminated)
    s = reward_scores(rm, tok, roll.prompts, roll.responses, roll.terminated)
    assert abs(s.mean().item()) < 1e-4 and abs(s.std().item() - 1) < 1e-4
    raw = reward_scores(rm, tok, roll.prompts, roll.responses, roll.terminated, normalize=False)
    torch.testing.assert_close(s, stats["gain"] * raw + stats["bias"])
    # the normalisation travels with the saved model
    rm.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(reward_scores(loaded, tok, roll.prompts, roll.responses, roll.terminated), s)
    # the book-wide reward-function signature
    fn = reward_fn_from_model(rm, tok)
    out = fn(roll.prompts, roll.responses, roll.terminated)
    assert out.shape == (len(roll.prompts),) and out.dtype == torch.float32
    torch.testing.assert_close(out, s)
    terminated = torch.tensor([True, False, True])
    plain = fn(PROMPTS, REPLIES, terminated)
    trick = apply_missing_eos_score(plain, terminated, -3.0)  # the EOS trick lives in one place, not in the wrapper
    assert trick[1] == -3.0 and trick[0] == plain[0] and trick[2] == plain[2] and plain[1] != -3.0
    assert "no_eos_score" not in inspect.signature(reward_fn_from_model).parameters
    assert fn.to("cpu") is fn and next(rm.parameters()).device.type == "cpu"  # trainers move a model reward with it
    torch.testing.assert_close(fn(PROMPTS, REPLIES), fn(PROMPTS, REPLIES, [True] * 3))


# ----------------------------------------------------------------------------- training


def _toy_pairs(n=48):
    """Pairs where the positive reply is always chosen: easy for a reward model to learn."""
    rng = torch.Generator().manual_seed(0)
    pos = ["The food was great.", "I loved the soup.", "The staff was friendly.", "Highly recommended."]
    neg = ["The food was awful.", "I hated the soup.", "The staff was rude.", "Never again."]
    out = []
    for i in range(n):
        a, b = torch.randint(4, (2,), generator=rng).tolist()
        out.append(
            {"prompt": PROMPTS[i % 3], "chosen": pos[a], "rejected": neg[b], "chosen_gold": 1.0, "rejected_gold": -1.0}
        )
    return out


def test_training_improves_validation(tiny):
    lm, _, tok = tiny
    torch.manual_seed(0)
    rm = reward_model_from_lm(lm)
    pairs = _toy_pairs()
    before = evaluate_preferences(rm, tok, pairs[:16])
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    hist = train_reward_model(rm, tok, pairs[16:], pairs[:16], epochs=3, batch_size=8, lr=1e-2, progress=False)
    after = evaluate_preferences(rm, tok, pairs[:16])
    assert [r["step"] for r in hist] == list(range(1, 13)) and [r["epoch"] for r in hist] == [1] * 4 + [2] * 4 + [3] * 4
    assert set(hist[0]) == {"step", "loss", "accuracy", "epoch"}
    evals = [r for r in hist if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12] and all("val_gold_accuracy" in r for r in evals)
    assert (
        evals[-1]["val_loss"] < evals[0]["val_loss"]
        and after["loss"] < 0.2 * math.log(2)
        and after["accuracy"] == 1.0
        and after["gold_accuracy"] == 1.0
    )


def test_trainer_resumes_from_checkpoint(tiny, tmp_path):
    lm, _, tok = tiny
    pairs = _toy_pairs(40)
    kw = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 3, "progress": False}

    torch.manual_seed(0)
    full = reward_model_from_lm(lm)
    h_full = train_reward_model(full, tok, pairs, pairs[:8], checkpoint_path=tmp_path / "a.pt", **kw)
    assert torch.load(tmp_path / "a.pt", weights_only=False)["step"] == 10  # the finished state is saved too

    torch.manual_seed(0)
    first = reward_model_from_lm(lm)
    train_reward_model(
        first, tok, pairs, pairs[:8], checkpoint_path=tmp_path / "b.pt", max_steps=7, **kw
    )  # "killed" at step 7
    assert torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 6
    torch.manual_seed(123)  # a different fresh model: everything must come from the checkpoint
    second = reward_model_from_lm(lm)
    h_resumed = train_reward_model(second, tok, pairs, pairs[:8], checkpoint_path=tmp_path / "b.pt", **kw)
    assert [r["step"] for r in h_resumed] == list(range(1, 11)) and h_resumed == h_full
    for k, v in full.state_dict().items():
        torch.testing.assert_close(second.state_dict()[k], v)
    # calling again with a finished checkpoint only reloads it
    third = reward_model_from_lm(lm)
    h_again = train_reward_model(third, tok, pairs, pairs[:8], checkpoint_path=tmp_path / "b.pt", **kw)
    assert h_again == h_resumed
    for k, v in full.state_dict().items():
        torch.testing.assert_close(third.state_dict()[k], v)


def test_validation_without_gold_has_no_gold_key(tiny):
    lm, _, tok = tiny
    pairs = [{k: v for k, v in r.items() if not k.endswith("_gold")} for r in _toy_pairs(24)]
    hist = train_reward_model(reward_model_from_lm(lm), tok, pairs[8:], pairs[:8], epochs=1, batch_size=8,
                              progress=False)
    assert set(hist[-1]) == {"step", "loss", "accuracy", "epoch", "val_loss", "val_accuracy"}
    assert set(evaluate_preferences(reward_model_from_lm(lm), tok, pairs)) == {"loss", "accuracy", "pairs"}
    no_val = train_reward_model(reward_model_from_lm(lm), tok, pairs, epochs=1, batch_size=8, progress=False)
    assert all(set(r) == {"step", "loss", "accuracy", "epoch"} for r in no_val)


def test_trainer_rejects_bad_records_and_writes_nothing(tiny, tmp_path):
    lm, _, tok = tiny
    rm = reward_model_from_lm(lm)
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    bad = _toy_pairs(8) + [{"prompt": "Review Luigi's.", "chosen": "Good.", "rejected": "Good."}]
    with pytest.raises(ValueError, match="record 8: fields 'chosen' and 'rejected' are the same"):
        train_reward_model(rm, tok, bad, checkpoint_path=tmp_path / "c.pt", checkpoint_every=1, progress=False)
    with pytest.raises(ValueError, match="record 0: missing field 'rejected'"):
        train_reward_model(
            rm, tok, _toy_pairs(8), [{"prompt": "p", "chosen": "a"}], checkpoint_path=tmp_path / "c.pt", progress=False
        )
    assert not any(tmp_path.iterdir())
    for k, v in rm.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_reward_model_tiny_is_plain_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tmp_path))
    rm, tok = load_reward_model("tiny", device="cpu", progress=False)
    path = reward_model_path("tiny")
    assert (path / "COMPLETE.json").is_file() and not (path / "train_state.pt").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert type(plain).__name__ == "GPT2ForSequenceClassification" and plain.config.num_labels == 1
    s = reward_scores(rm, tok, PROMPTS, REPLIES)
    torch.testing.assert_close(reward_scores(plain, tok, PROMPTS, REPLIES), s)
    assert rm.config.reward_gain != 1.0  # normalised on reference samples
    again, _ = load_reward_model(str(path), device="cpu")  # a directory works too
    torch.testing.assert_close(reward_scores(again, tok, PROMPTS, REPLIES), s)
    with pytest.raises(ValueError, match="unknown reward model"):
        load_reward_model("no-such-model")


def test_the_books_pipeline_on_a_readers_prompts(tmp_path, monkeypatch):
    from rlhf_book.preferences import load_preference_data, preference_data_info

    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tmp_path))
    mine = [f"Describe the {t}." for t in ("garden", "museum", "bakery", "bridge", "library", "harbour")]
    used = []
    real = rm_mod._reference_replies

    def spy(lm, tok, prompts, *a):
        used.append(prompts)
        return real(lm, tok, prompts, *a)

    monkeypatch.setattr(rm_mod, "_reference_replies", spy)
    load_reward_model("tiny", device="cpu", progress=False, prompts=mine)
    assert reward_model_path("tiny", mine) != reward_model_path("tiny") and reward_model_path("tiny", mine).is_dir()
    assert not reward_model_path("tiny").exists()  # the book's reward model was not built on the way
    assert set(used[0]) == set(mine)  # normalised on replies to the reader's prompts
    data = load_preference_data("tiny", progress=False, prompts=mine)
    assert {r["prompt"] for split in data.values() for r in split} <= set(mine)
    info = rm_mod.reward_model_info("tiny", progress=False, prompts=mine)
    assert info["train_pairs"] == len(data["train"])
    assert preference_data_info("tiny", prompts=mine)["splits"]["train"]["pairs"] == len(data["train"])
    with pytest.raises(ValueError, match="prompts applies only to a preset"):
        load_reward_model(str(reward_model_path("tiny", mine)), prompts=mine)
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a non-empty string"):
        load_reward_model("tiny", prompts=[None, "a", "b"])


# ----------------------------------------------------------------------------- the cpu reward model


@pytest.mark.slow
def test_cpu_reward_model_beats_bound_on_gold_ordering():
    """The cached cpu reward model orders held-out pairs (test prompts never seen in training) like gold.

    Measured (RM_VERSION 2, seed 0; the build is deterministic on one machine): accuracy
    vs gold 0.867 on the 917 test pairs without a gold tie, vs the annotators' labels
    0.781 on all 1000; the labels themselves agree with gold on 0.876. Bounds, with about
    five points of margin for other platforms / library versions: > 0.82 vs gold,
    > 0.74 vs labels. An untrained (zero-head) model scores 0.5 on both.
    """
    from rlhf_book.preferences import load_preference_data

    rm, tok = load_reward_model("cpu", device="cpu")
    test = load_preference_data("cpu")["test"]
    ev = evaluate_preferences(rm, tok, test)
    assert ev["gold_pairs"] > 800
    assert ev["gold_accuracy"] > 0.82, ev
    assert ev["accuracy"] > 0.74, ev
    plain = AutoModelForSequenceClassification.from_pretrained(reward_model_path("cpu"))
    torch.testing.assert_close(score_pairs(plain, tok, test[:64]), score_pairs(rm, tok, test[:64]))
