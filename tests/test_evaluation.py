"""vae_fast.evaluation: the IWAE estimate against log p(x) integrated by brute force on a tiny
float64 model with a 1-D latent, its stability, and the negative ELBO's parts."""

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
