"""KL estimators (Schulman), the KL loss and the beta controllers."""

import math

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch

from rlhf_book.kl import (
    AdaptiveKLController,
    FixedKLController,
    exact_kl,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss,
    make_kl_controller,
    sequence_kl,
)

ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}

# pi_theta (samples come from it) and pi_ref: two categoricals over 5 actions, KL ~ 0.3 nats
LOGITS_PI = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
LOGITS_REF = torch.tensor([-0.5, 0.0, 0.8, 0.2, -0.3])


def _samples(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp, lq = torch.log_softmax(LOGITS_PI, -1), torch.log_softmax(LOGITS_REF, -1)
    a = torch.multinomial(lp.exp(), n, replacement=True, generator=g)
    return lp[a], lq[a]


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_unbiased_estimators_match_exact_kl(kind):
    true = exact_kl(LOGITS_PI, LOGITS_REF).item()
    assert 0.2 < true < 1.0
    lp, lq = _samples()
    est = ESTIMATORS[kind](lp, lq)
    se = est.std().item() / math.sqrt(est.numel())
    assert abs(est.mean().item() - true) < 4 * se, (kind, est.mean().item(), true, se)


def test_k2_is_biased_and_k3_has_lower_variance_than_k1():
    true = exact_kl(LOGITS_PI, LOGITS_REF).item()
    lp, lq = _samples()
    k1, k2, k3 = kl_k1(lp, lq), kl_k2(lp, lq), kl_k3(lp, lq)
    se2 = k2.std().item() / math.sqrt(k2.numel())
    assert abs(k2.mean().item() - true) > 10 * se2  # biased at this distance
    assert k3.std() < k1.std()
    assert (k1 < 0).any() and (k3 >= 0).all() and (k2 >= 0).all()


def test_k3_is_nonnegative_and_accurate_for_tiny_log_ratios():
    x = torch.tensor([1e-9, -1e-9, 1e-5, -1e-5, 3e-4, 0.0, 5.0, -5.0], dtype=torch.float32)
    k3 = kl_k3(torch.zeros_like(x), x)  # log r = x
    assert (k3 >= 0).all()
    expect = torch.expm1(x.double()) - x.double()  # float64 reference
    torch.testing.assert_close(k3.double(), expect, rtol=1e-3, atol=1e-30)
    # the naive formula loses all precision in float32 for |x| ~ 1e-5 (and so does expm1(x) - x below ~1e-6)
    naive = (torch.exp(x) - 1) - x
    assert not torch.allclose(naive[2:4].double(), expect[2:4], rtol=1e-3, atol=1e-30)
    # and the gradient is finite and correct on both branches (d k3 / d x = e^x - 1)
    xg = x.clone().requires_grad_(True)
    kl_k3(torch.zeros_like(xg), xg).sum().backward()
    torch.testing.assert_close(xg.grad.double(), torch.expm1(x.double()), rtol=1e-3, atol=1e-12)


def test_identity_gives_zero_kl():
    lp = torch.log_softmax(torch.randn(3, 7, generator=torch.Generator().manual_seed(0)), -1)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(ESTIMATORS[kind](lp, lp), torch.zeros_like(lp))


def _expected_grad(estimator):
    """E_{a ~ pi}[grad_theta estimator(a)] computed exactly (pi detached in the weights)."""
    theta = LOGITS_PI.clone().requires_grad_(True)
    lp = torch.log_softmax(theta, -1)
    lq = torch.log_softmax(LOGITS_REF, -1)
    per_action = estimator(lp, lq)  # value of the estimator if action a were sampled
    (lp.detach().exp() * per_action).sum().backward()
    return theta.grad


def test_gradient_of_sampled_kl_is_not_gradient_of_kl():
    theta = LOGITS_PI.clone().requires_grad_(True)
    exact_kl(theta, LOGITS_REF).backward()
    grad_reverse_kl = theta.grad.clone()  # KL(pi_theta || pi_ref): the RLHF objective's
    theta.grad = None
    exact_kl(LOGITS_REF, theta).backward()
    grad_forward_kl = theta.grad.clone()  # KL(pi_ref || pi_theta)
    g1, g3 = _expected_grad(kl_k1), _expected_grad(kl_k3)
    torch.testing.assert_close(g1, torch.zeros_like(g1), atol=1e-6, rtol=0)  # k1 as a loss: zero on average
    torch.testing.assert_close(g3, grad_forward_kl, atol=1e-6, rtol=1e-5)  # k3 as a loss: the forward KL's gradient
    assert (g3 - grad_reverse_kl).abs().max() > 1e-2  # ... which is not the reverse KL's


def test_sequence_kl_and_kl_loss_ignore_padding():
    g = torch.Generator().manual_seed(1)
    lp, lq = -torch.rand(2, 4, generator=g), -torch.rand(2, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    seq, loss = sequence_kl(kl_k1(lp, lq), mask), kl_loss(lp, lq, mask)
    # pad more columns holding garbage (NaN, inf): nothing changes
    lp2 = torch.cat([lp, torch.full((2, 3), float("nan"))], 1)
    lq2 = torch.cat([lq, torch.full((2, 3), float("-inf"))], 1)
    mask2 = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1)
    lp2[0, 3], lq2[1, 2] = float("nan"), float("inf")
    torch.testing.assert_close(sequence_kl(kl_k1(lp2, lq2), mask2), seq)
    torch.testing.assert_close(kl_loss(lp2, lq2, mask2), loss)
    expect = sum(kl_k3(lp[i, j], lq[i, j]) for i in range(2) for j in range(4) if mask[i, j]) / 5
    torch.testing.assert_close(loss, expect)


def test_adaptive_controller_moves_beta_toward_target():
    c = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert c.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    b = c.value
    assert c.update(3.0, 100) == pytest.approx(b * (1 - 0.2 * 0.1))  # KL below target: beta goes down
    b = c.value
    assert c.update(6.6, 100) == pytest.approx(b * (1 + 0.1 * 0.1))  # inside the clip: proportional
    assert c.update(6.0, 100) == pytest.approx(c.value)  # at target: unchanged


def test_adaptive_controller_closed_loop_settles_near_target():
    # a toy "environment" where the policy's KL is inversely proportional to beta
    c, target = AdaptiveKLController(0.02, target=4.0, horizon=500), 4.0
    kl = None
    for _ in range(400):
        kl = 0.5 / c.value
        c.update(kl, 64)
    assert abs(kl / target - 1) < 0.05, kl
    assert c.value == pytest.approx(0.5 / target, rel=0.05)


def test_controller_state_roundtrip_and_factory():
    c = AdaptiveKLController(0.1, 6.0)
    c.update(10.0, 256)
    d = AdaptiveKLController(1.0, 1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value and d.target == 6.0
    f = make_kl_controller(0.05)
    assert isinstance(f, FixedKLController) and f.update(100.0, 10) == 0.05
    assert isinstance(make_kl_controller(0.05, target=6.0), AdaptiveKLController)
    with pytest.raises(ValueError):
        FixedKLController(-0.1)
