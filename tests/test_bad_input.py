"""Every kind of bad input gets an error that names the argument, field or file and what was expected."""

import json
import math
import time

import rlhf_book  # noqa: F401  (before torch)
import pytest

from rlhf_book.a2c import A2CConfig
from rlhf_book.base_model import load_base_model
from rlhf_book.cli import PipelineConfig, load_config, main
from rlhf_book.ppo import PPOConfig
from rlhf_book.rollout import generate

CONFIG_CASES = [
    (PPOConfig, {"whiten_advantages": "no"}, r"PPOConfig\.whiten_advantages must be true or false, got 'no'"),
    (PPOConfig, {"batch_size": "8"}, r"PPOConfig\.batch_size must be an integer, got '8'"),
    (PPOConfig, {"batch_size": 8.5}, r"PPOConfig\.batch_size must be an integer, got 8\.5"),
    (PPOConfig, {"batch_size": True}, r"PPOConfig\.batch_size must be an integer, got True"),
    (PPOConfig, {"lr": "1e-4"}, r"PPOConfig\.lr must be a number, got '1e-4'"),
    (PPOConfig, {"lr": math.inf}, r"PPOConfig\.lr must be a finite number, got inf"),
    (PPOConfig, {"kl_coef": math.nan}, r"PPOConfig\.kl_coef must be a finite number, got nan"),
    (PPOConfig, {"vf_coef": math.nan}, r"PPOConfig\.vf_coef must be a finite number"),
    (PPOConfig, {"seed": 1.5}, r"PPOConfig\.seed must be an integer"),
    (PPOConfig, {"progress": "no"}, r"PPOConfig\.progress must be true or false"),
    (PPOConfig, {"checkpoint_every": 2.5}, r"PPOConfig\.checkpoint_every must be an integer"),
    (PPOConfig, {"batch_size": 6, "minibatch_size": 4}, r"batch_size \(6\) must be a multiple of minibatch_size \(4\)"),
    (PPOConfig, {"generation_threads": 0}, r"PPOConfig\.generation_threads must be >= 1 or None"),
    (A2CConfig, {"whiten_advantages": "false"}, r"A2CConfig\.whiten_advantages must be true or false"),
    (A2CConfig, {"lr": math.inf}, r"A2CConfig\.lr must be a finite number"),
    (A2CConfig, {"kl_penalty": "both"}, r"A2CConfig\.kl_penalty must be one of \['reward', 'loss'\], got 'both'"),
    (PPOConfig, {"precision": "fp16"}, r"PPOConfig\.precision must be one of"),
    (PipelineConfig, {"iterations": -3}, r"PipelineConfig\.iterations must be >= 1, got -3"),
    (PipelineConfig, {"iterations": "4"}, r"PipelineConfig\.iterations must be an integer, got '4'"),
    (PipelineConfig, {"threads": -2}, r"PipelineConfig\.threads must be >= 1 or None, got -2"),
    (PipelineConfig, {"n_eval": 0}, r"PipelineConfig\.n_eval must be >= 1"),
    (PipelineConfig, {"device": "gpu0"}, r"device 'gpu0' is not a torch device"),
    (PipelineConfig, {"preset": "tinyy"}, r"unknown model 'tinyy'.*did you mean the preset 'tiny'"),
    (PipelineConfig, {"preset": "./no/such/dir", "reward": "gold"}, r"no such directory"),
]


@pytest.mark.parametrize("cls, kwargs, message", CONFIG_CASES, ids=[f"{c[0].__name__}-{list(c[1])[0]}" for c in CONFIG_CASES])
def test_config_values_are_checked_by_their_declared_type_and_range(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_the_valid_forms_still_pass():
    assert A2CConfig(critic_lr=None).critic_lr is None  # None: the actor's lr, as in PPOConfig
    assert PPOConfig(critic_lr=None, lr=1).lr == 1  # an int where a float is declared is fine
    assert PPOConfig(batch_size=8, minibatch_size=16).minibatch_size == 16  # one minibatch of the whole batch
    assert PipelineConfig(preset="tiny").iterations == 60


@pytest.mark.parametrize("text, suffix, message", [
    ("[ppo\nlr = 1\n", ".toml", r"bad\.toml: not valid TOML"),
    ('{"ppo": {"lr": }', ".json", r"bad\.json: not valid JSON"),
    ("[pipeline]\npreset = 'tiny'\niterations = -3\n", ".toml", r"bad\.toml: PipelineConfig\.iterations must be >= 1"),
    ("[pipeline]\npreset = 'tiny'\nn_evals = 3\n", ".toml", r"unknown \[pipeline\] key\(s\) \['n_evals'\]; did you mean 'n_evals' -> 'n_eval'"),
    ("[pipeline]\npreset = 'tiny'\n[ppo]\nbatch_size = '8'\n", ".toml", r"\[ppo\] PPOConfig\.batch_size must be an integer, got '8'"),
    ("[pipeline]\npreset = 'tiny'\n[ppo]\nwhiten_advantages = 'no'\n", ".toml", r"whiten_advantages must be true or false"),
    ("pipeline = 3\n", ".toml", r"bad\.toml: \[pipeline\] must be a table"),
    ("[1, 2]", ".json", r"bad\.json: expected tables \[pipeline\] and \[ppo\] \(or \[a2c\]\), got a list"),
])
def test_config_files_name_the_file_and_the_field(tmp_path, text, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[pipeline]\npreset = 'tinyy'\n")
    t0 = time.perf_counter()
    assert main(["pipeline", "--config", str(path)]) == 2
    assert time.perf_counter() - t0 < 30  # no minute of hub retries
    err = capsys.readouterr().err
    assert "did you mean the preset 'tiny'" in err and "Traceback" not in err
    assert main(["pipeline", "--config", str(tmp_path)]) == 2
    assert "is a directory, not a file" in capsys.readouterr().err


def test_unknown_preset_fails_at_once():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="did you mean the preset 'cpu'"):
        load_base_model("cpuu", device="cpu")
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": "Review the film Night Train."}, r"prompts must be a list of strings, got one string"),
    ({"temperature": math.nan}, r"temperature must be a finite number > 0 .*got nan"),
    ({"temperature": math.inf}, r"temperature must be a finite number > 0"),
    ({"temperature": 0}, r"temperature must be a finite number > 0 \(use greedy=True"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens must be an integer >= 1, got 2\.5"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1"),
    ({"max_new_tokens": 200}, r"max_new_tokens=200 leaves no room for a prompt in the model's context of 96"),
    ({"prompts": []}, r"prompts is empty"),
    ({"prompts": ["ok", ""]}, r"prompts\[1\] must be a non-empty string"),
])
def test_generate_rejects_bad_arguments(tiny_world, kwargs, message):
    model, tok = tiny_world
    args = {"prompts": ["Review the film Night Train."], "max_new_tokens": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, tok, **args)


def test_json_config_with_bom_is_read(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"pipeline": {"preset": "tiny"}}).encode())
    assert load_config(path)["pipeline"]["preset"] == "tiny"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_named_before_anything_runs():
    with pytest.raises(ValueError, match="device 'cuda': this torch build has no CUDA device available"):
        rlhf_book.get_device("cuda")
