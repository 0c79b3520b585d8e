"""The count likelihoods' oracle: the per-element log-likelihood of Poisson, NB and ZINB and its
derivatives, written from the definitions (issue 20) in mpmath at 40 significant digits, not from
the kernels' or the reference's algebra. The derivatives are derived by hand from the same
definitions (digamma for the Gamma functions); `numeric_derivatives` differentiates the
log-likelihood numerically (mpmath.diff) so that a test can check the hand-derived ones.

Each quantity comes with its magnitude: the sum of the absolute values of the terms its
definition adds up. Where the terms cancel (d/d log_mu = theta (mu - x) / (theta + mu) at x = mu),
no float32 evaluation of them keeps 1e-5 relative, and the tests allow instead a few float32
roundings of that magnitude (benchmarks/accuracy_table.py's "cancellation" rows, the same bound).
The loss's magnitude is the loss itself: the definition's large terms, lgamma(x + theta) and
lgamma(theta), cancel by design of the formula, and keeping the digits they share is what the
kernels are asked for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mpmath
import torch

_MP = mpmath.mp.clone()
_MP.dps = 40

QUANTITIES = ("loss", "recon", "x", "log_theta", "zi_logits")


@dataclass(frozen=True)
class Element:
    """One element's NLL and its derivatives in the op's argument names (recon = log_mu), each a
    (value, magnitude) pair of floats."""

    loss: tuple[float, float]
    recon: tuple[float, float]
    x: tuple[float, float]
    log_theta: tuple[float, float]
    zi_logits: tuple[float, float]


def _pair(terms) -> tuple[float, float]:
    """(sum, sum of absolute values) of mpf terms, as floats."""
    return float(_MP.fsum(terms)), float(_MP.fsum(abs(t) for t in terms))


def _exact(value: float | None, default: float = 0.0):
    return _MP.mpf(default if value is None else value)


def log_likelihood(likelihood: str, log_mu, x, log_theta=None, zi_logit=None):
    """log p(x) from the definitions, as an mpf (arguments mpf or float)."""
    mu = _MP.exp(log_mu)
    if likelihood == "poisson":
        return x * log_mu - mu - _MP.loggamma(x + 1)
    theta = _MP.exp(log_theta)
    log_nb = (_MP.loggamma(x + theta) - _MP.loggamma(theta) - _MP.loggamma(x + 1)
              + theta * _MP.log(theta / (theta + mu)) + x * _MP.log(mu / (theta + mu)))
    if likelihood == "nb":
        return log_nb
    pi = 1 / (1 + _MP.exp(-zi_logit))
    if x == 0:
        return _MP.log(pi + (1 - pi) * _MP.exp(log_nb))
    return _MP.log(1 - pi) + log_nb


def _poisson(m, x) -> Element:
    mu = _MP.exp(m)
    nll = -log_likelihood("poisson", m, x)
    return Element(loss=(float(nll), abs(float(nll))), recon=_pair([mu, -x]), x=_pair([-m, _MP.digamma(x + 1)]),
                   log_theta=(0.0, 0.0), zi_logits=(0.0, 0.0))


def _nb_derivatives(m, x, t) -> dict[str, tuple[float, float]]:
    """-d log NB / d(log_mu, x, log_theta), each as (value, magnitude):
    d/d log_mu = theta (mu - x) / (theta + mu);
    d/dx = -[psi(x + theta) - psi(x + 1) + log(mu / (theta + mu))];
    d/d log_theta = -theta [psi(x + theta) - psi(theta) - log(1 + mu / theta) + (mu - x) / (theta + mu)]."""
    mu, theta = _MP.exp(m), _MP.exp(t)
    share = theta / (theta + mu)
    gamma_part = _MP.digamma(x + theta) - _MP.digamma(theta)
    return {
        "recon": _pair([share * mu, -share * x]),
        "x": _pair([-_MP.digamma(x + theta), _MP.digamma(x + 1), -_MP.log(mu / (theta + mu))]),
        "log_theta": _pair([-theta * gamma_part, theta * _MP.log1p(mu / theta), -share * mu, share * x]),
    }


def _nb(m, x, t) -> Element:
    nll = -log_likelihood("nb", m, x, t)
    return Element(loss=(float(nll), abs(float(nll))), zi_logits=(0.0, 0.0), **_nb_derivatives(m, x, t))


def _zinb(m, x, t, z) -> Element:
    pi = 1 / (1 + _MP.exp(-z))
    nll = -log_likelihood("zinb", m, x, t, z)
    if x != 0:  # -log(1 - pi) - log NB(x): d/dz = pi, the rest NB's
        return Element(loss=(float(nll), abs(float(nll))), zi_logits=(float(pi), float(pi)), **_nb_derivatives(m, x, t))
    # -log(pi + (1 - pi) NB0), NB0 = (theta / (theta + mu))^theta; w = (1 - pi) NB0 / p(0), the
    # posterior weight of the NB component, scales NB0's own derivatives.
    mu, theta = _MP.exp(m), _MP.exp(t)
    nb0 = _MP.exp(theta * _MP.log(theta / (theta + mu)))
    p0 = pi + (1 - pi) * nb0
    w = (1 - pi) * nb0 / p0
    d_z = -pi * (1 - pi) * (1 - nb0) / p0
    d_m = w * theta * mu / (theta + mu)
    return Element(loss=(float(nll), abs(float(nll))), recon=(float(d_m), abs(float(d_m))), x=(0.0, 0.0),
                   log_theta=_pair([w * theta * _MP.log1p(mu / theta), -w * theta * mu / (theta + mu)]),
                   zi_logits=(float(d_z), abs(float(d_z))))


@functools.lru_cache(maxsize=None)
def element(likelihood: str, log_mu: float, x: float, log_theta: float | None = None, zi_logit: float | None = None) -> Element:
    """The oracle at one element; the arguments are taken as exact binary values (pass the float32
    inputs converted to Python floats). Cached: grids and property tests revisit points."""
    m, xx = _MP.mpf(log_mu), _MP.mpf(x)
    if likelihood == "poisson":
        return _poisson(m, xx)
    if likelihood == "nb":
        return _nb(m, xx, _exact(log_theta))
    return _zinb(m, xx, _exact(log_theta), _exact(zi_logit))


def elements(likelihood: str, log_mu: torch.Tensor, x: torch.Tensor, log_theta: torch.Tensor | None = None,
             zi_logits: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The oracle over same-shaped tensors: {quantity: (values, magnitudes)}, float64 tensors of
    the inputs' shape; log_theta and zi_logits may be None where the likelihood has none."""
    flat = [t.detach().double().flatten().tolist() if t is not None else None for t in (log_mu, x, log_theta, zi_logits)]
    n = len(flat[0])
    points = [element(likelihood, flat[0][i], flat[1][i], *(None if f is None else f[i] for f in flat[2:])) for i in range(n)]
    out = {}
    for name in QUANTITIES:
        pairs = torch.tensor([getattr(p, name) for p in points], dtype=torch.float64).reshape(n, 2)
        out[name] = (pairs[:, 0].reshape(log_mu.shape), pairs[:, 1].reshape(log_mu.shape))
    return out


def numeric_derivatives(likelihood: str, log_mu: float, x: float, log_theta: float | None = None,
                        zi_logit: float | None = None) -> dict[str, float]:
    """-d log p / d(each argument) by mpmath.diff of `log_likelihood`, for checking the hand-derived
    derivatives (x > 0: the x == 0 formula of ZINB is another function)."""
    args = [_MP.mpf(log_mu), _MP.mpf(x), _exact(log_theta, 0.0), _exact(zi_logit, 0.0)]
    names = ("recon", "x", "log_theta", "zi_logits")
    out = {}
    for i, name in enumerate(names):
        def f(v, i=i):
            shifted = list(args)
            shifted[i] = v
            return -log_likelihood(likelihood, *shifted)
        out[name] = float(_MP.diff(f, args[i]))
    return out
