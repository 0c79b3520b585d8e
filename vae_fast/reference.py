"""Pure-torch implementations of vae_fast's ops: the parity oracle of the tests and the fallback
wherever the compiled extension does not serve a device. Same signatures and semantics as the
public functions in `vae_fast` (validation is done by the caller, `vae_fast.functional`).

Half-precision inputs are computed in float32 and the loss is returned in float32 (float64 stays
float64), as the compiled kernels do. The count likelihoods (poisson, nb, zinb) are the exception:
they are computed in float64 for every input dtype (on devices that have it), because float32
cannot hold the digits of a count's log-likelihood (at x = mu = 1e6 it is about -8, made of terms
of about 1e7); their loss is returned in the same dtype as the others'.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["reparameterize", "vae_loss", "loss_function", "kl_divergence", "reconstruction_loss", "LIKELIHOODS"]

LIKELIHOODS = ("bernoulli", "gaussian", "laplace", "poisson", "nb", "zinb")
COUNT_LIKELIHOODS = ("poisson", "nb", "zinb")
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


# Where NB's Gamma-function ratio switches from lgamma to Stirling's form (see _log_gamma_ratio).
_STIRLING_FROM = 10.0


def _softplus(t: torch.Tensor) -> torch.Tensor:
    """log(1 + e^t), exact for every t (F.softplus returns t itself above t = 20, off by e^-t, which
    (x + theta) multiplies: 1e-10 relative at theta = 1e-4, mu = 1e6)."""
    return torch.logaddexp(t, torch.zeros_like(t))


def _stirling_correction(z: torch.Tensor) -> torch.Tensor:
    """lgamma(z) - [(z - 1/2) log z - z + log(2 pi) / 2] for z >= 10, by its asymptotic series
    (truncation error below 1e-15 there)."""
    r = 1 / z
    r2 = r * r
    return r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 * (1 / 1680 - r2 * (1 / 1188 - r2 * (691 / 360360))))))


def _log_gamma_ratio(x: torch.Tensor, theta: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """log[Gamma(x + theta) / (Gamma(theta) theta^x)]: NB's lgamma(x + theta) - lgamma(theta) less the
    x log(theta) that NB's last term gives back. For large theta the lgamma difference cancels (at
    theta = 1e8 both are 1.7e9, the ratio x log(theta) + O(x^2 / theta)), and its derivative in theta
    is a difference of digammas that cancels too; Stirling's form keeps only the small parts:
    (x + theta - 1/2) log1p(x / theta) - x + correction(x + theta) - correction(theta).
    Each torch.where branch sees only arguments inside its range, so that the other branch's
    gradient (0 times an infinite derivative) cannot turn into NaN.
    """
    large = theta >= _STIRLING_FROM
    theta_large = torch.where(large, theta, _STIRLING_FROM)
    theta_small = torch.where(large, 1.0, theta)
    log_theta_small = torch.where(large, 0.0, log_theta)
    stirling = ((x + theta_large - 0.5) * torch.log1p(x / theta_large) - x
                + _stirling_correction(x + theta_large) - _stirling_correction(theta_large))
    direct = torch.lgamma(x + theta_small) - torch.lgamma(theta_small) - x * log_theta_small
    return torch.where(large, stirling, direct)


def _poisson_nll(log_mu: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log Poisson(x; mu) = mu - x log(mu) + lgamma(x + 1)."""
    return torch.exp(log_mu) - x * log_mu + torch.lgamma(x + 1)


def _nb_nll(log_mu: torch.Tensor, x: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """-log NB(x; mu, theta): the definition, -[lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    + theta log(theta / (theta + mu)) + x log(mu / (theta + mu))], with its logs as softplus of
    log_mu - log_theta and the x log(theta) inside lgamma(x + theta) - lgamma(theta) moved to the
    x log(mu / (theta + mu)) term, so that nothing large cancels: as theta -> infinity each part
    tends to its Poisson counterpart. (Its derivative in log_mu, theta (mu - x) / (theta + mu), comes
    out as theta sigmoid(d) - x sigmoid(-d), with no -x + x sigmoid(d) in it.)"""
    theta = torch.exp(log_theta)
    d = log_mu - log_theta
    return (torch.lgamma(x + 1) + x * (_softplus(-d) - log_theta) + theta * _softplus(d)
            - _log_gamma_ratio(x, theta, log_theta))


def _zinb_zero_nll(log_mu: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """-log(pi + (1 - pi) NB(0)), NB(0) = (theta / (theta + mu))^theta. Where NB(0) is near 1 the
    probability of a zero can be near 1 and the loss near 0; there it is -log1p(-(1 - pi)(1 - NB(0))),
    which keeps its digits. Elsewhere (NB(0) < 1/e, where expm1's gradient, exp computed as
    expm1 + 1, would lose NB(0)) it is the log-sum of log pi = -softplus(-z) and log(1 - pi) + log NB(0)."""
    log_nb_zero = -torch.exp(log_theta) * _softplus(log_mu - log_theta)
    near_one = log_nb_zero > -1
    # 1 - p(0). 1 - pi as exp(-softplus(z)): sigmoid's gradient, s (1 - s), would lose 1 - s near s = 1.
    missing = torch.exp(-_softplus(zi_logits)) * -torch.expm1(torch.where(near_one, log_nb_zero, 0.0))
    complement = -torch.log1p(-missing)
    log_sum = -torch.logaddexp(-_softplus(-zi_logits), -_softplus(zi_logits) + log_nb_zero)
    return torch.where(near_one, complement, log_sum)


def _zinb_nll(log_mu: torch.Tensor, x: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """-log ZINB(x; mu, theta, pi), pi = sigmoid(zi_logits): -log(pi + (1 - pi) NB(0)) at x == 0,
    -log(1 - pi) - log NB(x) = softplus(z) - log NB(x) at x > 0; exact from certain zero inflation
    to none. The x == 0 formula holds no x, so its derivative in x is 0."""
    positive = _softplus(zi_logits) + _nb_nll(log_mu, x, log_theta)
    return torch.where(x == 0, _zinb_zero_nll(log_mu, log_theta, zi_logits), positive)


def _count_nll(log_mu: torch.Tensor, x: torch.Tensor, likelihood: str, log_theta, zi_logits) -> torch.Tensor:
    """Per-sample count NLL of [B, D] float64 rows; log_theta as `_log_scale_rows` gives it."""
    log_mu, x = _poison_non_finite(log_mu), _poison_non_finite(x)
    if likelihood == "poisson":
        nll = _poisson_nll(log_mu, x)
    else:
        log_theta = torch.as_tensor(_log_scale_rows(log_theta, log_mu), dtype=log_mu.dtype, device=log_mu.device)
        log_theta = log_theta.expand_as(log_mu)
        if likelihood == "nb":
            nll = _nb_nll(log_mu, x, log_theta)
        else:
            nll = _zinb_nll(log_mu, x, log_theta, _poison_non_finite(_rows(zi_logits, log_mu.dtype)))
    return nll.sum(1)


def reconstruction_loss(
    recon: torch.Tensor,
    x: torch.Tensor,
    *,
    likelihood: str = "bernoulli",
    logits: bool = False,
    log_scale: torch.Tensor | float | None = None,
    log_theta: torch.Tensor | float | None = None,
    zi_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample negative log-likelihood -log p(x | recon), shape [B], in nats.

    bernoulli: recon holds probabilities (or logits with `logits=True`); gaussian: recon is the
    mean and exp(log_scale) the standard deviation; laplace: recon is the location and
    exp(log_scale) the scale b. log_scale: None (0), a float, or a tensor with 1, D (per feature)
    or B * D elements. poisson, nb, zinb: recon is log(mu), x the counts, log_theta the log inverse
    dispersion (nb, zinb; laid out as log_scale) and zi_logits [B, ...] the logits of the
    zero-inflation probability (zinb); see `vae_fast.vae_loss` for the formulas.
    """
    if likelihood in COUNT_LIKELIHOODS:
        # float64 where the device has it (Apple's MPS has not: float32 there, which loses digits of
        # the loss at large counts; see the module docstring)
        count_dtype = torch.float32 if recon.device.type == "mps" else torch.float64
        r, t = _rows(recon, count_dtype), _rows(x, count_dtype)
        with torch.autocast(r.device.type, enabled=False):
            return _count_nll(r, t, likelihood, log_theta, zi_logits).to(_compute_dtype(recon))
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
    log_theta: torch.Tensor | float | None = None,
    zi_logits: torch.Tensor | None = None,
    beta: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Reconstruction negative log-likelihood + beta * KL, reduced over the batch as `reduction` says."""
    nll = reconstruction_loss(recon, x, likelihood=likelihood, logits=logits, log_scale=log_scale,
                              log_theta=log_theta, zi_logits=zi_logits)
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
