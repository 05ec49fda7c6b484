"""gradient_accumulation_steps: an update split into micro-batches has the one-batch gradient, for every trainer.

And the pieces the one update loop is made of: the loss-scaling rule and the advantage-estimator table.
"""

import copy

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch

from rlhf_book.a2c import A2CConfig, A2CTrainer
from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer
from rlhf_book.distributed import global_shares
from rlhf_book.experience import ADVANTAGE_ESTIMATORS, AdvantageInputs, get_advantage_estimator
from rlhf_book.ppo import PPOConfig, PPOTrainer

PROMPTS = ["Describe the garden.", "Tell me about the sea.", "What is a cat?", "Say hello.",
           "Name a color.", "Where is the moon?", "Count to three.", "Why is the sky blue?"]


def short_reply_reward(prompts, responses, terminated):
    """+1 for ending with EOS, -0.1 a word: rewards that differ within a group, replies of unequal length."""
    return [float(t) - 0.1 * len(r.split()) for r, t in zip(responses, terminated)]


def _record_grads(trainer):
    """Wrap the optimizer's step so that each call first stores the flattened gradient it applies."""
    grads, step = [], trainer.optimizer.step

    def recording(*args, **kwargs):
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording
    return grads


def _same_update(make, samples_per_prompt=1, steps=4):
    """One experience batch, updated by a trainer with one micro-batch and by one with ``steps``: the same step."""
    one, acc = make(1), make(steps)
    ro = one.sample(PROMPTS[:4] if samples_per_prompt > 1 else PROMPTS, samples_per_prompt=samples_per_prompt)
    exp = one.make_experience(ro)
    assert len(set(ro.response_lengths.tolist())) > 1  # unequal lengths: the normalisers must be the whole batch's
    acc.generator.set_state(one.generator.get_state())  # the same minibatch shuffles
    g1, g2 = _record_grads(one), _record_grads(acc)
    s1, s2 = one.update(exp), acc.update(exp)
    assert len(g1) == len(g2) >= 1
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # Adam's step is lr * m / sqrt(v): on a component whose gradient is ~0 it turns a float-rounding difference of
    # the gradient into a visible one of the step (1.4e-6 on an AVX-512 CPU, lr = 1e-3), so the parameters are
    # compared at 1% of lr; a wrong accumulation moves them by a good fraction of lr
    for pa, pb in zip(one.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)
    for k in ("grad_norm", "policy_loss", "entropy"):
        assert s1[k] == pytest.approx(s2[k], rel=1e-4, abs=1e-6), k
    return s1, s2


def test_ppo_accumulated_update_equals_the_one_batch_update(tiny_world):
    lm, tok = tiny_world

    def make(steps):
        torch.manual_seed(0)
        cfg = PPOConfig(batch_size=8, minibatch_size=8, ppo_epochs=2, max_new_tokens=12, lr=1e-3, kl_penalty="loss",
                        entropy_coef=0.01, gradient_accumulation_steps=steps, progress=False)
        return PPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, short_reply_reward, cfg)

    s1, s2 = _same_update(make)
    assert s1["value_loss"] == pytest.approx(s2["value_loss"], rel=1e-4)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_grpo_accumulated_update_equals_the_one_batch_update(tiny_world, loss_type):
    lm, tok = tiny_world

    def make(steps):
        torch.manual_seed(0)
        cfg = CriticFreeConfig(batch_size=4, num_generations=4, num_iterations=2, minibatch_size=8, max_new_tokens=12,
                               lr=1e-3, loss_type=loss_type, missing_eos_score=None, gradient_accumulation_steps=steps,
                               progress=False)
        return CriticFreeTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, short_reply_reward, cfg)

    s1, _ = _same_update(make, samples_per_prompt=4, steps=3)  # 8 rows in 3 micro-batches of 2 or 3
    assert s1["updates"] == 4


def test_a2c_accumulated_update_equals_the_one_batch_update_and_clips_jointly(tiny_world):
    lm, tok = tiny_world

    def make(steps):
        torch.manual_seed(0)
        cfg = A2CConfig(batch_size=8, max_new_tokens=12, value_updates=2, gradient_accumulation_steps=steps,
                        progress=False)
        return A2CTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, short_reply_reward, cfg)

    one = make(1)
    ro = one.sample(PROMPTS)
    exp = one.make_experience(ro)
    norms = []
    orig = torch.nn.utils.clip_grad_norm_
    try:
        torch.nn.utils.clip_grad_norm_ = lambda params, *a, **k: norms.append(len(list(params))) or orig(params, *a, **k)
        one.update(exp)
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    n_actor, n_critic = len(one.actor_params), len(one.critic_params)
    assert norms == [n_actor + n_critic, n_critic]  # one joint clip of actor and critic, then a critic-only step
    s1, s2 = _same_update(make)
    assert s1["value_loss"] == pytest.approx(s2["value_loss"], rel=1e-4)


def test_global_shares_is_the_one_scaling_rule():
    assert global_shares(None, [5]) == [1.0]  # one part, one process: the loss as it is
    assert global_shares(None, [1.0, 3.0]) == [0.25, 0.75]  # parts weighted by their items
    assert global_shares(None, None, 3) == [1.0, 1.0, 1.0]  # already normalised by a global count


def test_the_estimator_table():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "reinforce", "rloo", "grpo", "dr_grpo", "grpo_process"}
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    x = AdvantageInputs(torch.zeros(4, 3), torch.zeros(4, 3), mask, r, group_size=2)
    adv, ret = get_advantage_estimator("rloo")(x)
    torch.testing.assert_close(adv, torch.tensor([[-2.0, -2.0, 0], [2.0, 0, 0], [0, 0, 0], [0, 0, 0]]))
    torch.testing.assert_close(ret, torch.where(mask.bool(), r[:, None], 0.0))
    dr, _ = get_advantage_estimator("dr_grpo")(x)
    torch.testing.assert_close(dr, get_advantage_estimator("grpo", scale="none")(x)[0])
    torch.testing.assert_close(dr, adv / 2)
    reinforce = get_advantage_estimator("reinforce", decay=0.5)
    first, _ = reinforce(x)
    torch.testing.assert_close(first, torch.where(mask.bool(), r[:, None], 0.0))  # b = 0 before any batch
    assert reinforce.state.value == pytest.approx(2.0)
    with pytest.raises(ValueError, match="advantage_estimator must be one of"):
        get_advantage_estimator("ppo")
