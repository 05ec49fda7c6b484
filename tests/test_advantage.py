"""Advantage estimation and per-token rewards: hand-computed values and invariants."""

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch

from rlhf_book.advantage import discounted_returns, gae, masked_mean, masked_var, masked_whiten, td_errors
from rlhf_book.rewards import per_token_rewards


def _batch(seed=0, B=4, T=7):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    lengths = torch.tensor([T, 3, 1, 5][:B])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return rewards, values, mask


def test_seed_advantage_example():
    # V(s_t) = 1.2, r_t = 0.5, V(s_{t+1}) = 1.0, gamma = 0.9  ->  A = 0.5 + 0.9 * 1.0 - 1.2 = 0.2
    rewards = torch.tensor([[0.5, 0.0]])
    values = torch.tensor([[1.2, 1.0]])
    mask = torch.ones(1, 2)
    delta = td_errors(rewards, values, mask, gamma=0.9)
    assert delta[0, 0].item() == pytest.approx(0.2, abs=1e-6)
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    assert adv[0, 0].item() == pytest.approx(0.2, abs=1e-6)


def test_seed_value_target_example():
    # V = 3.0, r = 0.5, V' = 4.0, gamma = 0.9: target r + gamma V' = 4.1, so V is too low by 1.1
    rewards = torch.tensor([[0.5, 0.0]])
    values = torch.tensor([[3.0, 4.0]])
    mask = torch.ones(1, 2)
    _, returns = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    assert returns[0, 0].item() == pytest.approx(4.1, abs=1e-6)
    assert (returns - values)[0, 0].item() == pytest.approx(1.1, abs=1e-6)


def test_td_errors_by_hand_no_bootstrap_past_end():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    delta = td_errors(rewards, values, mask, gamma=0.5)
    expected = torch.tensor([[0.0 + 0.5 * 0.6 - 0.5, 0.0 + 0.5 * 0.7 - 0.6, 1.0 + 0.0 - 0.7, 0.0]])
    torch.testing.assert_close(delta, expected)


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    got = discounted_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(got, torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]]))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lambda_one_is_mc_return_minus_values(gamma):
    rewards, values, mask = _batch()
    adv, returns = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    mc = discounted_returns(rewards, mask, gamma)
    m = mask.bool()
    torch.testing.assert_close(adv[m], (mc - values)[m])
    torch.testing.assert_close(returns[m], mc[m])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lambda_zero_is_td_error(gamma):
    rewards, values, mask = _batch(1)
    adv, returns = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    torch.testing.assert_close(adv, td_errors(rewards, values, mask, gamma))
    m = mask.bool()
    torch.testing.assert_close(returns[m], (td_errors(rewards, values, mask, gamma) + values)[m])


def test_gae_matches_explicit_sum():
    rewards, values, mask = _batch(2)
    gamma, lam = 0.9, 0.7
    delta = td_errors(rewards, values, mask, gamma)
    adv, _ = gae(rewards, values, mask, gamma, lam)
    for b in range(rewards.size(0)):
        n = int(mask[b].sum())
        for t in range(n):
            expect = sum((gamma * lam) ** (k - t) * delta[b, k] for k in range(t, n))
            assert adv[b, t].item() == pytest.approx(float(expect), abs=1e-5)


def test_padding_changes_nothing():
    rewards, values, mask = _batch(3)
    pad = 5
    # padded columns hold garbage, including NaN/inf, which must not leak into real tokens
    junk = torch.full((rewards.size(0), pad), float("nan"))
    r2 = torch.cat([rewards, junk], 1)
    v2 = torch.cat([values, torch.full_like(junk, float("inf"))], 1)
    m2 = torch.cat([mask, torch.zeros(mask.size(0), pad, dtype=mask.dtype)], 1)
    # garbage at already-masked positions inside the original width too
    r2 = torch.where(m2.bool(), r2, torch.tensor(float("nan")))
    for fn in (
        lambda r, v, m: td_errors(r, v, m, 0.9),
        lambda r, v, m: gae(r, v, m, 0.9, 0.8)[0],
        lambda r, v, m: gae(r, v, m, 0.9, 0.8)[1],
        lambda r, v, m: discounted_returns(r, m, 0.9),
    ):
        a, b = fn(rewards, values, mask), fn(r2, v2, m2)
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b[:, : rewards.size(1)], a)
        assert (b[:, rewards.size(1) :] == 0).all()
    w1, w2 = masked_whiten(values, mask), masked_whiten(v2, m2)
    torch.testing.assert_close(w2[:, : values.size(1)], w1)


def test_masked_stats():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # values 1, 2, 3
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="mask"):
        masked_var(x, torch.zeros_like(mask))


def test_masked_whiten_shift_mean():
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    mask[2, 3:] = 0
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-4)
    w_keep = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w_keep, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-5)
    assert masked_var(w_keep, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()


def test_mask_with_holes_is_rejected():
    with pytest.raises(ValueError, match="right-padded"):
        td_errors(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1, 0, 1]]))


def test_per_token_rewards_places_score_at_last_token():
    scores = torch.tensor([2.0, -1.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    rewards, kl = per_token_rewards(scores, mask)
    expected = torch.tensor([[0, 0, 0, 2.0], [0, -1.0, 0, 0], [0.5, 0, 0, 0]])
    torch.testing.assert_close(rewards, expected)
    assert (kl == 0).all()


def test_per_token_rewards_kl_term():
    scores = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, float("nan")]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -0.2, -7.0]])
    rewards, kl = per_token_rewards(scores, mask, logprobs, ref, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.2, 0.0, 0.0]]))
    expected = torch.tensor([[-0.05, 0.1, 1.0], [-0.02, 3.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    # the sum of per-token rewards is the score minus beta times the sequence k1 KL
    torch.testing.assert_close(rewards.sum(1), scores - 0.1 * kl.sum(1))


def test_per_token_rewards_bad_input():
    mask = torch.tensor([[1, 1], [0, 0]])
    with pytest.raises(ValueError, match="row 1"):
        per_token_rewards(torch.zeros(2), mask)
    with pytest.raises(ValueError, match="scores"):
        per_token_rewards(torch.zeros(3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="ref_logprobs"):
        per_token_rewards(torch.zeros(2), torch.ones(2, 2), logprobs=torch.zeros(2, 2))
