"""No kill, truncated file or changed config leaves a reader stuck: builds recover, runs refuse clearly."""

import copy
import json
import os
import warnings

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch

from rlhf_book import base_model as bm
from rlhf_book import cache as cache_mod
from rlhf_book import preferences as prefs_mod
from rlhf_book import reward_model as rm_mod
from rlhf_book.base_model import PRESETS, load_base_model
from rlhf_book.checkpoint import load_checkpoint, save_checkpoint
from rlhf_book.corpus import prompt_split
from rlhf_book.gold import gold_reward_fn
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.trainer import read_metrics

TRAIN, EVAL = prompt_split(0)


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    """The tiny base LM built without interruption (builds are deterministic)."""
    d = tmp_path_factory.mktemp("ref_cache")
    os.environ["RLHF_BOOK_CACHE"] = str(d)
    try:
        model, _ = load_base_model("tiny", device="cpu", progress=False)
    finally:
        os.environ.pop("RLHF_BOOK_CACHE")
    return _weights(model)


def _partial(root):
    return root / f".{bm.artifact_name('tiny', PRESETS['tiny'])}.partial"


# ------------------------------------------------------------------ the base-LM build, killed at each save point
def test_killed_while_saving_the_tokenizer(tmp_cache, monkeypatch, reference_weights):
    real = bm.save_tokenizer

    def save_half_then_die(tok, directory, *a, **k):
        real(tok, directory, *a, **k)
        (directory / "tokenizer.json").write_text("{")  # cut off mid-write
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(bm, "save_tokenizer", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_base_model("tiny", device="cpu", progress=False)
    assert not (_partial(tmp_cache) / "tokenizer").exists()  # only the temporary folder holds the half-save
    monkeypatch.setattr(bm, "save_tokenizer", real)
    model, _ = load_base_model("tiny", device="cpu", progress=False)
    assert torch.equal(_weights(model), reference_weights)


@pytest.mark.parametrize("damage", ["empty", "config_only", "truncated_json"])
def test_a_broken_tokenizer_folder_is_retrained(tmp_cache, reference_weights, damage):
    """What older versions could leave (a kill inside ``save_pretrained``): the next build must not be stuck."""
    tok_dir = _partial(tmp_cache) / "tokenizer"
    tok_dir.mkdir(parents=True)
    if damage != "empty":
        (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    if damage == "truncated_json":
        (tok_dir / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    model, tok = load_base_model("tiny", device="cpu", progress=False)
    assert torch.equal(_weights(model), reference_weights) and tok.pad_token_id == 0


@pytest.mark.parametrize("cut", ["half", "zero"])
def test_a_truncated_build_checkpoint_is_discarded(tmp_cache, monkeypatch, kill_after_first_checkpoint, reference_weights, cut):
    kill_after_first_checkpoint(bm, lambda: load_base_model("tiny", device="cpu", progress=False))
    ckpt = _partial(tmp_cache) / "train_state.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if cut == "half" else b"")
    with pytest.warns(RuntimeWarning, match="train_state.pt: the checkpoint cannot be read.*Discarding it"):
        model, _ = load_base_model("tiny", device="cpu", progress=False)
    assert torch.equal(_weights(model), reference_weights)


def test_killed_after_saving_before_the_marker_does_not_retrain(tmp_cache, monkeypatch, kill_before_rename):
    with pytest.raises(KeyboardInterrupt):
        load_base_model("tiny", device="cpu", progress=False)
    kill_before_rename()  # undone: the next call may rename
    monkeypatch.setattr(bm, "lm_loss", lambda *a, **k: pytest.fail("the finished model was trained again"))
    model, tok = load_base_model("tiny", device="cpu", progress=False)
    assert (bm.base_model_path("tiny") / "COMPLETE.json").is_file() and tok.padding_side == "left"


def test_a_truncated_reward_model_checkpoint_is_discarded(tmp_cache, monkeypatch, kill_after_first_checkpoint):
    load_base_model("tiny", device="cpu", progress=False)
    kill_after_first_checkpoint(rm_mod, lambda: rm_mod.load_reward_model("tiny", device="cpu", progress=False))
    ckpt = tmp_cache / f".{rm_mod.artifact_name('tiny')}.partial" / "train_state.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="Discarding it"):
        rm, _ = rm_mod.load_reward_model("tiny", device="cpu", progress=False)
    assert rm.config.num_labels == 1


# ------------------------------------------------------------------ cache keys and location
def test_every_artifact_key_follows_its_recipe_and_its_inputs(monkeypatch):
    base, prefs, rm = bm.artifact_name("tiny", PRESETS["tiny"]), prefs_mod.preference_data_key("tiny"), rm_mod.artifact_name("tiny")
    assert len({base, prefs, rm}) == 3 and all("-tiny-" in k for k in (base, prefs, rm))
    # a change to the preference data recipe gives new preference data and a new reward model, same base LM
    recipe = prefs_mod.PREFERENCE_RECIPES["tiny"]
    monkeypatch.setitem(prefs_mod.PREFERENCE_RECIPES, "tiny", type(recipe)(**{**recipe.__dict__, "n_train": 65}))
    assert bm.artifact_name("tiny", PRESETS["tiny"]) == base
    assert prefs_mod.preference_data_key("tiny") != prefs and rm_mod.artifact_name("tiny") != rm
    monkeypatch.undo()
    monkeypatch.setattr(prefs_mod, "PREFERENCE_VERSION", prefs_mod.PREFERENCE_VERSION + 1)
    assert rm_mod.artifact_name("tiny") != rm
    monkeypatch.undo()
    # a change to the base LM's recipe changes everything built on it
    monkeypatch.setitem(PRESETS, "tiny", type(PRESETS["tiny"])(**{**PRESETS["tiny"].__dict__, "steps": 41}))
    assert bm.artifact_name("tiny", PRESETS["tiny"]) != base
    assert prefs_mod.preference_data_key("tiny") != prefs and rm_mod.artifact_name("tiny") != rm


def test_a_relative_cache_path_is_made_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLHF_BOOK_CACHE", "my-cache")
    root = cache_mod.cache_dir()
    assert root == tmp_path / "my-cache" and os.environ["RLHF_BOOK_CACHE"] == str(tmp_path / "my-cache")
    monkeypatch.chdir(tmp_path / "my-cache")  # e.g. a notebook kernel started in chapters/
    assert cache_mod.cache_dir() == root


# ------------------------------------------------------------------ training runs
def _trainer(world, **overrides):
    model, tok = world
    kw = dict(batch_size=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=8, eval_every=2, checkpoint_every=2,
              progress=False)
    kw.update(overrides)
    return PPOTrainer(copy.deepcopy(model), copy.deepcopy(model), tok, gold_reward_fn, PPOConfig(**kw), gold_fn=gold_reward_fn)


def test_save_checkpoint_fsyncs_before_replacing(tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    save_checkpoint(tmp_path / "x.pt", step=1)
    assert order[:2] == ["fsync", "replace"] and load_checkpoint(tmp_path / "x.pt")["step"] == 1


@pytest.mark.parametrize("cut", ["half", "zero"])
def test_a_truncated_run_checkpoint_names_the_file_and_the_fix(tiny_world, tmp_path, cut):
    _trainer(tiny_world).train(TRAIN, 2, checkpoint_dir=tmp_path)
    ckpt = tmp_path / "ppo_state.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if cut == "half" else b"")
    with pytest.raises(ValueError, match=r"ppo_state.pt: the checkpoint cannot be read .*Delete it to start over"):
        _trainer(tiny_world).train(TRAIN, 4, checkpoint_dir=tmp_path)


def test_a_changed_config_is_refused_on_resume(tiny_world, tmp_path):
    _trainer(tiny_world).train(TRAIN, 2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume.*kl_coef: 0\.05 -> 0\.5; lr: 0\.0001 -> 0\.05"):
        _trainer(tiny_world, lr=5e-2, kl_coef=0.5).train(TRAIN, 4, checkpoint_dir=tmp_path)
    # what only changes display or bookkeeping may change
    tr = _trainer(tiny_world, progress=True, checkpoint_every=1)
    tr.train(TRAIN, 3, checkpoint_dir=tmp_path, progress=False)
    assert tr.iteration == 3


def test_a_resume_with_another_thread_count_warns(tiny_world, tmp_path):
    _trainer(tiny_world).train(TRAIN, 2, checkpoint_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trainer(tiny_world).train(TRAIN, 3, checkpoint_dir=tmp_path)  # same count: silent
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        with pytest.warns(RuntimeWarning, match="not bit for bit"):
            _trainer(tiny_world).train(TRAIN, 4, checkpoint_dir=tmp_path)
    finally:
        torch.set_num_threads(before)


def test_metrics_are_on_disk_after_a_killed_run(tiny_world, tmp_path):
    tr = _trainer(tiny_world, checkpoint_every=2)
    real_step = tr.step

    def step_then_die(prompts):
        if tr.iteration == 3:
            raise KeyboardInterrupt("killed")
        return real_step(prompts)

    tr.step = step_then_die
    with pytest.raises(KeyboardInterrupt):
        tr.train(TRAIN, 10, checkpoint_dir=tmp_path, eval_prompts=EVAL[:4])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and "eval_gold_reward" in rows[0]
    # the resumed run drops the row the checkpoint (iteration 2) does not cover, then goes on
    tr2 = _trainer(tiny_world, checkpoint_every=2)
    history = tr2.train(TRAIN, 4, checkpoint_dir=tmp_path, eval_prompts=EVAL[:4])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows == json.loads(json.dumps(history))


def test_the_exported_policy_loads_in_plain_transformers(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tr = _trainer(tiny_world, lr=1e-2)
    tr.train(TRAIN, 2)
    tr.export(tmp_path / "policy")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert torch.equal(_weights(plain), _weights(tr.lm))
    assert not torch.equal(_weights(plain), _weights(tiny_world[0]))  # the trained weights, not the start
    tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    assert tok.padding_side == "left" and tok.model_max_length == plain.config.n_positions
    tr.export(tmp_path / "policy")  # exporting again replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
