"""The code vae_fast is measured against: the PyTorch examples' VAE (pytorch/examples, vae/main.py)
and the plain eager formulas of the loss and the reparameterization. Tests use them to check the
drop-in contract; benchmarks use them as the eager and torch.compile baselines. Not for training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ExampleVAE(nn.Module):
    """The PyTorch examples' VAE: 784-400-20-400-784, ReLU, sigmoid output."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def example_loss_function(recon_x, x, mu, logvar):
    """The PyTorch examples' loss: summed BCE of probabilities + KL."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


def eager_loss_probs(recon, x, mu, logvar):
    """Eager baseline of the probabilities loss (sum reduction, beta = 1), any per-sample shape."""
    bce = F.binary_cross_entropy(recon, x.reshape(recon.shape), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def eager_loss_logits(recon_logits, x, mu, logvar):
    """Eager baseline of the logits loss (sum reduction, beta = 1), any per-sample shape."""
    bce = F.binary_cross_entropy_with_logits(recon_logits, x.reshape(recon_logits.shape), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_2 = math.log(2.0)


def _kl(mu, logvar):
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def eager_loss_gaussian(mean, x, mu, logvar, log_scale):
    """Eager baseline of the Gaussian negative ELBO with one shared learned log-sigma (sum reduction,
    beta = 1), constants included, in its cheapest form: the log-sigma term is n * log_sigma, not a
    per-element sum. (F.gaussian_nll_loss is slower: it expands the variance and clamps it per element.)"""
    z = (x.reshape(mean.shape) - mean) * torch.exp(-log_scale)
    return 0.5 * z.pow(2).sum() + mean.numel() * (log_scale + _HALF_LOG_2PI) + _kl(mu, logvar)


def eager_loss_laplace(location, x, mu, logvar, log_scale):
    """Eager baseline of the Laplace negative ELBO with one shared learned log-scale, as above."""
    a = (x.reshape(location.shape) - location).abs().sum() * torch.exp(-log_scale)
    return a + location.numel() * (log_scale + _LOG_2) + _kl(mu, logvar)


def eager_reparameterize(mu, logvar):
    """Eager baseline of the reparameterization trick."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


# ---- count likelihoods: scvi-tools' formulas (scvi.distributions._negative_binomial) ----


def log_nb_positive(x, mu, theta, eps=1e-8):
    """scvi-tools' NB log-likelihood per element, from its published definition: theta (log(theta +
    eps) - log(theta + mu + eps)) + x (log(mu + eps) - log(theta + mu + eps)) + lgamma(x + theta) -
    lgamma(theta) - lgamma(x + 1). x, mu: [B, D]; theta: [D] or [B, D] (inverse dispersion, > 0).
    Its lgamma difference cancels in float32 for large theta (scvi-tools issue 2965): at theta =
    1e5 both lgammas are about 1e6, whose float32 spacing is 0.06."""
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (theta * (torch.log(theta + eps) - log_theta_mu_eps) + x * (torch.log(mu + eps) - log_theta_mu_eps)
            + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))


def log_zinb_positive(x, mu, theta, pi, eps=1e-8):
    """scvi-tools' ZINB log-likelihood per element, from its published definition; pi holds the
    logits of the zero inflation. Both cases are computed for every element and multiplied by
    float32 masks (x < eps, x > eps), as scvi-tools does:
    zero: softplus(-pi + theta (log(theta + eps) - log(theta + mu + eps))) - softplus(-pi);
    non-zero: -softplus(-pi) - pi + theta (log(theta + eps) - log(theta + mu + eps))
              + x (log(mu + eps) - log(theta + mu + eps)) + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)."""
    if theta.ndimension() == 1:
        theta = theta.view(1, theta.size(0))
    softplus_pi = F.softplus(-pi)
    log_theta_mu_eps = torch.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (torch.log(theta + eps) - log_theta_mu_eps)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    case_non_zero = (-softplus_pi + pi_theta_log + x * (torch.log(mu + eps) - log_theta_mu_eps)
                     + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    return (x < eps).type(torch.float32) * case_zero + (x > eps).type(torch.float32) * case_non_zero


def log_poisson(x, log_mu):
    """The plain torch Poisson log-likelihood per element: x log(mu) - mu - lgamma(x + 1)."""
    return x * log_mu - torch.exp(log_mu) - torch.lgamma(x + 1)


def count_loss(log_mu, x, mu, logvar, log_theta=None, zi_logits=None, likelihood="nb"):
    """A count VAE's negative ELBO as a scVI user writes it (sum reduction, beta = 1): the decoder's
    log mean and the learned log inverse dispersion exponentiated, scvi-tools' log-likelihood summed
    over genes, plus the Gaussian KL. log_mu, x, zi_logits: [B, D]; log_theta: [D] (scVI's
    dispersion="gene") or [B, D]. No data-dependent branches, so torch.compile(fullgraph=True) takes it."""
    if likelihood == "poisson":
        log_p = log_poisson(x, log_mu)
    elif likelihood == "nb":
        log_p = log_nb_positive(x, torch.exp(log_mu), torch.exp(log_theta))
    else:
        log_p = log_zinb_positive(x, torch.exp(log_mu), torch.exp(log_theta), zi_logits)
    return -log_p.sum() + _kl(mu, logvar)
