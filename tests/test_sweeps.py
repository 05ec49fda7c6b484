"""The chapters' sweeps (tools/sweep_common.py): a sweep killed mid-way resumes to the results of one never killed."""

import copy
import json
import sys
from pathlib import Path

import rlhf_book  # noqa: F401  (before torch)
import pytest

from rlhf_book.corpus import prompt_split
from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer
from rlhf_book.trainer import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from sweep_common import Results  # noqa: E402

TRAIN, EVAL = prompt_split(0)


def short_reply_reward(prompts, responses, terminated):
    return [float(t) - 0.1 * len(r.split()) for r, t in zip(responses, terminated)]


class Killed(Exception):
    pass


def sweep(world, path: Path, kill_after: int | None = None) -> None:
    """Two runs of 4 iterations; ``kill_after``: raise after that many iterations of the second run (a kill)."""
    model, tok = world
    results = Results(path)
    for seed in (0, 1):
        run = f"grpo/seed={seed}"
        if run in results.done:
            continue
        cfg = CriticFreeConfig(batch_size=2, num_generations=2, max_new_tokens=8, lr=3e-3, eval_every=2,
                               checkpoint_every=1, seed=seed, progress=False)
        trainer = CriticFreeTrainer(copy.deepcopy(model), copy.deepcopy(model), tok, short_reply_reward, cfg)
        steps = 4 if kill_after is None or seed == 0 else kill_after
        history = trainer.train(TRAIN, steps, checkpoint_dir=results.scratch(run), eval_prompts=EVAL[:4])
        if steps < 4:
            raise Killed(run)
        rows = [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in history]
        results.record(run, 0.0, seed=seed, history=rows)


def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(path)]


def test_a_killed_sweep_resumes_to_the_same_results(tiny_world, tmp_path):
    whole = tmp_path / "whole.jsonl"
    sweep(tiny_world, whole)
    killed = tmp_path / "killed.jsonl"
    with pytest.raises(Killed):
        sweep(tiny_world, killed, kill_after=2)
    assert [r["run"] for r in read_metrics(killed)] == ["grpo/seed=0"]  # the finished run is kept...
    assert (killed.with_suffix(".runs") / "grpo" / "seed=1").is_dir()  # ...and the killed one's checkpoint
    sweep(tiny_world, killed)  # run again: skips seed 0, resumes seed 1 from its checkpoint
    assert _records(killed) == _records(whole)
    assert json.dumps(_records(killed)) == json.dumps(_records(whole))
    assert not killed.with_suffix(".runs").exists()  # no scratch left behind to block the next sweep


def test_the_ch03_05_sweep_plans_valid_configs_under_distinct_names():
    import sweep_ch03_05 as s

    from rlhf_book.a2c import A2CConfig
    from rlhf_book.ppo import PPOConfig

    runs = s.plan(["ch3", "ch4", "ch5", "ch5_head", "ch5_critics", "adaptive"], list(s.SEEDS))
    assert len({r[0] for r in runs}) == len(runs) == 3 * (2 + 3 + 3 + 3 + 4 + 1)
    for _, part, algo, knobs, iterations, seed in runs:  # every config the sweep will build is a valid one
        fields, critic_init = s.run_config(algo, knobs, seed)
        cfg = A2CConfig(**fields) if algo == "a2c" else PPOConfig(**fields)
        assert cfg.eval_every == (10 if part == "ch5_critics" else 5) and iterations > 0 and cfg.seed == seed
        assert (cfg.kl_target is not None) == (part == "adaptive")
        assert (critic_init is not None) == (part == "ch5_critics") and critic_init in (None, "trunk", "reward_model")
        assert (cfg.critic == "head") == (part == "ch5_head")
    rows = s.compact([{"step": 0, "eval_kl": 1.234567, "eval_samples": []}, {"step": 1, "kl": 2 / 3, "other": 1.0,
                                                                             "eval_samples": [{"prompt": "p"}]}], s.ROW_KEYS)
    assert rows == [{"step": 0, "eval_kl": 1.235}, {"step": 1, "kl": 0.6667, "eval_samples": [{"prompt": "p"}]}]
    # only the rows with a key, unrounded (chapter 6's sweep keeps its evaluations as they are)
    assert s.compact([{"step": 0, "eval_kl": 1 / 3}, {"step": 1, "kl": 0.5}], ("step", "eval_kl"), digits=None,
                     only="eval_kl") == [{"step": 0, "eval_kl": 1 / 3}]
