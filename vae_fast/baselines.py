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
