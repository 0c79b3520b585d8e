"""The Bernoulli loss on probabilities for binarized targets (every x exactly 0 or 1).

The CPU kernels take one logarithm per element where a whole vector of targets is binary and d/dx is
not wanted (csrc/cpu/avx2_math.h, log_binary_likelihood_clamped), instead of log p and log(1 - p).
That path must give the very bits of the two-logarithm path: asking for d/dx forces the latter on
the same inputs, so the loss of every row and d/d recon are compared bit for bit, on targets that
are binary in whole vectors, in some lanes only, and not at all, with probabilities at the clamps,
denormal, and next to 0 and 1. The loss is also checked against a float64 oracle written from the
definition, -max(log q, -100) with q = p for x = 1 and 1 - p for x = 0.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vae_fast

# float32 denormals, values where 1 - p rounds, the clamps' edges (log p = -100 at p = 3.7e-44)
SPECIAL_P = [0.0, 1.0, 0.5, 1e-45, 1e-43, 3e-44, 1e-40, 2e-38, 1e-30, 1e-13, 1e-7, 3e-5, 1 - 2**-24, 1 - 2**-11,
             1 - 2**-8, 0.999, 0.01]
FEATURES = [1, 7, 8, 9, 16, 17, 784, 4097]


@st.composite
def binary_cases(draw):
    batch = draw(st.integers(1, 4))
    features = draw(st.sampled_from(FEATURES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(batch, features, generator=g)
    special = torch.tensor(SPECIAL_P)[torch.randint(len(SPECIAL_P), (batch, features), generator=g)]
    p = torch.where(torch.rand(batch, features, generator=g) < 0.5, special, p)
    x = (torch.rand(batch, features, generator=g) < 0.5).float()
    # fractional targets in some 8-lane groups: those vectors take the two-logarithm path
    fractional = draw(st.sampled_from([0.0, 0.02, 0.5]))
    x = torch.where(torch.rand(batch, features, generator=g) < fractional, torch.rand(batch, features, generator=g), x)
    # rows of mostly neutral elements (p = 1, x = 1: loss exactly 0), so that a row's sum shows the
    # last bits of its few other elements
    neutral = torch.rand(batch, features, generator=g) < draw(st.sampled_from([0.0, 0.9, 0.99]))
    return torch.where(neutral, 1.0, p), torch.where(neutral, 1.0, x)


def loss_and_grad(p, x, *, grad_x):
    recon = p.clone().requires_grad_(True)
    target = x.clone().requires_grad_(grad_x)
    mu = torch.zeros(p.shape[0], 2)
    logvar = torch.zeros(p.shape[0], 2)
    rows = vae_fast.vae_loss(recon, target, mu, logvar, reduction="none")
    (grad_recon,) = torch.autograd.grad(rows.sum(), recon)
    return rows.detach(), grad_recon


def oracle_rows(p, x):
    p64, x64 = p.double(), x.double()
    log_p = torch.log(p64).clamp(min=-100)
    log_1mp = torch.log1p(-p64).clamp(min=-100)
    element = torch.where(x64 == 1, -log_p, torch.where(x64 == 0, -log_1mp, -(x64 * log_p + (1 - x64) * log_1mp)))
    return element.sum(dim=1)


@settings(max_examples=60, deadline=None)
@given(case=binary_cases())
def test_one_logarithm_path_gives_the_two_logarithm_bits(case):
    p, x = case
    fast_rows, fast_grad = loss_and_grad(p, x, grad_x=False)
    both_rows, both_grad = loss_and_grad(p, x, grad_x=True)
    assert torch.equal(fast_rows, both_rows)
    assert torch.equal(fast_grad, both_grad)
    expected = oracle_rows(p, x)
    # each element within a few float32 roundings of its magnitude (<= 100), summed in float32
    tolerance = 1e-6 * p.shape[1] * expected.abs().clamp(min=1.0) / max(1, math.isqrt(p.shape[1]))
    assert ((fast_rows.double() - expected).abs() <= tolerance).all(), (fast_rows, expected)


@pytest.mark.parametrize("p", [1e-7, 3e-5, 1e-13])
def test_small_p_with_target_0_keeps_log1p_digits(p):
    """x = 0, p small: 1 - p rounds in float32, so log(1 - p) from the rounded value would be off by
    up to 50% (p = 1e-7); the loss must be p to float32 precision, as log1p(-p) gives it."""
    probs = torch.full((1, 16), p)
    rows, _ = loss_and_grad(probs, torch.zeros(1, 16), grad_x=False)
    assert rows.item() == pytest.approx(-16 * math.log1p(-p), rel=1e-6)
