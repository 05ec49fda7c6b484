"""PPO: the clipped surrogate by hand, identity at the start, padding invariance, resume, and a real run."""

import copy
import math

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch

from rlhf_book.corpus import prompt_split
from rlhf_book.critic import ValueModel, build_critic
from rlhf_book.gold import gold_reward_fn
from rlhf_book.kl import AdaptiveKLController
from rlhf_book.ppo import PPOConfig, PPOTrainer, ppo_policy_loss
from rlhf_book.rollout import Rollout, generate, prompt_texts, response_logprobs

EPS = 0.2
# (advantage, ratio) on both sides of the clip, for positive and negative advantages
CASES = [(1.0, 1.5), (1.0, 0.5), (-1.0, 1.5), (-1.0, 0.5), (2.0, 1.1)]
# per-token objective -min(rA, clip(r)A), worked out by hand:
#   A=+1, r=1.5: min(1.5, 1.2) = 1.2 (clipped, no gradient)   A=+1, r=0.5: min(0.5, 0.8) = 0.5 (unclipped)
#   A=-1, r=1.5: min(-1.5, -1.2) = -1.5 (unclipped)           A=-1, r=0.5: min(-0.5, -0.8) = -0.8 (clipped, no gradient)
#   A=+2, r=1.1: inside the clip, 2.2
HAND_LOSS = [-1.2, -0.5, 1.5, 0.8, -2.2]
HAND_CLIPPED = [True, False, False, True, False]


def _case_tensors():
    adv = torch.tensor([[a for a, _ in CASES]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5]])
    new = (old + torch.log(torch.tensor([[r for _, r in CASES]]))).requires_grad_(True)
    return new, old, adv, torch.ones_like(adv, dtype=torch.long)


def test_clipped_objective_matches_hand_computed_values():
    new, old, adv, mask = _case_tensors()
    loss, stats = ppo_policy_loss(new, old, adv, mask, EPS)
    assert loss.item() == pytest.approx(sum(HAND_LOSS) / 5, abs=1e-6)  # -0.32
    assert stats["clipfrac"] == pytest.approx(2 / 5)
    loss.backward()
    # d/dlogp of -A r is -A r / n where the unclipped term is active, 0 where the clip is
    expect = [0.0 if c else -a * r / 5 for (a, r), c in zip(CASES, HAND_CLIPPED)]
    torch.testing.assert_close(new.grad, torch.tensor([expect]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_each_clip_case_alone(i):
    new, old, adv, mask = _case_tensors()
    loss, stats = ppo_policy_loss(new[:, i : i + 1], old[:, i : i + 1], adv[:, i : i + 1], mask[:, i : i + 1], EPS)
    assert loss.item() == pytest.approx(HAND_LOSS[i], abs=1e-6)
    assert stats["clipfrac"] == (1.0 if HAND_CLIPPED[i] else 0.0)


def test_identity_ratio_is_one_and_nothing_clipped():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g)
    adv = torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    loss, stats = ppo_policy_loss(lp.clone().requires_grad_(True), lp, adv, mask, EPS)
    assert stats["ratio_mean"] == 1.0 and stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)  # the surrogate is -mean(A) at r = 1


def test_policy_loss_is_padding_invariant():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 5
    old = -torch.rand(B, T, generator=g)
    new = old + 0.4 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    x = new.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, old, adv, mask, EPS)
    loss.backward()
    # garbage (NaN / inf) on masked positions and extra padded columns: same loss, stats and gradient
    pad = 4
    garbage = torch.full((B, pad), float("nan"))
    new2 = torch.cat([torch.where(mask.bool(), new, torch.full_like(new, float("inf"))), garbage], 1)
    old2 = torch.cat([torch.where(mask.bool(), old, torch.full_like(old, float("nan"))), garbage], 1)
    adv2 = torch.cat([torch.where(mask.bool(), adv, torch.full_like(adv, float("nan"))), garbage], 1)
    mask2 = torch.cat([mask, torch.zeros(B, pad, dtype=torch.long)], 1)
    x2 = new2.clone().requires_grad_(True)
    loss2, stats2 = ppo_policy_loss(x2, old2, adv2, mask2, EPS)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    assert stats2 == pytest.approx(stats)
    torch.testing.assert_close(x2.grad[:, :T], torch.where(mask.bool(), x.grad, 0.0))
    assert torch.equal(x2.grad[:, T:], torch.zeros(B, pad)) and torch.isfinite(x2.grad).all()


def test_policy_loss_rejects_bad_input():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_policy_loss(z, z, z, z.long(), 0.0)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(z, z, torch.zeros(2, 4), z.long(), 0.2)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="clip_range"):
        PPOConfig(clip_range=0)
    with pytest.raises(ValueError, match="kl_penalty"):
        PPOConfig(kl_penalty="both")
    with pytest.raises(ValueError, match="bogus"):
        PPOConfig.from_dict({"bogus": 1})
    assert PPOConfig.from_dict({"lr": 3e-4}).lr == 3e-4
    assert prompt_texts([{"prompt": "a"}, "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match=r"prompts\[0\]: missing field .prompt."):
        prompt_texts([{"text": "a"}])


# ------------------------------------------------------------------ trainer on the tiny preset (plumbing)
TRAIN, EVAL = prompt_split(0)


def _trainer(world, **overrides):
    model, tok = world
    kw = dict(batch_size=8, minibatch_size=4, max_new_tokens=12, eval_every=2, checkpoint_every=2, progress=False)
    kw.update(overrides)
    critic = overrides.pop("_critic", None)
    kw.pop("_critic", None)
    policy = copy.deepcopy(model)
    return PPOTrainer(policy, copy.deepcopy(model), tok, gold_reward_fn, PPOConfig(**kw),
                      critic=critic(policy) if critic else None, gold_fn=gold_reward_fn)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_identity_at_start(tiny_world, temperature):
    tr = _trainer(tiny_world, temperature=temperature)
    stats = tr.step(prompt_texts(TRAIN[:8]))
    # policy == reference and dropout off: ratio 1, no clipping, no KL on the first minibatch
    assert stats["first_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert stats["first_clipfrac"] == 0.0
    assert stats["first_approx_kl"] < 1e-8
    # both policy and reference log-probs use logits / T, so the KL starts at 0 for any T
    assert abs(stats["kl"]) < 1e-4 and stats["kl_k3"] < 1e-6
    assert stats["updates"] == 4 * 2 and stats["epochs"] == 4


def test_old_logprobs_are_the_rollouts_own(tiny_world):
    tr = _trainer(tiny_world, temperature=0.8)
    ro = generate(tr.lm, tr.tokenizer, prompt_texts(TRAIN[:8]), 12, 0.8, generator=torch.Generator().manual_seed(0))
    exp = tr.make_experience(ro)
    assert exp.old_logprobs is ro.logprobs  # no second forward
    recomputed = response_logprobs(tr.lm, ro, temperature=0.8)
    torch.testing.assert_close(ro.logprobs, recomputed, atol=1e-5, rtol=1e-5)
    tr.config.recompute_old_logprobs = True
    torch.testing.assert_close(tr.make_experience(ro).old_logprobs, recomputed)


def _pad_rollout(ro, left, right, pad_id):
    """The same rollout with ``left`` more PAD columns before the prompts and ``right`` after the responses."""
    B = len(ro)
    lp = lambda x, v: torch.cat([torch.full((B, left), v, dtype=x.dtype), x], 1)
    rp = lambda x, v: torch.cat([x, torch.full((B, right), v, dtype=x.dtype)], 1)
    return Rollout(prompt_ids=lp(ro.prompt_ids, pad_id), prompt_mask=lp(ro.prompt_mask, 0),
                   response_ids=rp(ro.response_ids, pad_id), response_mask=rp(ro.response_mask, 0),
                   logprobs=rp(ro.logprobs, 0.0), terminated=ro.terminated, prompts=ro.prompts,
                   responses=ro.responses, temperature=ro.temperature)


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_ppo_losses_are_padding_invariant(tiny_world, kl_penalty):
    tr = _trainer(tiny_world, kl_penalty=kl_penalty, entropy_coef=0.01, lr=1e-2)
    tr.step(prompt_texts(TRAIN[:8]))  # move policy and value head away from their start
    ro = generate(tr.lm, tr.tokenizer, prompt_texts(TRAIN[8:16]), 12, generator=torch.Generator().manual_seed(0))
    padded = _pad_rollout(ro, 3, 4, tr.tokenizer.pad_token_id)
    a, b = tr.make_experience(ro), tr.make_experience(padded)
    R = ro.response_ids.size(1)
    for key in ("ref_logprobs", "values", "rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(b, key)[:, :R], getattr(a, key), atol=1e-5, rtol=1e-4, msg=key)
        assert torch.equal(getattr(b, key)[:, R:], torch.zeros_like(getattr(b, key)[:, R:])), key
    idx = torch.tensor([0, 2, 5, 7])
    la, sa = tr.loss(a.select(idx))
    lb, sb = tr.loss(b.select(idx))
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-4)
    for key in ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl"):
        assert float(sb[key]) == pytest.approx(float(sa[key]), abs=1e-5), key


def test_early_stop_on_approx_kl(tiny_world):
    tr = _trainer(tiny_world, lr=1e-2)
    tr.step(prompt_texts(TRAIN[:8]))
    tr.config.target_kl = 1e-7
    stats = tr.step(prompt_texts(TRAIN[8:16]))
    # the first minibatch sees the policy that sampled (approx-KL ~ 0), the second one does not
    assert stats["early_stop"] and stats["epochs"] == 1 and stats["updates"] == 2


def test_kl_as_loss_and_entropy_bonus_and_separate_critic(tiny_world):
    tr = _trainer(tiny_world, kl_penalty="loss", kl_coef=0.1, entropy_coef=0.01, _critic=ValueModel.from_causal_lm)
    s1 = tr.step(prompt_texts(TRAIN[:8]))
    s2 = tr.step(prompt_texts(TRAIN[8:16]))
    assert s1["non_score_reward"] == 0.0  # the KL is not in the reward in this mode
    for s in (s1, s2):
        assert all(math.isfinite(s[k]) for k in ("loss", "value_loss", "entropy", "kl", "grad_norm"))
    assert build_critic("head") is None
    with pytest.raises(ValueError, match="critic kind"):
        build_critic("nope")


def test_grad_norm_is_reported_without_clipping(tiny_world):
    s = _trainer(tiny_world, max_grad_norm=None).step(prompt_texts(TRAIN[:8]))
    assert math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0


def test_ref_must_be_a_separate_model(tiny_world):
    model, tok = tiny_world
    with pytest.raises(ValueError, match="ref_model"):
        PPOTrainer(model, model, tok, gold_reward_fn, PPOConfig(progress=False))


def test_adaptive_kl_in_the_trainer_moves_beta(tiny_world):
    tr = _trainer(tiny_world, lr=1e-2, kl_coef=0.1, kl_target=1e-3, kl_horizon=100)
    assert isinstance(tr.kl_ctl, AdaptiveKLController)
    tr.step(prompt_texts(TRAIN[:8]))
    s = tr.step(prompt_texts(TRAIN[8:16]))
    assert s["kl"] > 1e-3 and s["next_beta"] > s["beta"]  # KL above target: beta goes up


def _strip_times(history):
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in history]


def test_resume_reproduces_the_uninterrupted_run(tiny_world, tmp_path):
    kw = dict(kl_target=0.5, kl_coef=0.05, kl_horizon=200)  # the adaptive controller's state must survive too
    full = _trainer(tiny_world, **kw).train(TRAIN, 4, eval_prompts=EVAL[:6])
    first = _trainer(tiny_world, **kw)
    part = first.train(TRAIN, 2, checkpoint_dir=tmp_path, eval_prompts=EVAL[:6])
    assert len(part) == 3 and (tmp_path / "ppo_state.pt").exists()
    resumed_trainer = _trainer(tiny_world, **kw)  # a fresh process: new models, new optimizer
    resumed = resumed_trainer.train(TRAIN, 4, checkpoint_dir=tmp_path, eval_prompts=EVAL[:6])
    assert _strip_times(resumed) == _strip_times(full)
    assert resumed_trainer.kl_ctl.value != 0.05
    # and the weights are the same
    ref = _trainer(tiny_world, **kw)
    ref.train(TRAIN, 4, eval_prompts=EVAL[:6])
    for (n, a), (_, b) in zip(ref.model.state_dict().items(), resumed_trainer.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_train_validates_prompts(tiny_world):
    tr = _trainer(tiny_world)
    with pytest.raises(ValueError, match="batch_size"):
        tr.train(TRAIN[:3], 1)


# ------------------------------------------------------------------ a real run on the cpu world
@pytest.mark.slow
def test_ppo_raises_heldout_gold_reward_with_bounded_kl(cpu_world):
    """PPO on the gold reward: held-out gold reward +0.3 over the base LM, sequence KL < 8 nats."""
    tr = _trainer(cpu_world, batch_size=32, minibatch_size=16, max_new_tokens=40, kl_coef=0.1, lr=1e-4, eval_every=0)
    history = tr.train(TRAIN, 12, eval_prompts=EVAL)
    before, after = history[0], history[-1]
    gain = after["eval_gold_reward"] - before["eval_gold_reward"]
    assert gain > 0.3, (before["eval_gold_reward"], after["eval_gold_reward"])
    assert after["eval_kl"] < 8.0
    assert abs(before["eval_kl"]) < 1e-3  # the untrained policy is the reference


def test_ppo_policy_loss_is_critic_free_policy_loss_with_bnpo():
    """Chapter 5's surrogate is one setting of the one clipped surrogate: equal values, statistics and gradients."""
    from rlhf_book.critic_free import critic_free_policy_loss

    g = torch.Generator().manual_seed(3)
    old = -torch.rand(5, 9, generator=g) * 3
    new = old + 0.4 * torch.randn(5, 9, generator=g)
    adv = torch.randn(5, 9, generator=g)
    mask = (torch.arange(9) < torch.tensor([[9], [4], [7], [1], [6]])).long()
    a, b = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    loss_a, stats_a = ppo_policy_loss(a, old, adv, mask, EPS)
    loss_b, stats_b = critic_free_policy_loss(b, old, adv, mask, loss_type="bnpo", epsilon=EPS)
    assert stats_a["clipfrac"] > 0 and loss_a.item() == loss_b.item()
    assert stats_a == {k: stats_b[k] for k in stats_a}
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(a.grad, b.grad)
