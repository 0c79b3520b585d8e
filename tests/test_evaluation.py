"""vae_fast.evaluation: the IWAE estimate against log p(x) integrated by brute force on a tiny
float64 model with a 1-D and a 2-D latent, its stability, and the negative ELBO's parts; for
Gaussian and Laplace decoders (fixed and learned scales, VAE and ConvVAE) the weights against
torch.distributions, the bound's ordering in K, a linear-Gaussian model whose log p(x) has a closed
form, and evaluate_checkpoint."""

import math

import pytest
import torch

import likelihood_oracle
from vae_fast import VAE, ConvVAE
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


# --- Gaussian and Laplace decoders (issue 10).


def _continuous_model(kind: str, likelihood: str, learn_scale: str, seed: int = 0):
    """A float64 VAE ([N, 6] data) or ConvVAE ([N, 1, 4, 6] data) with its learned log_scale moved
    off 0, so that a dropped or misplaced scale shows."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model = VAE(input_dim=6, hidden_dim=8, latent_dim=2, likelihood=likelihood, learn_scale=learn_scale)
    else:
        model = ConvVAE((1, 4, 6), 2, (4, 8), likelihood=likelihood, learn_scale=learn_scale)
    model = model.double().eval()
    if model.log_scale is not None:
        with torch.no_grad():
            model.log_scale.uniform_(-0.8, 0.5)
    return model


def _continuous_data(kind: str, n: int, seed: int = 1) -> torch.Tensor:
    shape = (n, 6) if kind == "mlp" else (n, 1, 4, 6)
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


def _record_decoded_z(model) -> list:
    """Make model.decode_output record every z it decodes (an instance attribute shadowing the
    method; `del model.decode_output` restores it). Returns the list it appends to."""
    seen, decode = [], model.decode_output
    model.decode_output = lambda z: (seen.append(z.detach().clone()), decode(z))[1]
    return seen


_CONTINUOUS_CASES = [
    ("mlp", "gaussian", "none"), ("mlp", "gaussian", "feature"), ("mlp", "laplace", "shared"),
    ("conv", "gaussian", "shared"), ("conv", "laplace", "feature"),
]


@torch.no_grad()
@pytest.mark.parametrize("kind, likelihood, learn_scale", _CONTINUOUS_CASES)
def test_importance_weights_match_torch_distributions(kind, likelihood, learn_scale, monkeypatch):
    """Each log-weight recomputed from the z the model decoded, with torch.distributions' decoder,
    prior and posterior densities; and the IWAE estimate from those weights."""
    import vae_fast.evaluation as evaluation

    model, x = _continuous_model(kind, likelihood, learn_scale), _continuous_data(kind, 5)
    # Chunks of 7 samples (3 for K = 16): the decoder's widest activation per sample is the MLP's
    # hidden layer (8) or the ConvVAE's 1x4x6 output (as large as its 4x2x3 feature map).
    widest = {"mlp": 8, "conv": 24}[kind]
    monkeypatch.setattr(evaluation, "_CHUNK_ELEMENTS", 5 * widest * 7)
    seen = _record_decoded_z(model)
    log_w = log_importance_weights(model, x, 16, generator=torch.Generator().manual_seed(0))
    del model.decode_output
    probe, *seen = seen  # one z of zeros, decoded to measure the activations
    assert torch.equal(probe, torch.zeros(1, 2, dtype=torch.float64))
    assert [len(z) for z in seen] == [35, 35, 10]
    z = torch.cat(seen).reshape(16, 5, 2)
    assert log_w.shape == (16, 5) and log_w.dtype == torch.float64
    assert z.std(0).min() > 0.05  # 16 different draws per input
    mu, logvar = model.encode(x)
    expected = torch.stack([likelihood_oracle.log_importance_weight(model, x, z_k, mu, logvar) for z_k in z])
    torch.testing.assert_close(log_w, expected, rtol=1e-10, atol=1e-10)
    iwae = (torch.logsumexp(expected, 0) - math.log(16)).mean().item()
    assert iwae_log_likelihood(model, x, samples=16, seed=0) == pytest.approx(iwae, rel=1e-12, abs=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("kind, likelihood, learn_scale", _CONTINUOUS_CASES)
def test_negative_elbo_matches_torch_distributions(kind, likelihood, learn_scale):
    model, x = _continuous_model(kind, likelihood, learn_scale), _continuous_data(kind, 7)
    seen = _record_decoded_z(model)
    result = negative_elbo(model, x, beta=0.5, batch_size=3, seed=2)
    del model.decode_output
    z = torch.cat(seen)
    mu, logvar = model.encode(x)
    recon = -likelihood_oracle.log_px_given_output(model, x, model.decode_output(z)).mean().item()
    kl = likelihood_oracle.kl_to_prior(mu, logvar).mean().item()
    assert result["recon"] == pytest.approx(recon, rel=1e-10)
    assert result["kl"] == pytest.approx(kl, rel=1e-10)
    assert result["loss"] == pytest.approx(recon + 0.5 * kl, rel=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_the_bound_is_the_elbo_at_one_sample_and_rises_with_k(likelihood):
    """Averages over 6000 estimates (4 inputs repeated), with standard errors: K = 1 is the ELBO
    in expectation (the library's negative ELBO agrees), and K = 5, 25 are higher on average. The
    random encoder is far from the true posterior, so the gaps are large (measured: K = 1, 5, 25 give
    -39.3, -17.6, -15.9 nats for gaussian, -17.0, -12.9, -12.5 for laplace)."""
    model = _continuous_model("mlp", likelihood, "feature")
    with torch.no_grad():
        for layer in model.decoder:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(2.0)  # a sharper decoder: the posterior moves away from the prior
    x = _continuous_data("mlp", 4).repeat(1500, 1)
    means = {}
    for k, seed in ((1, 1), (5, 2), (25, 3)):
        log_w = log_importance_weights(model, x, k, generator=torch.Generator().manual_seed(seed))
        estimates = torch.logsumexp(log_w, dim=0) - math.log(k)
        means[k] = (estimates.mean().item(), (estimates.std() / math.sqrt(len(estimates))).item())
    elbo = -negative_elbo(model, x, seed=4)["loss"]
    assert elbo == pytest.approx(means[1][0], abs=4 * means[1][1] + 0.01)
    assert means[1][0] + 4 * means[1][1] < means[5][0] and means[5][0] + 4 * means[5][1] < means[25][0], means


def test_chunks_are_sized_by_the_widest_decoder_activation():
    from vae_fast.evaluation import _widest_decoder_activation

    assert _widest_decoder_activation(VAE()) == 784  # 20 -> 400 -> 784
    assert _widest_decoder_activation(VAE(input_dim=64, hidden_dims=(1000, 300))) == 1000
    # 16 -> 64x7x7 -> 32x14x14 -> 1x28x28: the middle feature map is 8x the image.
    assert _widest_decoder_activation(ConvVAE((1, 28, 28), 16, (32, 64))) == 32 * 14 * 14


def _linear_gaussian_model(latent_dim: int, learn_scale: str, seed: int = 0) -> tuple[VAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Gaussian VAE whose decoder is linear, x = W z + b + sigma * noise: then p(x) is exactly
    N(b, W W^T + diag(sigma^2)). Returns (model, W [D, L], b [D], sigma [D])."""
    torch.manual_seed(seed)
    model = VAE(input_dim=4, hidden_dim=8, latent_dim=latent_dim, likelihood="gaussian", learn_scale=learn_scale).double().eval()
    model.decoder = torch.nn.Linear(latent_dim, 4).double()
    with torch.no_grad():
        model.log_scale.copy_(torch.linspace(-0.7, 0.2, 4, dtype=torch.float64) if learn_scale == "feature" else torch.tensor(-0.4))
    sigma = model.log_scale.detach().exp().expand(4)
    return model, model.decoder.weight.detach(), model.decoder.bias.detach(), sigma


def _exact_log_px(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    covariance = w @ w.T + torch.diag(sigma.pow(2))
    return torch.distributions.MultivariateNormal(b, covariance_matrix=covariance).log_prob(x)


@torch.no_grad()
def test_with_the_exact_posterior_every_weight_is_log_px():
    """Linear-Gaussian with a shared scale and orthogonal decoder columns: the true posterior is a
    diagonal Gaussian, N(P^-1 W^T (x - b) / sigma^2, P^-1) with P = I + W^T W / sigma^2. With that
    as the encoder, p(x|z) p(z) / q(z|x) = p(x) for every z: each importance weight and
    IWAE at any K equal the closed-form log p(x) to rounding, the ELBO in expectation."""
    model, _, b, sigma = _linear_gaussian_model(2, "shared")
    q, _ = torch.linalg.qr(torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    w = q * torch.tensor([1.5, 0.6], dtype=torch.float64)  # orthogonal columns of different lengths
    model.decoder.weight.copy_(w)
    s2 = sigma[0].item() ** 2
    precision = 1 + (w * w).sum(0) / s2  # diagonal, as W^T W is
    model.encode = lambda x: ((x - b) @ w / s2 / precision, (-precision.log()).expand(len(x), 2))
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    exact = _exact_log_px(x, w, b, sigma)
    log_w = log_importance_weights(model, x, 50, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(log_w, exact.expand(50, -1), rtol=0, atol=1e-10)
    assert iwae_log_likelihood(model, x, samples=3) == pytest.approx(exact.mean().item(), abs=1e-10)
    # The negative ELBO uses the analytic KL, so only its expectation is exact: over 30000 draws its
    # standard error is ~0.01 nat.
    assert -negative_elbo(model, x.repeat(5000, 1))["loss"] == pytest.approx(exact.mean().item(), abs=0.04)


@torch.no_grad()
@pytest.mark.parametrize("learn_scale", ["shared", "feature"])
def test_iwae_converges_to_the_closed_form_log_px_of_a_linear_gaussian_model(learn_scale):
    """The model's own (untrained) encoder as the proposal: the K = 1 bound is well below log p(x),
    and K = 20000 brings the estimate to it (seeds 0-4 land within 0.01 nat)."""
    model, w, b, sigma = _linear_gaussian_model(2, learn_scale)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1.5
    exact = _exact_log_px(x, w, b, sigma).mean().item()
    elbo = -negative_elbo(model, x.repeat(400, 1), seed=1)["loss"]
    assert exact - elbo > 0.3
    assert iwae_log_likelihood(model, x, samples=20000, seed=0) == pytest.approx(exact, abs=0.02)


def _checkpoint_of(model, path, *, dataset: str, dequantize: bool) -> None:
    from vae_fast.checkpoints import save_checkpoint

    save_checkpoint(path, {"model_config": model.config(), "model": model.state_dict(), "optimizer": {}, "epoch": 1,
                           "dataset": {"name": dataset}, "rng_states": {}, "history": [],
                           "train_config": {"dataset": dataset, "seed": 3, "data_dir": None, "data_file": None, "dequantize": dequantize}})


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_evaluate_checkpoint_of_a_gaussian_model_uses_the_runs_held_out_set(tmp_path, kind):
    from vae_fast.data import load_dataset
    from vae_fast.evaluation import evaluate_checkpoint

    torch.manual_seed(0)
    if kind == "mlp":
        model = VAE(input_dim=64, hidden_dim=16, latent_dim=2, likelihood="gaussian", learn_scale="shared")
    else:
        model = ConvVAE((1, 8, 8), 2, (4, 8), likelihood="gaussian", learn_scale="feature")
    with torch.no_grad():
        model.log_scale.fill_(-1.0)
    model.eval()
    for dequantize in (False, True):
        path = tmp_path / f"checkpoint-{dequantize}.pt"
        _checkpoint_of(model, path, dataset="digits", dequantize=dequantize)
        result = evaluate_checkpoint(path, samples=4)
        held_out = load_dataset("digits", seed=3, dequantize=dequantize).test_x
        assert (result["model"], result["likelihood"], result["held_out_samples"]) == (kind, "gaussian", len(held_out))
        with torch.no_grad():
            elbo = negative_elbo(model, held_out)
            assert result["iwae_log_likelihood"] == pytest.approx(iwae_log_likelihood(model, held_out, samples=4), rel=1e-12)
        assert (result["negative_elbo"], result["recon"], result["kl"]) == pytest.approx((elbo["loss"], elbo["recon"], elbo["kl"]), rel=1e-12)
        assert result["iwae_log_likelihood"] > -result["negative_elbo"] - 1  # a bound near the ELBO, not nonsense
