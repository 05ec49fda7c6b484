"""The README's "your own notebook" examples run as written, without the book's world, and do what they say."""

import re
from pathlib import Path

import rlhf_book  # noqa: F401  (before torch)

README = Path(__file__).resolve().parents[1] / "README.md"


def _own_notebook_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Using `rlhf_book` in your own notebook", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_own_notebook_examples_run(tmp_path, monkeypatch, no_book_world):
    blocks = _own_notebook_blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)  # noqa: S102  (the README's own code)
    history = ns["history"]
    assert history[-1]["eval_gold_reward"] > history[0]["eval_gold_reward"]  # "my_reward" went up
    assert len(ns["pairs"]) > 40 and "chosen_gold" in ns["pairs"][0]
    scores = ns["reward_fn"](ns["ref"].prompts, ns["ref"].responses, ns["ref"].terminated)
    assert abs(float(scores.mean())) < 1e-4  # normalised on the reference replies, as the comment says
