"""A2C: plumbing on the tiny preset, exact resume, and a measured improvement on the cpu preset."""

import copy
import math

import rlhf_book  # before torch
import pytest
import torch

from rlhf_book.a2c import A2CConfig, A2CTrainer
from rlhf_book.base_model import load_base_model
from rlhf_book.corpus import prompt_split
from rlhf_book.gold import gold_reward_fn
from rlhf_book.losses import policy_gradient_variance
from rlhf_book.plotting import series

TINY = dict(batch_size=4, max_new_tokens=8, eval_every=2, checkpoint_every=2, progress=False)


def _strip(history):
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in history]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lam"):
        A2CConfig(lam=1.5)
    with pytest.raises(ValueError, match="critic"):
        A2CConfig(critic="shared-ish")
    with pytest.raises(ValueError, match="batch_size"):
        A2CConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown"):
        A2CConfig.from_dict({"learning_rate": 1e-3})


@pytest.mark.parametrize("critic", ["head", "separate"])
def test_one_step_updates_actor_and_critic_only(tiny_world, critic):
    lm, tok = tiny_world
    policy, ref = copy.deepcopy(lm), copy.deepcopy(lm)
    ref_before = copy.deepcopy(ref.state_dict())
    trainer = A2CTrainer(policy, ref, tok, gold_reward_fn, A2CConfig(critic=critic, **TINY), gold_fn=gold_reward_fn)
    critic_module = _critic_module(trainer)
    actor_before = [p.detach().clone() for p in trainer.actor_params]
    critic_before = [p.detach().clone() for p in critic_module.parameters()]
    stats = trainer.step(
        [
            "Review Luigi's.",
            "Review the film Night Train.",
            "Tell me about the blender.",
            "How was the hotel Seaside Inn?",
        ]
    )
    for key in ("proxy_reward", "gold_reward", "kl", "entropy", "value_loss", "explained_variance", "response_length"):
        assert key in stats and isinstance(stats[key], float)
    assert math.isfinite(stats["value_loss"]) and stats["entropy"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(actor_before, trainer.actor_params))
    assert any(not torch.equal(a, p) for a, p in zip(critic_before, critic_module.parameters()))
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"reference model changed at {k}"
    # before its first update the actor *is* the reference: the first KL is 0
    assert stats["kl"] == pytest.approx(0.0, abs=1e-4)


def _critic_module(trainer):
    return trainer.model.value_head if trainer.critic is None else trainer.critic


@pytest.mark.parametrize("critic", ["head", "separate"])
@pytest.mark.parametrize("value_updates", [0, 3])
def test_value_updates_sets_how_often_the_critic_moves(tiny_world, critic, value_updates):
    lm, tok = tiny_world
    cfg = A2CConfig(critic=critic, value_updates=value_updates, **TINY)
    trainer = A2CTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, gold_reward_fn, cfg)
    before = [p.detach().clone() for p in _critic_module(trainer).parameters()]
    steps = []
    original = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(1), original(*a, **k))[1]
    trainer.step(["Review Luigi's.", "Review the film Night Train."])
    assert len(steps) == max(1, value_updates)  # one actor (+ critic) step, then critic-only steps
    unchanged = all(torch.equal(a, p) for a, p in zip(before, _critic_module(trainer).parameters()))
    assert unchanged == (value_updates == 0)


def test_reference_must_be_a_copy(tiny_world):
    lm, tok = tiny_world
    with pytest.raises(ValueError, match="ref_model"):
        A2CTrainer(lm, lm, tok, gold_reward_fn, A2CConfig(**TINY))


def _train(cfg, iterations, checkpoint_dir):
    policy, tok = load_base_model("tiny", progress=False)
    ref, _ = load_base_model("tiny", progress=False)
    trainer = A2CTrainer(policy, ref, tok, gold_reward_fn, cfg, gold_fn=gold_reward_fn)
    train_prompts, eval_prompts = prompt_split(0)
    return trainer, trainer.train(train_prompts, iterations, checkpoint_dir=checkpoint_dir, eval_prompts=eval_prompts[:6])


def test_resume_reproduces_the_uninterrupted_run(tmp_cache, tmp_path):
    cfg = A2CConfig(seed=3, **TINY)
    full_trainer, full = _train(cfg, 4, tmp_path / "full")
    # an interrupted run: 2 iterations, then a fresh process (new trainer) continues from the checkpoint
    _train(cfg, 2, tmp_path / "split")
    resumed_trainer, resumed = _train(cfg, 4, tmp_path / "split")
    assert [h["step"] for h in resumed] == [0, 1, 2, 3, 4]
    assert _strip(resumed) == _strip(full)
    for (k, a), b in zip(full_trainer.model.state_dict().items(), resumed_trainer.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_policy_gradient_variance_baseline_reduces_variance(tiny_world):
    lm, tok = tiny_world
    model = copy.deepcopy(lm)
    ro = rlhf_book.generate(model, tok, ["Review Luigi's."] * 6, 8, generator=torch.Generator().manual_seed(0))
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) + 10.0  # rewards far from 0
    raw = policy_gradient_variance(model, ro, r)
    centred = policy_gradient_variance(model, ro, r - r.mean())
    assert raw["total_variance"] > centred["total_variance"] > 0
    with pytest.raises(ValueError, match="weights"):
        policy_gradient_variance(model, ro, torch.ones(3))


@pytest.mark.slow
def test_a2c_raises_held_out_gold_reward(cpu_world):
    """Measured (2 threads): held-out gold 0.05 -> 0.73 after 20 iterations of 32 prompts (seeds 1, 2: +0.55, +0.73)."""
    lm, tok = cpu_world
    train_prompts, eval_prompts = prompt_split(seed=0)
    trainer = A2CTrainer(
        copy.deepcopy(lm), copy.deepcopy(lm), tok, gold_reward_fn, A2CConfig(seed=0, eval_every=20, progress=False),
        gold_fn=gold_reward_fn,
    )
    history = trainer.train(train_prompts, iterations=20, eval_prompts=eval_prompts)
    its, gold = series(history, "eval_gold_reward")
    assert its == [0, 20]
    assert gold[1] - gold[0] >= 0.3, f"held-out gold reward went {gold[0]:.3f} -> {gold[1]:.3f}"
    _, kl = series(history, "eval_kl")
    assert 0.0 < kl[1] < 10.0  # the KL penalty keeps the policy near the reference
