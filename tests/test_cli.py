"""The command line runs the whole pipeline end to end on the tiny preset, and resumes."""

import json
import subprocess
import sys
from pathlib import Path

import rlhf_book  # noqa: F401  (before torch)
import pytest

from rlhf_book.cli import PIPELINE_DEFAULTS, load_config, main

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, **pipeline):
    pipe = {"preset": "tiny", "iterations": 2, "out_dir": str(tmp_path / "run"), "n_eval": 6, "n_samples": 3}
    pipe.update(pipeline)
    text = "[pipeline]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in pipe.items())
    text += "[ppo]\nbatch_size = 6\nminibatch_size = 3\nmax_new_tokens = 10\neval_every = 1\ncheckpoint_every = 1\n"
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_pipeline_end_to_end_and_resume(tmp_cache, tmp_path):
    cfg = _config(tmp_path, critic="reward_model")
    assert main(["pipeline", "--config", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "run"
    for name in ("run_config.json", "metrics.jsonl", "history.json", "diagnostics.png", "samples.jsonl", "summary.json", "ppo_state.pt"):
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2]
    assert {"proxy_reward", "gold_reward", "kl", "kl_k3", "beta", "clipfrac", "approx_kl", "entropy", "value_loss",
            "explained_variance", "response_length", "eval_gold_reward"} <= set(history[-1])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and {"prompt", "response", "proxy", "gold"} <= set(samples[0])
    # the same command with more iterations continues the run instead of starting again
    assert main(["pipeline", "--config", str(cfg), "--iterations", "3", "--no-progress"]) == 0
    history2 = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history2] == [0, 1, 2, 3]
    assert history2[:3] == history
    # the trained policy is exported in HF format; the run's own config does not take HF's file name
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "policy").config.model_type == "gpt2"
    assert not (out / "config.json").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_a_changed_config_names_what_changed(tmp_cache, tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["pipeline", "--config", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    text = cfg.read_text()
    cfg.write_text(text.replace("batch_size = 6", "batch_size = 6\nlr = 0.05\nkl_coef = 0.5"))
    assert main(["pipeline", "--config", str(cfg), "--iterations", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "[ppo] kl_coef: 0.05 -> 0.5" in err and "[ppo] lr: 0.0001 -> 0.05" in err and "--out" in err
    cfg.write_text(text.replace('preset = "tiny"', 'preset = "cpu"'))
    assert main(["pipeline", "--config", str(cfg), "--iterations", "3", "--no-progress"]) == 2
    assert "[pipeline] preset: 'tiny' -> 'cpu'" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)
        if "pipeline" in cfg:  # the book's-world layout
            assert set(cfg["pipeline"]) == set(PIPELINE_DEFAULTS), path
        else:  # [run], [model], [data], [reward] and the algorithm's table
            assert {"run", "model", "data", "reward"} <= set(cfg), path


def test_bad_config_is_reported(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[pipeline]\npreset = 'tiny'\n[ppo]\nclip_rnage = 0.2\n")
    assert main(["pipeline", "--config", str(path)]) == 2
    assert "clip_rnage" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "rlhf_book.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "pipeline" in r.stdout


def test_a2c_on_the_readers_prompts_with_overrides(tmp_cache, tmp_path, capsys):
    prompts = tmp_path / "my_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Review the film Night Train, part {i}."}) + "\n" for i in range(12)))
    cfg = tmp_path / "a2c.toml"
    cfg.write_text(f"[pipeline]\npreset = 'tiny'\nalgorithm = 'a2c'\nprompts = {json.dumps(str(prompts))}\n"
                   f"iterations = 2\nn_eval = 4\nn_samples = 2\ngold = false\nout_dir = {json.dumps(str(tmp_path / 'run'))}\n"
                   "[a2c]\nbatch_size = 4\nmax_new_tokens = 8\n")
    assert main(["pipeline", "--config", str(cfg), "--no-progress", "--a2c.kl_coef", "0.2",
                 "--pipeline.critic", "separate"]) == 0
    out = tmp_path / "run"
    record = json.loads((out / "run_config.json").read_text())
    assert record["a2c"]["kl_coef"] == 0.2 and record["a2c"]["critic"] == "separate"
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2] and (out / "a2c_state.pt").exists()
    assert "gold_reward" not in history[-1] and "eval_gold_reward" not in history[-1]  # gold = false: none logged
    train_and_eval = {json.loads(line)["prompt"] for line in prompts.read_text().splitlines()}
    assert {s["prompt"] for s in map(json.loads, (out / "samples.jsonl").read_text().splitlines())} <= train_and_eval
    # the run is refused when an override changes it, naming the table and the field
    capsys.readouterr()
    assert main(["pipeline", "--config", str(cfg), "--no-progress", "--a2c.kl_coef", "0.3",
                 "--pipeline.critic", "separate"]) == 2
    assert "[a2c] kl_coef: 0.2 -> 0.3" in capsys.readouterr().err
    # what only changes what is shown or saved may change: the run continues
    assert main(["pipeline", "--config", str(cfg), "--no-progress", "--a2c.kl_coef", "0.2", "--a2c.eval_every", "1",
                 "--pipeline.critic", "separate", "--iterations", "3"]) == 0
    assert [h["step"] for h in json.loads((out / "history.json").read_text())] == [0, 1, 2, 3]
