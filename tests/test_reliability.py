"""No bad value, file or checkpoint poisons a run (defects D1-D9 of the reliability review of 2026-12-06).

D1 non-finite or malformed rewards, non-finite gradients and weights; D2 checkpoints that would run code;
D3 a refused resume that locked the run dir; D4 huge and over-long prompts; D5 prompt files of duplicates;
D6 corrupt safetensors; D7 file-system errors; D8 non-UTF-8 files; D9 the small ones.
"""

import copy
import json
import math
import os
import time
import warnings

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch

from rlhf_book.a2c import A2CConfig, A2CTrainer
from rlhf_book.checkpoint import load_checkpoint, save_checkpoint
from rlhf_book.cli import main, read_prompt_file
from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.rewards import check_scores

PROMPTS = ["Review the film Night Train.", "Tell me about the food at Maple House.", "How was the hotel?",
           "Review the album Blue Hour."]


def length_reward(prompts, responses, terminated):
    return torch.tensor([float(len(r)) for r in responses])


def _trainer(kind, tiny_world, reward_fn, gold_fn=None, **cfg):
    lm, tok = tiny_world
    policy, ref = copy.deepcopy(lm), copy.deepcopy(lm)
    common = dict(batch_size=4, max_new_tokens=6, progress=False, eval_every=0, checkpoint_every=1, **cfg)
    if kind == "ppo":
        return PPOTrainer(policy, ref, tok, reward_fn, PPOConfig(minibatch_size=2, **common), gold_fn=gold_fn)
    if kind == "a2c":
        return A2CTrainer(policy, ref, tok, reward_fn, A2CConfig(**common), gold_fn=gold_fn)
    return CriticFreeTrainer(policy, ref, tok, reward_fn, CriticFreeConfig(advantage="grpo", num_generations=2, **{
        **common, "batch_size": 2}), gold_fn=gold_fn)


def _batch(trainer):
    """Prompts for one step: 4 rows (GRPO: 2 prompts x 2 samples)."""
    return PROMPTS[:2] if isinstance(trainer, CriticFreeTrainer) else PROMPTS


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


# ------------------------------------------------------------------ D1: rewards, gradients, weights
@pytest.mark.parametrize("returned, message", [
    (lambda n: [1.0] * (n - 1) + [math.nan], r"reward_fn \(bad\) returned nan for row 3"),
    (lambda n: torch.tensor([1.0, math.inf] + [0.0] * (n - 2)), r"reward_fn \(bad\) returned inf for row 1"),
    (lambda n: ["1.0"] * n, r"reward_fn \(bad\) returned '1\.0' for row 0: scores must be finite numbers"),
    (lambda n: None, r"reward_fn \(bad\) must return 4 scores .*got NoneType"),
    (lambda n: [1.0] * (n + 1), r"reward_fn \(bad\) returned 5 scores for 4 responses"),
    (lambda n: "high", r"reward_fn \(bad\) must return 4 scores .*got str"),
])
@pytest.mark.parametrize("kind", ["ppo", "a2c", "grpo"])
def test_a_bad_reward_is_refused_before_any_update(tiny_world, kind, returned, message):
    def bad(prompts, responses, terminated):
        return returned(len(responses))

    trainer = _trainer(kind, tiny_world, bad)
    before = _weights(trainer)
    with pytest.raises(ValueError, match=message):
        trainer.step(_batch(trainer))
    after = _weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_nan_gold_score_is_named_too(tiny_world):
    def gold(prompts, responses, terminated):
        return [math.nan] * len(responses)

    trainer = _trainer("ppo", tiny_world, length_reward, gold_fn=gold)
    with pytest.raises(ValueError, match=r"gold_fn \(gold\) returned nan for row 0"):
        trainer.step(PROMPTS)
    with pytest.raises(ValueError, match=r"gold_fn \(gold\) returned nan"):
        trainer.evaluate(PROMPTS[:2])


def test_check_scores_accepts_the_valid_forms():
    import numpy as np

    expected = torch.tensor([1.0, 0.0])
    for ok in ([1, 0], [True, False], np.array([1.0, 0.0]), torch.tensor([[1.0], [0.0]]), torch.tensor([1, 0]),
               (1.0, 0.0), torch.tensor([1.0, 0.0], requires_grad=True)):
        out = check_scores(ok, 2)
        assert out.dtype == torch.float32 and torch.equal(out, expected), ok
    with pytest.raises(ValueError, match="meta"):
        check_scores(torch.zeros(2, device="meta"), 2)


@pytest.mark.parametrize("kind", ["ppo", "a2c", "grpo"])
def test_a_non_finite_gradient_skips_the_step_and_leaves_the_weights(tiny_world, kind):
    trainer = _trainer(kind, tiny_world, length_reward)
    before = _weights(trainer)
    p = trainer.actor_params[0]
    handle = p.register_hook(lambda g: g * math.nan)
    with pytest.warns(RuntimeWarning, match=r"gradient at iteration 1 is not finite.*skipped"):
        stats = trainer.step(_batch(trainer))
    handle.remove()
    assert trainer.skipped_steps >= 1 and not math.isfinite(stats["grad_norm"])
    after = _weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for s in trainer.optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))
    with warnings.catch_warnings():  # and the next iteration trains normally
        warnings.simplefilter("error", RuntimeWarning)
        assert math.isfinite(trainer.step(_batch(trainer))["grad_norm"])


def test_non_finite_weights_are_never_checkpointed_nor_resumed(tiny_world, tmp_path):
    trainer = _trainer("ppo", tiny_world, length_reward)
    trainer.train(PROMPTS, 1, checkpoint_dir=tmp_path)
    good = (tmp_path / "ppo_state.pt").read_bytes()
    with torch.no_grad():
        trainer.actor_params[0][0].fill_(math.nan)
    with pytest.raises(ValueError, match=r"not written: the weights are not finite"):
        trainer.save(tmp_path / "ppo_state.pt")
    assert (tmp_path / "ppo_state.pt").read_bytes() == good  # the last good checkpoint is kept
    state = trainer.state_dict()  # a poisoned checkpoint written by an older version
    save_checkpoint(tmp_path / "poisoned" / "ppo_state.pt", **state)
    fresh = _trainer("ppo", tiny_world, length_reward)
    with pytest.raises(ValueError, match=r"cannot resume, the checkpoint's weights are not finite"):
        fresh.train(PROMPTS, 2, checkpoint_dir=tmp_path / "poisoned")


# ------------------------------------------------------------------ D2: checkpoints never run code
class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running(tmp_path, tiny_world):
    target = str(tmp_path / "CODE_RAN")
    torch.save({"model": _Payload(target)}, tmp_path / "ppo_state.pt")
    with pytest.raises(ValueError, match=r"refused: .*posix\.mkdir.*nothing in it was executed"):
        load_checkpoint(tmp_path / "ppo_state.pt")
    trainer = _trainer("ppo", tiny_world, length_reward)
    with pytest.raises(ValueError, match="refused"):
        trainer.train(PROMPTS, 1, checkpoint_dir=tmp_path)
    assert not os.path.exists(target)


def test_a_real_checkpoint_loads_as_plain_data(tiny_world, tmp_path):
    trainer = _trainer("ppo", tiny_world, length_reward)
    trainer.train(PROMPTS, 1, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "ppo_state.pt", weights_only=True)  # what load_checkpoint does
    assert state["iteration"] == 1 and isinstance(state["rng"]["numpy"][1], list)


def test_a_checkpoint_of_version_0_1_still_loads(tmp_path):
    import numpy as np

    np.random.seed(3)
    old_state = np.random.get_state()  # 0.1 stored this tuple, with its NumPy array, as it was
    torch.save({"rng": {"numpy": old_state}, "iteration": 2}, tmp_path / "old.pt")
    state = load_checkpoint(tmp_path / "old.pt")
    assert state["iteration"] == 2 and np.array_equal(state["rng"]["numpy"][1], old_state[1])


# ------------------------------------------------------------------ the command line (D3-D9)
@pytest.fixture
def tiny_cli(tiny_artifacts, tiny_cache_dir, monkeypatch, tmp_path):
    """A tiny PPO config in tmp_path, run against the session's tiny cache; returns a function writing it."""
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tiny_cache_dir))

    def write(name="cfg.toml", ppo="", **pipeline):
        pipe = {"preset": "tiny", "iterations": 1, "out_dir": str(tmp_path / "run"), "n_eval": 2, "n_samples": 1,
                "gold": False}
        pipe.update(pipeline)
        text = "[pipeline]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in pipe.items())
        text += "[ppo]\nbatch_size = 2\nminibatch_size = 2\nmax_new_tokens = 6\neval_every = 0\n" + ppo
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def _run(args, capsys):
    code = main(["pipeline", *args, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_refused_resume_does_not_lock_the_run_dir(tiny_cli, tmp_path, capsys):
    cfg = tiny_cli()
    assert _run(["--config", cfg], capsys)[0] == 0
    (tmp_path / "run" / "run_config.json").unlink()  # a checkpoint without its record (API-made, copied)
    code, _, err = _run(["--config", cfg, "--ppo.lr", "5e-4", "--iterations", "2"], capsys)
    assert code == 2 and "lr: 0.0001 -> 0.0005" in err
    assert not (tmp_path / "run" / "run_config.json").exists()  # checked before anything is written
    code, out, err = _run(["--config", cfg, "--iterations", "2"], capsys)  # the original config still resumes
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["iterations"] == 2


def test_a_changed_reward_without_run_config_is_refused(tiny_cli, tmp_path, capsys):
    cfg = tiny_cli()
    assert _run(["--config", cfg], capsys)[0] == 0
    (tmp_path / "run" / "run_config.json").unlink()
    code, _, err = _run(["--config", cfg, "--pipeline.reward", "gold", "--iterations", "2"], capsys)
    assert code == 2 and "[pipeline] reward: 'model' -> 'gold'" in err


def test_fewer_iterations_than_a_finished_run_says_so(tiny_cli, capsys):
    cfg = tiny_cli(iterations=2)
    assert _run(["--config", cfg], capsys)[0] == 0
    code, out, _ = _run(["--config", cfg, "--iterations", "1"], capsys)
    assert code == 0 and "holds a finished run of 2 iterations, more than the 1 asked for" in out


def _prompt_file(tmp_path, lines, name="p.txt", data=None):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_huge_prompt_line_fails_at_once_naming_file_and_line(tiny_cli, tmp_path, capsys):
    lines = [f"Review the film number {i}." for i in range(26)]
    lines.insert(5, "word " * 2_000_000)  # 10 MB
    path = _prompt_file(tmp_path, lines)
    t0 = time.perf_counter()
    code, out, err = _run(["--config", tiny_cli(prompts=str(path))], capsys)
    assert code == 2 and f"{path} line 6: 10,000,000 characters, longer than the 100,000" in err
    assert "[1/3]" not in out and time.perf_counter() - t0 < 30


def test_an_over_long_prompt_names_file_line_and_limit(tiny_cli, tmp_path, capsys):
    lines = [f"Review the film number {i}." for i in range(6)] + ["Review " + "the film " * 300]
    path = _prompt_file(tmp_path, lines)
    code, out, err = _run(["--config", tiny_cli(prompts=str(path))], capsys)
    assert code == 2 and f"{path} line 7: the prompt is" in err and "allows at most" in err
    assert "[2/3]" not in out  # before the preference stage


def test_a_prompt_file_of_duplicates_fails_early(tiny_cli, tmp_path, capsys):
    path = _prompt_file(tmp_path, ["Review the film Night Train."] * 2)
    code, out, err = _run(["--config", tiny_cli(prompts=str(path))], capsys)
    assert code == 2 and f"{path}: needs at least 2 distinct prompts" in err and "duplicates removed" in err
    assert "[1/3]" not in out


@pytest.mark.parametrize("name, data, message", [
    ("p.txt", b"Review the film.\nR\xe9view the hotel.\n", r"p\.txt line 2: the prompt file is not valid UTF-8 \(byte 0xe9"),
    ("p.txt", bytes(range(128, 256)) * 8, r"p\.txt line 1: the prompt file is not valid UTF-8"),
    ("p.jsonl", '\ufeff{"prompt": "Review A."}\n{"prompt": "Review B."}\n'.encode(), None),
    ("p.jsonl", b'{"prompt": "Review A."}\n\n\n{"text": "Review B."}\n', r"p\.jsonl line 4: missing field 'prompt'"),
    ("p.jsonl", b'{"prompt": "Review A."}\n\n{"prompt": \n', r"p\.jsonl line 3: not valid JSON"),
])
def test_prompt_files_name_file_and_line(tmp_path, name, data, message):
    path = _prompt_file(tmp_path, None, name, data)
    if message is None:  # a BOM is read the same in every reader
        assert read_prompt_file(path) == ["Review A.", "Review B."]
        return
    with pytest.raises(ValueError, match=message) as e:
        read_prompt_file(path)
    assert str(e.value).count(str(path)) == 1  # named once


@pytest.mark.parametrize("data, suffix", [(b"[pipeline]\n# caf\xe9\npreset = 'tiny'\n", ".toml"),
                                          (bytes(range(200, 256)), ".toml"), (b'{"pipeline": "\xe9"}', ".json")])
def test_a_non_utf8_config_names_the_file(tmp_path, capsys, data, suffix):
    path = tmp_path / f"cfg{suffix}"
    path.write_bytes(data)
    code, _, err = _run(["--config", str(path)], capsys)
    assert code == 2 and f"{path} line" in err and "not valid UTF-8" in err


# ------------------------------------------------------------------ D6: corrupt weights
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_corrupt_safetensors_name_the_path(tiny_artifacts, tmp_path, tmp_cache):
    import shutil

    from rlhf_book.base_model import load_base_model
    from rlhf_book.reward_model import load_reward_model

    for kind, loader in (("base", load_base_model), ("rm", load_reward_model)):
        d = tmp_path / kind
        shutil.copytree(tiny_artifacts[kind], d)
        _truncate(d / "model.safetensors")
        with pytest.raises(ValueError, match=rf"cannot load the (reward )?model in {d}: .*save"):
            loader(str(d), device="cpu")
    # inside the cache: the advice to delete the folder and rebuild
    name = tiny_artifacts["base"].name
    shutil.copytree(tiny_artifacts["base"], tmp_cache / name)
    _truncate(tmp_cache / name / "model.safetensors")
    with pytest.raises(ValueError, match=rf"cached base LM 'tiny' at .*{name} does not load .*Delete that folder"):
        load_base_model("tiny", device="cpu", progress=False)


# ------------------------------------------------------------------ D7: the file system
def test_out_dir_that_is_a_file_or_under_one(tiny_cli, tmp_path, capsys):
    (tmp_path / "outfile").write_text("x")
    for out in (tmp_path / "outfile", tmp_path / "outfile" / "sub"):
        code, _, err = _run(["--config", tiny_cli(), "--out", str(out)], capsys)
        assert code == 2 and f"{tmp_path / 'outfile'} is a file, not a directory" in err


def test_a_cache_that_is_a_file(tiny_cli, tmp_path, capsys, monkeypatch):
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tmp_path / "cachefile"))
    code, _, err = _run(["--config", tiny_cli()], capsys)
    assert code == 2 and "cachefile ($RLHF_BOOK_CACHE) is a file, not a directory" in err


def test_metrics_file_that_is_a_directory(tiny_cli, tmp_path, capsys):
    (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)
    code, _, err = _run(["--config", tiny_cli()], capsys)
    assert code == 2 and "metrics.jsonl is a directory" in err
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_a_full_disk_during_a_checkpoint_write(tiny_world, tmp_path, monkeypatch):
    trainer = _trainer("ppo", tiny_world, length_reward)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # what torch raises when the disk fills mid-write
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 292928 vs 292820")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"ppo_state\.pt: the checkpoint could not be written .*no space left on device"):
        trainer.train(PROMPTS, 1, checkpoint_dir=tmp_path)
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "ppo_state.pt").exists()


def test_the_cli_reports_a_file_system_error_in_one_line(tiny_cli, tmp_path, capsys, monkeypatch):
    import errno

    from rlhf_book import trainer as trainer_module

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(trainer_module, "write_metrics", read_only)
    code, _, err = _run(["--config", tiny_cli()], capsys)
    assert code == 2 and err.strip().endswith("metrics.jsonl: Read-only file system")
    assert "Traceback" not in err
