"""The densities of a vae_fast model written with torch.distributions only, as the tests' oracle:
independent of vae_fast's loss and evaluation code, applied to the model's own network outputs.
Every function works for VAE ([B, D] outputs) and ConvVAE ([B, C, H, W] outputs) alike."""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli, Laplace, Normal, kl_divergence


def log_px_given_output(model, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """log p(x | z) for the decoder output of z: [N] for output [N, ...] and x of N samples with
    the same number of elements each."""
    x = x.reshape(output.shape)
    if model.likelihood == "bernoulli":
        return Bernoulli(logits=output, validate_args=False).log_prob(x).flatten(1).sum(1)
    log_scale = torch.zeros((), dtype=output.dtype) if model.log_scale is None else model.log_scale
    family = Normal if model.likelihood == "gaussian" else Laplace
    return family(output, log_scale.exp()).log_prob(x).flatten(1).sum(1)


def kl_to_prior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample: [B]."""
    standard = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    return kl_divergence(Normal(mu, (0.5 * logvar).exp()), standard).sum(1)


def negative_elbo(model, x: torch.Tensor, output: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per-sample -log p(x|z) + beta * KL(q(z|x) || N(0, I)) for one z (whose decoder output is `output`): [B]."""
    return -log_px_given_output(model, x, output) + beta * kl_to_prior(mu, logvar)


def log_importance_weight(model, x: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log p(x|z) + log N(z; 0, I) - log N(z; mu, exp(logvar)) for z [N, L] (rows of mu, logvar
    and x belonging to each z): [N]."""
    log_prior = Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(1)
    log_posterior = Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(1)
    return log_px_given_output(model, x, model.decode_output(z)) + log_prior - log_posterior
