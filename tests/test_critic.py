"""Critics: causality, the P - 1 + t alignment, padding invariance, detaching, RM initialisation."""

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from rlhf_book.critic import (
    PolicyWithValueHead,
    ValueModel,
    explained_variance,
    forward_logprobs_and_values,
    response_values,
)
from rlhf_book.losses import value_loss
from rlhf_book.rollout import Rollout, generate, response_logprobs

VOCAB, PAD = 50, 0


def _config():
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=PAD,
        eos_token_id=1,
        bos_token_id=1,
    )


def _randomise_head(critic, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the head starts at 0, which would make every test below trivially pass
        critic.value_head.linear.weight.copy_(torch.randn(critic.value_head.linear.weight.shape, generator=g))
        critic.value_head.linear.bias.fill_(0.3)
    return critic


@pytest.fixture(params=["shared", "separate"])
def critic(request):
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(_config()).eval()
    c = PolicyWithValueHead(lm) if request.param == "shared" else ValueModel.from_causal_lm(lm)
    return _randomise_head(c).eval()


def _batch(seed=0, B=3, P=5, R=6):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, VOCAB, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    prompt_ids[1, :2] = PAD
    response_ids = torch.randint(2, VOCAB, (B, R), generator=g)
    response_mask = torch.ones(B, R, dtype=torch.long)
    response_mask[0, 4:] = 0  # right padding after the end
    response_ids[0, 4:] = PAD
    return prompt_ids, prompt_mask, response_ids, response_mask


def test_value_is_causal(critic):
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    v = critic.value(ids, mask)
    for t in (0, 5, 10):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(2, VOCAB, changed[:, t + 1 :].shape)
        v2 = critic.value(changed, mask)
        torch.testing.assert_close(v2[:, : t + 1], v[:, : t + 1])
        assert not torch.allclose(v2[:, t + 1 :], v[:, t + 1 :])  # the test can tell the difference


def test_response_values_reads_column_before_each_token(critic):
    prompt_ids, prompt_mask, response_ids, response_mask = _batch()
    P = prompt_ids.size(1)
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    full = critic.value(ids, mask)
    v = response_values(critic, Rollout(prompt_ids, prompt_mask, response_ids, response_mask))
    assert v.shape == response_ids.shape
    m = response_mask.bool()
    torch.testing.assert_close(v[m], full[:, P - 1 : -1][m])
    assert (v[~m] == 0).all()
    # V(s_1) (the state before the first response token) is the value of the prompt alone: it must not depend on any response token
    v_other = response_values(
        critic, Rollout(prompt_ids, prompt_mask, torch.randint(2, VOCAB, response_ids.shape), response_mask)
    )
    torch.testing.assert_close(v_other[:, 0], v[:, 0])


def test_response_values_padding_invariance(critic):
    prompt_ids, prompt_mask, response_ids, response_mask = _batch()
    v = response_values(critic, Rollout(prompt_ids, prompt_mask, response_ids, response_mask))
    B = prompt_ids.size(0)
    extra_left = 3
    p2 = torch.cat([torch.full((B, extra_left), PAD), prompt_ids], 1)
    pm2 = torch.cat([torch.zeros(B, extra_left, dtype=torch.long), prompt_mask], 1)
    extra_right = 4
    r2 = torch.cat([response_ids, torch.full((B, extra_right), PAD)], 1)
    rm2 = torch.cat([response_mask, torch.zeros(B, extra_right, dtype=torch.long)], 1)
    v2 = response_values(critic, Rollout(p2, pm2, r2, rm2))
    torch.testing.assert_close(v2[:, : v.size(1)], v, atol=1e-5, rtol=1e-5)
    assert (v2[:, v.size(1) :] == 0).all()


def test_one_forward_matches_separate_calls():
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(_config()).eval()
    policy = _randomise_head(PolicyWithValueHead(lm)).eval()
    batch = Rollout(*_batch(2))
    logprobs, values, entropy = forward_logprobs_and_values(policy, batch, temperature=0.7)
    torch.testing.assert_close(logprobs, response_logprobs(lm, batch, temperature=0.7))
    torch.testing.assert_close(values, response_values(policy, batch))
    m = batch.response_mask.bool()
    assert (entropy[m] > 0).all() and (entropy[~m] == 0).all()
    # a bare LM gives log-probs and entropy but no values
    lp2, v2, ent2 = forward_logprobs_and_values(lm, batch, temperature=0.7)
    assert v2 is None
    torch.testing.assert_close(lp2, logprobs)
    torch.testing.assert_close(ent2, entropy)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_value_head_keeps_value_loss_off_the_trunk(detach):
    torch.manual_seed(0)
    policy = _randomise_head(PolicyWithValueHead(GPT2LMHeadModel(_config()), detach_value_head=detach))
    batch = Rollout(*_batch(3))
    _, values, _ = forward_logprobs_and_values(policy, batch)
    value_loss(values, torch.ones_like(values), batch.response_mask).backward()
    trunk_grad = sum(float(p.grad.abs().sum()) for p in policy.lm.parameters() if p.grad is not None)
    assert policy.value_head.linear.weight.grad.abs().sum() > 0
    assert (trunk_grad == 0) == detach


def test_value_model_from_reward_model_starts_at_the_rm_score():
    torch.manual_seed(0)
    cfg = {**_config().to_dict(), "num_labels": 1, "id2label": {0: "reward"}, "label2id": {"reward": 0}}
    rm = GPT2ForSequenceClassification(GPT2Config(**cfg)).eval()  # (4.x: a copied 2-label map beats num_labels)
    critic = ValueModel.from_reward_model(rm).eval()
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    score = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(critic.value(ids, mask)[:, -1], score)
    # a normalised reward model (score = gain * raw + bias, as rlhf_book.reward_model stores it): V starts there too
    rm.config.reward_gain, rm.config.reward_bias = 0.5, -0.2
    normalised = ValueModel.from_reward_model(rm).eval()
    torch.testing.assert_close(normalised.value(ids, mask)[:, -1], 0.5 * score - 0.2)
    # a copy: training the critic must not change the reward model
    assert critic.trunk is not rm.base_model
    with pytest.raises(ValueError, match="score head"):
        ValueModel.from_reward_model(GPT2LMHeadModel(_config()))


def test_generate_accepts_policy_with_value_head(tiny_world):
    lm, tok = tiny_world
    policy = PolicyWithValueHead(lm)
    prompts = ["Review Luigi's.", "How was the hotel Seaside Inn?"]
    a = generate(lm, tok, prompts, 8, generator=torch.Generator().manual_seed(0))
    b = generate(policy, tok, prompts, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs)


def test_explained_variance():
    g = torch.Generator().manual_seed(0)
    returns = torch.randn(4, 8, generator=g)
    mask = torch.ones(4, 8)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 3.0), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(-returns, returns, mask) < 0


def test_trainer_logs_the_returns_variance_explained_variance_divides_by(tiny_world):
    """``return_var`` is Var[G] over the batch's tokens: EV = 1 - Var[G - V] / return_var (§5.5 reads the two together)."""
    import copy

    from rlhf_book import gold_reward_fn
    from rlhf_book.advantage import masked_var
    from rlhf_book.ppo import PPOConfig, PPOTrainer

    lm, tok = tiny_world
    tr = PPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, gold_reward_fn,
                    PPOConfig(batch_size=4, minibatch_size=4, max_new_tokens=6, progress=False))
    history = tr.train(["Review Luigi's.", "How was the hotel Seaside Inn?"] * 2, 2)
    exp, last = tr.experience, history[-1]
    assert last["return_var"] == pytest.approx(masked_var(exp.returns, exp.mask).item())
    assert last["return_var"] > 0
    error_var = masked_var(exp.returns - exp.values, exp.mask).item()
    assert last["explained_variance"] == pytest.approx(1 - error_var / last["return_var"], abs=1e-5)
