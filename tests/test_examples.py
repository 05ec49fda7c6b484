"""examples/own_model.py runs on CPU and every stage moves its number the way the script says."""

import importlib.util
from pathlib import Path

import rlhf_book  # noqa: F401  (before torch)
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_own_model_example(tmp_path, no_book_world):
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("own_model", ROOT / "examples" / "own_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(tmp_path)
    sft, grpo, dpo = summary["sft_val_loss"], summary["grpo_eval_reward"], summary["dpo_val_accuracy"]
    assert sft[1] < sft[0] - 1.0  # SFT learns the completions
    assert grpo[1] > grpo[0]  # GRPO raises the reward it optimises
    assert dpo[1] > dpo[0] and dpo[1] == 1.0  # DPO ranks every chosen reply above its rejected one
    assert summary["export_same_logits"] and (tmp_path / "policy" / "adapter").is_dir()
