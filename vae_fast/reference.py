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

__all__ = ["reparameterize", "vae_loss", "loss_function", "kl_divergence", "reconstruction_loss", "LIKELIHOODS"]

LIKELIHOODS = ("bernoulli", "gaussian", "laplace", "poisson", "nb", "zinb")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_2 = math.log(2.0)


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


def _bernoulli_nll(r: torch.Tensor, t: torch.Tensor, logits: bool) -> torch.Tensor:
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


def _poison_non_finite(t: torch.Tensor) -> torch.Tensor:
    """t where finite, NaN where t is NaN or +-inf, for the value and for the gradient through it.

    t * (1 + (t - t)) is exactly t (and has derivative exactly 1) when t is finite; otherwise t - t
    is NaN. A NaN/inf input must not yield a finite loss or gradient (|inf| has the finite
    derivative sign(inf), which an optimizer would happily follow), and torch.where would give
    the masked element a zero gradient, not NaN.
    """
    return t * (1 + (t - t))


def _log_scale_rows(log_scale: torch.Tensor | float | None, rows: torch.Tensor) -> torch.Tensor | float:
    """log_scale as a float, or a tensor that broadcasts against [B, D] rows: one value, one per
    feature ([1, D]) or one per element ([B, D])."""
    if log_scale is None:
        return 0.0
    if not isinstance(log_scale, torch.Tensor):
        return float(log_scale)
    s = _poison_non_finite(log_scale.to(rows.dtype))
    if s.numel() == 1:
        return s.reshape(())
    if s.numel() == rows.shape[1]:
        return s.reshape(1, rows.shape[1])
    return s.reshape(rows.shape)


def _location_scale_nll(m: torch.Tensor, t: torch.Tensor, log_scale, likelihood: str) -> torch.Tensor:
    s = _log_scale_rows(log_scale, m)
    diff = _poison_non_finite(t - m)
    inv_scale = torch.exp(-s) if isinstance(s, torch.Tensor) else math.exp(-s)
    if likelihood == "gaussian":
        nll = 0.5 * (diff * inv_scale).pow(2) + s + _HALF_LOG_2PI
    else:
        # d|u|/du at u = 0 is torch's sign(0) = 0: the Laplace term's gradient is 0 where x == recon.
        nll = diff.abs() * inv_scale + s + _LOG_2
    return nll.expand_as(m).sum(1)


def reconstruction_loss(
    recon: torch.Tensor,
    x: torch.Tensor,
    *,
    likelihood: str = "bernoulli",
    logits: bool = False,
    log_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Per-sample negative log-likelihood -log p(x | recon), shape [B], in nats.

    bernoulli: recon holds probabilities (or logits with `logits=True`); gaussian: recon is the
    mean and exp(log_scale) the standard deviation; laplace: recon is the location and
    exp(log_scale) the scale b. log_scale: None (0), a float, or a tensor with 1, D (per feature)
    or B * D elements.
    """
    dtype = _compute_dtype(recon)
    r, t = _rows(recon, dtype), _rows(x, dtype)
    if likelihood == "bernoulli":
        return _bernoulli_nll(r, t, logits)
    with torch.autocast(r.device.type, enabled=False):
        return _location_scale_nll(r, t, log_scale, likelihood)


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
    likelihood: str = "bernoulli",
    logits: bool = False,
    log_scale: torch.Tensor | float | None = None,
    beta: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Reconstruction negative log-likelihood + beta * KL, reduced over the batch as `reduction` says."""
    nll = reconstruction_loss(recon, x, likelihood=likelihood, logits=logits, log_scale=log_scale)
    if beta == 0:
        # 0 * (the +inf KL of a finite logvar whose exp overflows) would be NaN; with no weight the
        # KL may be taken at logvar 0 there instead (vae_math.h's logvar_for_zero_weight).
        logvar = torch.where(torch.isfinite(logvar) & (logvar > 0), torch.zeros_like(logvar), logvar)
    per_sample = nll + beta * kl_divergence(mu, logvar)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    return per_sample.sum()


def loss_function(recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The PyTorch examples' VAE loss: summed BCE + KL."""
    return vae_loss(recon_x, x, mu, logvar)
