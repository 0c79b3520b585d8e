"""The count likelihoods of vae_fast.vae_loss (issue 20): Poisson, NB and ZINB, fused and in the
pure-torch reference, against the mpmath oracle of tests/count_oracle.py, which is written from the
definitions. Each check runs both implementations: the fused op (vae_fast.vae_loss) and the
reference (vae_fast.reference.vae_loss, the fallback where the extension does not serve a device).

Accuracy rule, per element: |result - oracle| <= max(rel * |oracle|, rounding * magnitude), rel =
1e-5 for float32 (1e-9 for float64) and rounding = 16 units of float32's roundoff (32 of float64's), magnitude the
sum of |terms| of the quantity's definition (count_oracle's docstring: only where the definition
itself cancels does the bound leave relative error). The loss's magnitude is the loss.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, strategies as st

import vae_fast
from vae_fast import baselines, reference

import count_oracle
from conftest import DEVICES, relative_error

IMPLEMENTATIONS = {"fused": vae_fast.vae_loss, "reference": reference.vae_loss}
COUNTS = ("poisson", "nb", "zinb")
# float64: a count's loss near its mode (about 8 at x = mu = 1e6) is made of terms of about 1e7,
# whose float64 roundings alone are 1e-9 of it.
REL = {torch.float32: 1e-5, torch.float64: 1e-9}
# Float64 gets 32 units: the reference's Stirling form of the Gamma ratio (theta >= 10) takes a few
# more roundings than 16 in d/d log_theta at x = 1 (measured: 26 units at theta = 10, mu = 1e-8).
ROUNDING = {torch.float32: 16 * 2.0**-24, torch.float64: 32 * 2.0**-53}
TINY = torch.finfo(torch.float32).tiny

# The ranges: theta 1e-4..1e8 (10 is the reference's lgamma/Stirling switch), mu 1e-8..1e6,
# counts 0..1e6 (the likely ones near mu, and far tails), zero inflation certain (30) to absent (-30).
THETAS = (1e-4, 1e-2, 1.0, 9.99, 10.0, 1e2, 1e4, 1e6, 1e8)
MUS = (1e-8, 1e-4, 0.1, 1.0, 10.0, 1e3, 1e6)
ZI_LOGITS = (-30.0, -2.0, 0.0, 3.0, 30.0)


def counts_for(mu: float, theta: float) -> list[float]:
    """0, small counts, the mean and three standard deviations above it, and the range's top."""
    sd = math.sqrt(mu + mu * mu / theta)
    return sorted({0.0, 1.0, 2.0, 7.0, float(round(mu)), min(float(round(mu + 3 * sd)), 1e6), 1e6})


def extreme_grid(likelihood: str) -> dict[str, torch.Tensor]:
    """Every combination of the ranges' corner values, as float32 [N] tensors (log_mu, x,
    log_theta, zi_logits; the last two None where the likelihood has none)."""
    rows = []
    thetas = (math.inf,) if likelihood == "poisson" else THETAS
    zis = (0.0,) if likelihood != "zinb" else ZI_LOGITS
    for theta, mu, zi in itertools.product(thetas, MUS, zis):
        extra = [0.5, 2.5] if likelihood != "zinb" else []  # Poisson/NB take non-integer counts too
        for x in counts_for(mu, theta) + extra:
            rows.append((math.log(mu), x, math.log(theta), zi))
    columns = torch.tensor(rows, dtype=torch.float32).T
    return {"log_mu": columns[0], "x": columns[1],
            "log_theta": None if likelihood == "poisson" else columns[2],
            "zi_logits": columns[3] if likelihood == "zinb" else None}


def loss_and_gradients(impl, likelihood: str, inputs: dict, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-element loss (one element per sample, KL exactly 0) and the gradient of their sum with
    respect to each tensor input, in count_oracle's quantity names."""
    leaves = {name: t.to(device=device, dtype=dtype).reshape(-1, 1).requires_grad_()
              for name, t in inputs.items() if t is not None}
    n = leaves["log_mu"].shape[0]
    zeros = torch.zeros(n, 1, device=device, dtype=dtype)
    loss = impl(leaves["log_mu"], leaves["x"], zeros, zeros, likelihood=likelihood, log_theta=leaves.get("log_theta"),
                zi_logits=leaves.get("zi_logits"), reduction="none")
    names = list(leaves)
    grads = torch.autograd.grad(loss.sum(), [leaves[k] for k in names])
    out = {"loss": loss.detach()}
    for name, g in zip(names, grads):
        out[{"log_mu": "recon"}.get(name, name)] = g.reshape(-1)
    return out


def oracle_of(likelihood: str, inputs: dict, dtype: torch.dtype = torch.float32):
    """The oracle at the inputs as rounded to `dtype` (what the op sees)."""
    rounded = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    return count_oracle.elements(likelihood, rounded["log_mu"], rounded["x"], rounded["log_theta"], rounded["zi_logits"])


def accuracy_failures(results: dict, oracle: dict, rel: float, rounding: float, inputs: dict) -> list[str]:
    """The quantities outside the accuracy rule, each with its worst point."""
    failures = []
    for name, actual in results.items():
        expected, magnitude = oracle[name]
        actual = actual.detach().double().cpu().reshape(expected.shape)
        allowed = torch.maximum(rel * expected.abs(), rounding * magnitude).clamp(min=rel * TINY)
        excess = (actual - expected).abs() / allowed
        excess = torch.where(torch.isnan(excess), torch.full_like(excess, math.inf), excess)
        worst = int(excess.argmax())
        if excess[worst] > 1:
            point = {k: float(v[worst]) for k, v in inputs.items() if v is not None}
            failures.append(f"{name}: {float(actual[worst])!r} vs oracle {float(expected[worst])!r} "
                            f"(magnitude {float(magnitude[worst]):.3g}, {float(excess[worst]):.3g}x the bound) at {point}")
    return failures


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("likelihood", COUNTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_grid_matches_the_oracle(impl, likelihood, device, dtype):
    inputs = extreme_grid(likelihood)
    results = loss_and_gradients(IMPLEMENTATIONS[impl], likelihood, inputs, device, dtype)
    failures = accuracy_failures(results, oracle_of(likelihood, inputs, dtype), REL[dtype], ROUNDING[dtype], inputs)
    assert not failures, "\n".join(failures)
