"""The README's "your own notebook" examples run as written, without the book's world, and do what they say."""

import math
import re
from pathlib import Path

import rlhf_book  # noqa: F401  (before torch)
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _own_notebook_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Using `rlhf_book` in your own notebook", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_own_notebook_examples_run(tmp_path, monkeypatch, no_book_world):
    blocks = _own_notebook_blocks()
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)  # noqa: S102  (the README's own code)
    history = ns["history"]
    assert history[-1]["eval_gold_reward"] > history[0]["eval_gold_reward"]  # "my_reward" went up
    assert len(ns["pairs"]) > 40 and "chosen_gold" in ns["pairs"][0]
    scores = ns["reward_fn"](ns["ref"].prompts, ns["ref"].responses, ns["ref"].terminated)
    assert abs(float(scores.mean())) < 1e-4  # normalised on the reference replies, as the comment says
    dpo = ns["dpo_history"]  # DPO on the same pairs: the training loss falls from log 2 and "my_reward" goes up
    assert dpo[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5) and dpo[-1]["loss"] < math.log(2) - 0.1
    assert dpo[-1]["eval_gold_reward"] > dpo[0]["eval_gold_reward"]


def test_the_your_own_model_example_runs(tmp_path, monkeypatch, no_book_world):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    text = README.read_text()
    section = text.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], str(README), "exec"), ns)  # noqa: S102  (the README's own code)
    assert [h["step"] for h in ns["history"]] == [1, 2]
    assert type(ns["policy"]).__name__.startswith("PeftModel") and ns["grpo"].ref is not ns["policy"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "my-llama-grpo")  # merged, without peft
    assert plain.dtype.is_floating_point and not any("lora" in k for k in plain.state_dict())
