"""Actor loss, critic loss and entropy: values, gradients and masking."""

import math

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch

from rlhf_book.losses import entropy_bonus, entropy_from_logits, policy_gradient_loss, value_loss


def test_policy_gradient_loss_value_and_gradient_sign():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 100.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss = policy_gradient_loss(logprobs, adv, mask)
    assert loss.item() == pytest.approx(-(2.0 * -1.0 + -1.0 * -2.0) / 2)
    loss.backward()
    # descent direction raises log pi where A > 0 and lowers it where A < 0; masked token gets nothing
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, 0.5, 0.0]]))
    assert adv.grad is None or (adv.grad == 0).all()  # advantages are constants


def test_value_loss_half_mse_and_gradient():
    values = torch.tensor([[3.0, 1.0, 7.0]], requires_grad=True)
    returns = torch.tensor([[4.1, 0.0, -50.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss = value_loss(values, returns, mask)
    assert loss.item() == pytest.approx(0.5 * (1.1**2 + 1.0**2) / 2)
    loss.backward()
    # gradient is (V - target) / n_valid: the seed example's V = 3.0 is pushed up (towards 4.1)
    torch.testing.assert_close(values.grad, torch.tensor([[-1.1 / 2, 1.0 / 2, 0.0]]))


def test_value_loss_clipping():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, -0.1]])
    returns = torch.tensor([[1.0, 0.0]])
    mask = torch.ones(1, 2)
    # token 0: unclipped error 0, clipped V = 0.2 -> error 0.64; max = 0.64. token 1: |dV| < clip, error 0.01
    loss = value_loss(values, returns, mask, old_values=old, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01) / 2)
    assert value_loss(values, returns, mask).item() == pytest.approx(0.5 * 0.01 / 2)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, returns, mask, clip_range=0.2)


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, float("-inf")]]])
    h = entropy_from_logits(logits)
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0)
    torch.testing.assert_close(h, torch.tensor([[math.log(4), 0.0, float(-(p * p.log()).sum())]]), atol=1e-5, rtol=0)
    # matches torch.distributions
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 11, generator=g)
    torch.testing.assert_close(entropy_from_logits(z), torch.distributions.Categorical(logits=z).entropy())


def test_entropy_bonus_sign():
    ent = torch.tensor([[1.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert entropy_bonus(ent, mask, coef=0.1).item() == pytest.approx(-0.2)
