"""The shared trainer: one device rule, configs that describe themselves, one experience step, a new algorithm in a few lines."""

import copy
import math
from dataclasses import dataclass, fields

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch

from rlhf_book.a2c import A2CConfig
from rlhf_book.cli import PipelineConfig, load_config, main, parse_overrides
from rlhf_book.config import RANGES, describe, option
from rlhf_book.critic import ValueModel
from rlhf_book.experience import make_experience
from rlhf_book.gold import gold_reward_fn
from rlhf_book.losses import policy_gradient_loss
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.rollout import generate
from rlhf_book.trainer import OnPolicyConfig, OnPolicyTrainer

PROMPTS = ["Review Luigi's.", "Review the film Night Train.", "Tell me about the blender.", "How was the hotel Seaside Inn?"]


def _recording_to(module, name, calls):
    """Make ``module.to`` record the device it was asked for (a stub for a model that lives elsewhere)."""
    original = module.to

    def to(*args, **kwargs):
        calls.append((name, torch.device(args[0] if args else kwargs["device"])))
        return original(*args, **kwargs)

    module.to = to
    return module


class _RewardOnSomeDevice:
    """A model-based reward function: callable, with a ``to`` that records where it is sent."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, prompts, responses, terminated=None):
        return gold_reward_fn(prompts, responses, terminated)

    def to(self, device):
        self.calls.append(("reward", torch.device(device)))
        return self


def test_reference_critic_and_model_reward_are_put_on_the_policys_device(tiny_world):
    lm, tok = tiny_world
    calls = []
    policy = copy.deepcopy(lm)
    ref = _recording_to(copy.deepcopy(lm), "ref", calls)
    critic = _recording_to(ValueModel.from_causal_lm(lm), "critic", calls)
    trainer = PPOTrainer(policy, ref, tok, _RewardOnSomeDevice(calls), PPOConfig(progress=False), critic=critic)
    device = next(policy.parameters()).device
    assert sorted(name for name, _ in calls) == ["critic", "ref", "reward"]
    assert all(d == device for _, d in calls) and trainer.device == device
    assert not any(p.requires_grad for p in trainer.ref.parameters())


def test_every_config_field_has_help_and_a_valid_declared_range():
    for cls in (OnPolicyConfig, PPOConfig, A2CConfig, PipelineConfig):
        for f in fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            assert f.metadata.get("range") in (None, *RANGES), f"{cls.__name__}.{f.name}"
        cls()  # the defaults satisfy their own ranges
    # A2C keeps the shared declarations (help, range) and only changes defaults
    a2c = {d["name"]: d for d in describe(A2CConfig)}
    base = {d["name"]: d for d in describe(OnPolicyConfig)}
    assert a2c["lr"]["help"] == base["lr"]["help"] and a2c["lr"]["default"] == 3e-4 != base["lr"]["default"]
    assert set(base) <= set(a2c) and set(a2c) - set(base) == {"value_updates"}
    with pytest.raises(ValueError, match=r"PPOConfig\.clip_range must be > 0, got 0"):
        PPOConfig(clip_range=0)
    with pytest.raises(ValueError, match=r"A2CConfig\.critic must be one of \['head', 'separate'\]"):
        A2CConfig(critic="base")


def test_command_line_overrides_and_lists_any_field(tmp_path, capsys):
    assert parse_overrides(["--ppo.kl_coef", "0.1", "--ppo.whiten_advantages=false", "--ppo.kl_target", "none",
                            "--pipeline.critic", "separate"]) == {
        "ppo": {"kl_coef": 0.1, "whiten_advantages": False, "kl_target": None}, "pipeline": {"critic": "separate"}}
    cfg = tmp_path / "c.toml"
    cfg.write_text("[pipeline]\npreset = 'tiny'\n[ppo]\nkl_coef = 0.05\n")
    loaded = load_config(cfg, parse_overrides(["--ppo.kl_coef", "0.2", "--pipeline.iterations", "3"]))
    assert loaded["ppo"]["kl_coef"] == 0.2 and loaded["pipeline"]["iterations"] == 3
    with pytest.raises(ValueError, match="clip_rnage.*did you mean 'clip_rnage' -> 'clip_range'"):
        load_config(cfg, parse_overrides(["--ppo.clip_rnage", "0.1"]))
    with pytest.raises(ValueError, match=r"PPOConfig\.kl_coef must be >= 0"):
        load_config(cfg, parse_overrides(["--ppo.kl_coef", "-1"]))
    assert main(["pipeline", "--config", str(cfg), "--ppo.lr"]) == 2 and "needs a value" in capsys.readouterr().err
    assert main(["options", "ppo"]) == 0
    out = capsys.readouterr().out
    assert "kl_coef = 0.05" in out and "clip_range = 0.2" in out and "valid: > 0" in out and "beta" in out
    assert main(["options", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "loss_type = \"sigmoid\"" in out and "'ipo'" in out and "beta = 0.1" in out and "DPOConfig(FIELD=VALUE)" in out
    assert main(["options", "critic_free"]) == 0
    out = capsys.readouterr().out
    assert "num_generations = 4" in out and "'dr_grpo'" in out and "CriticFreeConfig(FIELD=VALUE)" in out


def test_make_experience_is_the_trainers_experience_step(tiny_world):
    lm, tok = tiny_world
    tr = PPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, gold_reward_fn,
                    PPOConfig(batch_size=4, minibatch_size=2, max_new_tokens=8, missing_eos_score=-2.0, progress=False),
                    gold_fn=gold_reward_fn)
    ro = generate(tr.lm, tok, PROMPTS, 8, generator=torch.Generator().manual_seed(0))
    exp = tr.make_experience(ro)
    cfg = tr.config
    critic = tr.critic if tr.critic is not None else tr.model  # PPO's default: a separate critic
    direct = make_experience(ro, gold_reward_fn, tr.ref, critic, kl_coef=cfg.kl_coef, gamma=cfg.gamma, lam=cfg.lam,
                             missing_eos_score=-2.0, whiten_advantages=True, gold_fn=gold_reward_fn)
    for name in ("scores", "ref_logprobs", "values", "rewards", "advantages", "returns", "gold"):
        torch.testing.assert_close(getattr(exp, name), getattr(direct, name), msg=name)
    assert bool((exp.scores[~ro.terminated] == -2.0).all())  # the EOS rule, in one place
    part = exp.select([2, 0])
    assert part.rollout.prompts == [ro.prompts[2], ro.prompts[0]] and torch.equal(part.advantages[1], exp.advantages[0])
    with pytest.raises(ValueError, match="kl_penalty"):
        make_experience(ro, gold_reward_fn, tr.ref, kl_penalty="both")


# ------------------------------------------------------------------ a third algorithm is an update() and a config
@dataclass
class ReinforceConfig(OnPolicyConfig):
    """REINFORCE with the critic's value as baseline: one policy-gradient step per batch, no value loss weight."""

    baseline_lr_scale: float = option(1.0, "the critic's learning rate relative to critic_lr", "> 0")


class ReinforceTrainer(OnPolicyTrainer):
    name = "REINFORCE"
    config_class = ReinforceConfig

    def update(self, exp):
        logprobs, _values, _ = self.policy_forward(exp.rollout)
        loss = policy_gradient_loss(logprobs, exp.advantages, exp.mask) + self.kl_penalty_loss(logprobs, exp)
        (grad_norm,) = self.gradient_step(loss, [self.actor_params])
        return {"policy_loss": loss.item(), "grad_norm": grad_norm.item()}


def test_a_third_algorithm_is_an_update_and_a_config(tiny_world, tmp_path):
    lm, tok = tiny_world
    tr = ReinforceTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, gold_reward_fn,
                          ReinforceConfig(batch_size=4, max_new_tokens=8, eval_every=1, progress=False),
                          gold_fn=gold_reward_fn)
    history = tr.train(PROMPTS, 2, checkpoint_dir=tmp_path, eval_prompts=PROMPTS)
    assert [h["step"] for h in history] == [0, 1, 2]
    assert {"proxy_reward", "gold_reward", "kl", "explained_variance", "policy_loss", "eval_gold_reward",
            "eval_samples", "generate_seconds", "update_seconds"} <= set(history[-1])
    assert math.isfinite(history[-1]["grad_norm"]) and (tmp_path / "metrics.jsonl").exists()
