"""Pure-torch implementations of vae_fast's ops: the parity oracle of the tests and the fallback
wherever the compiled extension does not serve a device. Same signatures and semantics as the
public functions in `vae_fast` (validation is done by the caller, `vae_fast.functional`).

Half-precision inputs are computed in float32 and the loss is returned in float32 (float64 stays
float64), as the compiled kernels do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["reparameterize", "vae_loss", "loss_function", "kl_divergence", "reconstruction_loss"]


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I) from torch.randn."""
    eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
    return mu + torch.exp(0.5 * logvar) * eps


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, ...] -> [B, prod(...)], also for an empty batch (where reshape(B, -1) is ambiguous)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).to(dtype)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_unit_interval(t: torch.Tensor, message: str) -> None:
    # Only on CPU: on CUDA the check would stall the stream (see README, "Input checks").
    if t.device.type == "cpu" and t.numel() and bool(((t < 0) | (t > 1)).any()):
        raise ValueError(message)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, *, logits: bool = False) -> torch.Tensor:
    """Per-sample Bernoulli negative log-likelihood, shape [B]."""
    dtype = _compute_dtype(recon)
    r, t = _rows(recon, dtype), _rows(x, dtype)
    _check_unit_interval(t, "vae_loss: x (the target) must lie in [0, 1] for a Bernoulli likelihood, but some value is outside")
    # F.binary_cross_entropy refuses to run under autocast; the loss is float32 math by design.
    with torch.autocast(r.device.type, enabled=False):
        if logits:
            return F.binary_cross_entropy_with_logits(r, t, reduction="none").sum(1)
        _check_unit_interval(
            r,
            "vae_loss: recon must hold probabilities in [0, 1] when logits=False, but some value is outside; "
            "pass logits=True if recon holds logits",
        )
        return F.binary_cross_entropy(r, t, reduction="none").sum(1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(N(mu, exp(logvar)) || N(0, I)), shape [B]."""
    dtype = _compute_dtype(mu)
    mu, logvar = _rows(mu, dtype), _rows(logvar, dtype)
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1)


def vae_loss(
    recon: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    logits: bool = False,
    beta: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Bernoulli reconstruction + beta * KL, reduced over the batch as `reduction` says."""
    per_sample = reconstruction_loss(recon, x, logits=logits) + beta * kl_divergence(mu, logvar)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    return per_sample.sum()


def loss_function(recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The PyTorch examples' VAE loss: summed BCE + KL."""
    return vae_loss(recon_x, x, mu, logvar)
