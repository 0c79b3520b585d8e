"""vae_fast.evaluation: the IWAE estimate against log p(x) integrated by brute force on a tiny
float64 model with a 1-D and a 2-D latent, its stability, and the negative ELBO's parts."""

import math

import pytest
import torch

from vae_fast import VAE
from vae_fast.evaluation import iwae_log_likelihood, log_importance_weights, negative_elbo


def _tiny_model(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(input_dim=3, hidden_dim=5, latent_dim=1).double().eval()


def _brute_force_log_px(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """log of the integral of p(x|z) N(z; 0, 1) over z, by the trapezoid rule on a fine grid."""
    z = torch.linspace(-12, 12, 48001, dtype=torch.float64)
    logits = model.decode_logits(z[:, None])  # [G, D]
    log_px_z = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, None, :].expand(-1, len(x), -1), x[None].expand(len(z), -1, -1), reduction="none"
    ).sum(-1)  # [G, N]
    log_integrand = log_px_z - 0.5 * z[:, None] ** 2 - 0.5 * math.log(2 * math.pi)
    dz = float(z[1] - z[0])
    weights = torch.full_like(z, dz)
    weights[[0, -1]] = dz / 2
    return torch.logsumexp(log_integrand + weights.log()[:, None], dim=0)


@torch.no_grad()
def test_iwae_matches_brute_force_integral():
    model = _tiny_model()
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    exact = _brute_force_log_px(model, x).mean().item()
    estimate = iwae_log_likelihood(model, x, samples=20000, seed=0)
    assert estimate == pytest.approx(exact, abs=5e-3)
    # The bound tightens with K: one sample is (in expectation) the ELBO, below log p(x).
    many = x.repeat(500, 1)
    elbo = iwae_log_likelihood(model, many, samples=1, seed=1)
    assert elbo == pytest.approx(-negative_elbo(model, many, seed=2)["loss"], abs=0.05)
    assert elbo < iwae_log_likelihood(model, many, samples=10, seed=3) < exact


def _tiny_model_2d(seed: int = 0) -> VAE:
    """A float64 model with a 2-D latent whose decoder is sharpened (weights x3) so that the
    posterior is far from the prior: ELBO and log p(x) differ by ~0.5 nats, so a wrong log q,
    log p(z) or a per-dimension constant counted once instead of L times shows clearly."""
    torch.manual_seed(seed)
    model = VAE(input_dim=3, hidden_dim=5, latent_dim=2).double().eval()
    with torch.no_grad():
        for layer in model.decoder:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(3.0)
    return model


def _brute_force_log_px_2d(model: VAE, x: torch.Tensor, points: int = 801, half_width: float = 9.0) -> torch.Tensor:
    """log of the integral of p(x|z) N(z; 0, I_2) over z in R^2, by the 2-D (product) trapezoid
    rule on a points x points grid over [-half_width, half_width]^2. The prior's mass outside the
    square is ~1e-18 and the integrand is smooth: 401, 801 and 1201 points agree to 1e-8 nats."""
    t = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    z = torch.cartesian_prod(t, t)  # [G^2, 2]
    logits = model.decode_logits(z)
    log_px_z = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, None, :].expand(-1, len(x), -1), x[None].expand(len(z), -1, -1), reduction="none"
    ).sum(-1)  # [G^2, N]
    log_integrand = log_px_z - 0.5 * z.pow(2).sum(-1, keepdim=True) - math.log(2 * math.pi)
    dt = float(t[1] - t[0])
    w = torch.full_like(t, dt)
    w[[0, -1]] = dt / 2
    log_w = (w[:, None] * w[None, :]).reshape(-1).log()
    return torch.logsumexp(log_integrand + log_w[:, None], dim=0)


@torch.no_grad()
def test_iwae_matches_brute_force_integral_with_a_2d_latent():
    model = _tiny_model_2d()
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    per_input = _brute_force_log_px_2d(model, x)
    torch.testing.assert_close(per_input, _brute_force_log_px_2d(model, x, points=401), rtol=0, atol=1e-6)  # grid converged
    exact = per_input.mean().item()
    # 200000 samples: seeds 0-3 land within 3e-3 of the integral (the estimator's spread at this K).
    estimate = iwae_log_likelihood(model, x, samples=200000, seed=0)
    assert estimate == pytest.approx(exact, abs=5e-3)
    # A lower bound in expectation that tightens with K. Averages over 8000 independent estimates
    # (standard errors checked below), so the ordering is not a fluke of one draw.
    many = x.repeat(2000, 1)
    means = {}
    for k, seed in ((1, 1), (5, 2), (25, 3)):
        log_w = log_importance_weights(model, many, k, generator=torch.Generator().manual_seed(seed))
        # Each estimate minus its own input's log p(x): the gap, whose spread is the estimator's
        # alone (not the spread of log p(x) across the four inputs).
        gaps = torch.logsumexp(log_w, dim=0) - math.log(k) - per_input.repeat(2000)
        mean, stderr = gaps.mean().item(), (gaps.std() / math.sqrt(len(gaps))).item()
        assert mean + 4 * stderr < 0, f"K={k}: mean gap {mean:.4f} +- {stderr:.4f} to log p(x) is not negative"
        means[k] = (mean, stderr)
    assert means[1][0] + 4 * means[1][1] < means[5][0] and means[5][0] + 4 * means[5][1] < means[25][0]
    # K=1 is the ELBO: the library's negative ELBO on the same inputs agrees, and is ~0.5 nats below.
    elbo = -negative_elbo(model, many, seed=4)["loss"]
    assert elbo - exact == pytest.approx(means[1][0], abs=0.05)
    assert exact - elbo > 0.3


@torch.no_grad()
def test_importance_weights_are_stable_for_huge_negative_log_likelihoods():
    model = _tiny_model()
    for layer in model.decoder:
        if isinstance(layer, torch.nn.Linear):
            layer.weight.mul_(300.0)  # saturated logits: log p(x|z) of order -1e4
    x = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    log_w = log_importance_weights(model, x, 64, generator=torch.Generator().manual_seed(0))
    assert log_w.shape == (64, 1) and log_w.dtype == torch.float64
    estimate = iwae_log_likelihood(model, x, samples=64)
    assert math.isfinite(estimate) and estimate <= 0


@torch.no_grad()
def test_iwae_batches_and_chunks_cover_every_input(monkeypatch):
    import vae_fast.evaluation as evaluation

    model = _tiny_model()
    x = torch.bernoulli(torch.full((7, 3), 0.5, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(evaluation, "_CHUNK_ELEMENTS", 64)  # many sample chunks per batch
    chunked = iwae_log_likelihood(model, x, samples=3000, batch_size=3)
    exact = _brute_force_log_px(model, x).mean().item()
    assert chunked == pytest.approx(exact, abs=2e-2)


def test_iwae_rejects_zero_samples():
    with pytest.raises(ValueError, match="samples must be >= 1"):
        iwae_log_likelihood(_tiny_model(), torch.zeros(2, 3, dtype=torch.float64), samples=0)


def test_negative_elbo_parts_add_up_and_are_seeded():
    model = _tiny_model()
    x = torch.ones(5, 3, dtype=torch.float64)
    result = negative_elbo(model, x, beta=0.5, batch_size=2, seed=3)
    assert result["loss"] == pytest.approx(result["recon"] + 0.5 * result["kl"])
    assert result == negative_elbo(model, x, beta=0.5, batch_size=2, seed=3)
