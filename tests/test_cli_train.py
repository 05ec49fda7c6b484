"""`rlhf-book train ALGO` runs every algorithm from a config file: the shipped tiny configs in the book's world, and a
tiny random Llama-style local model with a `module:function` reward, JSONL prompts / pairs / SFT records and LoRA.
Resume and refusal rules hold for every algorithm."""

import json
from pathlib import Path

import pytest

import rlhf_book  # noqa: F401  (before torch)
from rlhf_book.cli import ALGORITHMS, ON_POLICY, load_config, load_function, main

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = [a for a in ALGORITHMS if a not in ON_POLICY]


def _run(argv, capsys):
    code = main([*argv, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _summary(out: str) -> dict:
    return json.loads(out[out.index("{"):])


@pytest.fixture
def book_world(tiny_artifacts, tiny_cache_dir, monkeypatch):
    """The session's tiny base LM, preference data and reward model as the cache."""
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tiny_cache_dir))


# ------------------------------------------------------------------ the shipped configs, in the book's world
def test_every_algorithm_has_a_tiny_config_and_options(capsys):
    for name, spec in ALGORITHMS.items():
        cfg = load_config(ROOT / "configs" / f"{name}_tiny.toml", algorithm=name)
        assert spec.section in cfg
        assert main(["options", name]) == 0
        out = capsys.readouterr().out
        assert f"[{spec.section}]" in out and "batch_size" in out
    assert main(["options", "grpo"]) == 0
    assert 'advantage = "grpo"   (fixed by the algorithm' in capsys.readouterr().out


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_the_tiny_config_runs(book_world, tmp_path, capsys, name):
    out = tmp_path / "run"
    short = ["--iterations", "2"] if name in ON_POLICY else (["--epochs", "0.5"] if name != "reward" else [])
    code, stdout, err = _run(["train", name, "--config", str(ROOT / "configs" / f"{name}_tiny.toml"),
                              "--out", str(out), *short], capsys)
    assert code == 0, err
    summary = _summary(stdout)
    spec = ALGORITHMS[name]
    assert (out / spec.checkpoint).is_file() and (out / "run_config.json").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if name == "reward":
        assert (out / "reward_model" / "config.json").is_file() and summary["steps"] == 2
        assert summary["normalization"]["n"] == 64
        return
    assert (out / "policy" / "config.json").is_file() and (out / "samples.jsonl").is_file()
    steps = summary["iterations"] if name in ON_POLICY else summary["steps"]
    assert steps == 2 and [r["step"] for r in rows] == [0, 1, 2]
    assert summary["eval_gold_reward_end"] is not None and summary["eval_proxy_reward_end"] is not None
    if name in OFFLINE:
        assert "val_loss_end" in summary


def test_pipeline_takes_every_on_policy_algorithm_and_refuses_the_others(book_world, tmp_path, capsys):
    code, _, err = _run(["pipeline", "--config", str(ROOT / "configs" / "grpo_tiny.toml"), "--out", str(tmp_path / "g"),
                         "--iterations", "1"], capsys)
    assert code == 0, err
    assert (tmp_path / "g" / "grpo_state.pt").is_file()
    code, _, err = _run(["pipeline", "--config", str(ROOT / "configs" / "dpo_tiny.toml")], capsys)
    assert code == 2 and "rlhf-book train dpo" in err
    code, _, err = _run(["train", "a2c", "--config", str(ROOT / "configs" / "grpo_tiny.toml")], capsys)
    assert code == 2 and "[run] algorithm = 'grpo' but the command says 'a2c'" in err
    code, _, err = _run(["train", "grpo", "--config", str(ROOT / "configs" / "grpo_tiny.toml"), "--grpo.advantage",
                         "'rloo'"], capsys)
    assert code == 2 and "advantage = 'rloo' contradicts the algorithm 'grpo'" in err


# ------------------------------------------------------------------ any local model
REWARD_MODULE = '''
def length_reward(prompts, responses, terminated):
    """A reward of the text: longer replies that ended score higher."""
    return [len(r) / 10 + float(t) for r, t in zip(responses, terminated)]

not_a_function = 3
'''
CITIES = ["Oslo", "Lima", "Cairo", "Perth", "Quito", "Riga"]


@pytest.fixture(scope="module")
def llama_world(tmp_path_factory):
    """A tiny random Llama-style bf16 model dir, a reward module, and JSONL prompts, pairs and SFT records."""
    import torch

    from rlhf_book.testing import save_tiny_model

    d = tmp_path_factory.mktemp("llama_world")
    save_tiny_model(d / "model", "llama", dtype=torch.bfloat16, hidden=32, layers=1)
    (d / "my_reward.py").write_text(REWARD_MODULE)

    def chat(city):
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Weather in {city}?"}]

    prompts = [{"prompt": chat(c)} for c in CITIES] + [{"prompt": f"Describe {c}."} for c in CITIES]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    pairs = [{"prompt": chat(c), "chosen": f"Sunny in {c}.", "rejected": "Rain."} for c in CITIES]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    sft = [{"prompt": chat(c), "completion": f"It is sunny in {c}."} for c in CITIES[:3]]
    sft += [{"messages": [*chat(c), {"role": "assistant", "content": f"Rain in {c}."}]} for c in CITIES[3:]]
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return d


ALGO_FIELDS = {
    "sft": "batch_size = 4\nmax_new_tokens = 6\n",
    "reward": "batch_size = 4\ncheckpoint_every = 1\n",
    "ppo": "batch_size = 2\nminibatch_size = 2\nppo_epochs = 1\nmax_new_tokens = 6\n",
    "a2c": "batch_size = 2\nmax_new_tokens = 6\n",
    "reinforce": "batch_size = 2\nnum_generations = 1\nmax_new_tokens = 6\n",
    "rloo": "batch_size = 2\nnum_generations = 2\nmax_new_tokens = 6\n",
    "grpo": "batch_size = 2\nnum_generations = 2\nmax_new_tokens = 6\nlr = 1e-3\n",
    "dpo": "batch_size = 4\nmax_new_tokens = 6\nlr = 1e-3\n",
}
LORA = {"grpo", "dpo", "reward"}


def _llama_config(world: Path, tmp_path: Path, name: str, reward: str | None = None, lora: bool = False) -> Path:
    section = ALGORITHMS[name].section
    text = (f'[run]\nalgorithm = "{name}"\niterations = 1\nepochs = 1\nout_dir = {json.dumps(str(tmp_path / "run"))}\n'
            f'n_samples = 2\n'
            f'[model]\npath = {json.dumps(str(world / "model"))}\ndtype = "bfloat16"\n'
            + ('lora = {r = 4, alpha = 8, target_modules = ["q_proj", "v_proj"]}\n' if lora else "")
            + f'[data]\nprompts = {json.dumps(str(world / "prompts.jsonl"))}\n'
              f'preferences = {json.dumps(str(world / "pairs.jsonl"))}\nsft = {json.dumps(str(world / "sft.jsonl"))}\n'
              f'n_eval = 2\n'
            + f'[reward]\nsource = {json.dumps(reward or str(world / "my_reward.py") + ":length_reward")}\n'
            + f"[{section}]\n{ALGO_FIELDS[name]}"
            + ("eval_every = 1\ncheckpoint_every = 1\n" if name != "reward" else ""))
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_on_a_local_llama_resumes_and_refuses_a_changed_config(llama_world, tmp_path, capsys, name,
                                                                               monkeypatch, no_book_world):
    lora = name in LORA
    if lora:
        pytest.importorskip("peft")
    monkeypatch.chdir(llama_world)  # the reward is named as module:function, found in the working directory
    reward = "my_reward:length_reward" if name in ("ppo", "rloo") else None
    cfg = str(_llama_config(llama_world, tmp_path, name, reward, lora))
    section, out, spec = ALGORITHMS[name].section, tmp_path / "run", ALGORITHMS[name]
    more = "--iterations" if name in ON_POLICY else "--epochs"
    code, _, err = _run(["train", name, "--config", cfg], capsys)
    assert code == 0, err
    first = json.loads((out / "history.json").read_text())
    # resumed with one more iteration (epoch): the run continues from its checkpoint
    code, _, err = _run(["train", name, "--config", cfg, more, "2"], capsys)
    assert code == 0, err
    history = json.loads((out / "history.json").read_text())
    assert history[: len(first)] == first and history[-1]["step"] == 2 * first[-1]["step"]
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [h["step"] for h in history]
    if name == "reward":
        from rlhf_book import load_reward_model

        rm, _ = load_reward_model(str(out / "reward_model"), device="cpu")
        assert rm.config.num_labels == 1 and not any("lora" in k for k in rm.state_dict())
    else:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(out / "policy")  # merged when LoRA: no peft needed
        assert plain.config.model_type == "llama" and not any("lora" in k for k in plain.state_dict())
        assert (out / "policy" / "adapter").is_dir() == lora
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 2 and ("proxy" in samples[0]) == (name in ON_POLICY or name in ("sft", "dpo"))
    # a changed learning rate is refused, naming it, and nothing is written
    record, ckpt = (out / "run_config.json").read_bytes(), (out / spec.checkpoint).stat().st_mtime_ns
    code, _, err = _run(["train", name, "--config", cfg, more, "3", f"--{section}.lr", "0.5"], capsys)
    assert code == 2 and f"[{section}] lr: " in err and "-> 0.5" in err and "--out" in err
    assert (out / "run_config.json").read_bytes() == record and (out / spec.checkpoint).stat().st_mtime_ns == ckpt


def test_a_reward_model_dir_is_a_reward(llama_world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(llama_world)
    rm_run = tmp_path / "rm"
    rm_run.mkdir()
    assert _run(["train", "reward", "--config", str(_llama_config(llama_world, rm_run, "reward"))], capsys)[0] == 0
    cfg = _llama_config(llama_world, tmp_path, "ppo", reward=str(rm_run / "run" / "reward_model"))
    code, stdout, err = _run(["train", "ppo", "--config", str(cfg)], capsys)
    assert code == 0, err
    assert _summary(stdout)["eval_proxy_reward_end"] is not None


@pytest.mark.parametrize("source, message", [
    ("no_such_module:f", r"\[reward\] source = 'no_such_module:f': cannot import 'no_such_module' \(ModuleNotFoundError"),
    ("my_reward:lenght_reward", r"'my_reward' has no 'lenght_reward'; did you mean 'lenght_reward' -> 'length_reward'"),
    ("my_reward:not_a_function", r"'not_a_function' is a int, not a function"),
    ("missing.py:f", r"no such file missing\.py"),
    ("nothing", r"not 'model', 'gold', an existing reward-model directory nor a Python function"),
])
def test_a_reward_function_that_cannot_be_used_is_named(llama_world, tmp_path, capsys, monkeypatch, source, message):
    monkeypatch.chdir(llama_world)
    cfg = _llama_config(llama_world, tmp_path, "grpo", reward=source)
    with pytest.raises(ValueError, match=message):
        load_config(cfg)
    assert _run(["train", "grpo", "--config", str(cfg)], capsys)[0] == 2
    assert not (tmp_path / "run").exists()


def test_a_file_reward_function_and_missing_data_are_checked(llama_world, tmp_path):
    fn = load_function(f"{llama_world / 'my_reward.py'}:length_reward")
    assert fn(["p"], ["abc"], [True]) == [1.3]
    cfg = _llama_config(llama_world, tmp_path, "grpo")
    cfg.write_text(cfg.read_text().replace("[data]\nprompts", "[data]\nprompts_unused"))
    with pytest.raises(ValueError, match=r"unknown \[data\] key\(s\) \['prompts_unused'\]"):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace("prompts_unused = ", "# "))
    with pytest.raises(ValueError, match=r"\[data\] prompts: grpo needs a prompt file when the model is not a preset"):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace('dtype = "bfloat16"', 'dtype = "bf17"'))
    with pytest.raises(ValueError, match=r"\[model\] dtype must be 'auto'"):
        load_config(cfg)
