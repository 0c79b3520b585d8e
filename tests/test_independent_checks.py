"""Checks that do not share the code's assumptions (issue 13).

KL: the loss's KL term against `torch.distributions.kl_divergence` of two Normals in float64 (a
formula written by other people: variance ratio and log, not the kernel's expm1 form), values and
gradients (autograd through torch.distributions), element by element. Where that reference is itself
inexact (logvar near 0 with mu near 0: its `var_ratio - 1 - log(var_ratio)` cancels), the oracle is
the Taylor series of expm1(lv) - lv, summed in float64 with no cancellation. There the kernels
missed the bounds (1e-5 float32, 1e-10 float64) until they took that series for |lv| < 0.1 too.

Random numbers (CPU): with mu = 0 and logvar = 0 the output is eps itself. Millions of draws per
dtype are tested against N(0, 1) with bounds from their sampling distributions: moments within 5
standard errors, a Kolmogorov-Smirnov test at p = 1e-6 (against the CDF of N(0, 1) rounded to the
dtype for bfloat16/float16), autocorrelations of eps, eps^2 and |eps|, and the cross-correlation of
independent draws (successive calls, neighbouring seeds) at every shift. Then Box-Muller is inverted
on float64 draws and the Philox uniforms themselves are tested.
test_the_checks_catch_a_biased_generator runs every check on deliberately biased copies of a real
draw and asserts that each fails: the bounds are tight enough to matter at the chosen n (e.g. a 1%
scale error on eps changes the variance by 0.0201, 29 standard errors at n = 2^22).

Runtime: ~20 s on 2 busy cores (n = 2^22 draws per dtype, three draws each).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import vae_fast
from vae_fast import _extension

# ---------------------------------------------------------------------------------------------
# KL term of vae_loss
# ---------------------------------------------------------------------------------------------

KL_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
FLT_MIN = torch.finfo(torch.float32).tiny


def _kl_grid(generator_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) float64 pairs: the product of fixed values (logvar -20..20, mu up to +-50, the
    special points around 0) and random ones."""
    g = torch.Generator().manual_seed(generator_seed)
    specials = torch.tensor([0.0, 1e-6, 1e-3, 0.01, 0.1, 0.5, 1.0, 2.0])
    mus = torch.cat([specials, -specials[1:], torch.tensor([3.0, -3.0, 10.0, -10.0, 49.9, 50.0, -50.0]),
                     torch.rand(24, generator=g, dtype=torch.float64) * 100 - 50]).double()
    lvs = torch.cat([torch.linspace(-20, 20, 401, dtype=torch.float64), specials.double(), -specials[1:].double(),
                     torch.rand(120, generator=g, dtype=torch.float64) * 40 - 20])
    mu, lv = torch.cartesian_prod(mus, lvs).unbind(1)
    return mu.contiguous(), lv.contiguous()


def _in_cancellation_zone(mu: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    """Where KL = 0.5 (mu^2 + e^lv - 1 - lv) is far smaller than its terms: |lv| < 0.1 and |mu| < 0.1.
    torch.distributions' float64 formula is not accurate to 1e-10 there: tested apart, against a
    series (test_kl_near_zero_*)."""
    return (lv.abs() < 0.1) & (mu.abs() < 0.1)


def _kl_torch_distributions(mu: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(N(mu, e^lv) || N(0, 1)) by torch.distributions, float64 (inputs rounded to the
    dtype under test are converted exactly)."""
    mu, lv = mu.double(), lv.double()
    return kl_divergence(Normal(mu, torch.exp(lv / 2)), Normal(torch.zeros_like(mu), torch.ones_like(mu)))


def _expm1_minus_x_series(lv: torch.Tensor, terms: int = 25) -> torch.Tensor:
    """e^lv - 1 - lv = sum_{k>=2} lv^k / k!, float64, for |lv| <= 0.1 (error below 1e-40 relative
    after 25 terms): no subtraction of nearly equal numbers."""
    lv = lv.double()
    total = torch.zeros_like(lv)
    term = lv.clone()  # lv^1 / 1!
    for k in range(2, terms + 2):
        term = term * lv / k
        total = total + term
    return total


def _fused_kl_per_element(mu: torch.Tensor, lv: torch.Tensor, layout: str) -> torch.Tensor:
    """vae_loss's KL of each (mu, lv) element, read from the per-sample loss with a reconstruction
    term of exactly 0 (recon = x = 0: -(0 log 0 + 1 log 1) with the log clamp, 0 by definition).

    layout "scalar": one latent per sample (the kernels' scalar tail). "vector": 16 copies of the
    element per sample (whole SIMD vectors of float and double), loss / 16: every term of the sum is
    the same non-negative number, so the sum's rounding adds at most a few ulp.
    """
    copies = 1 if layout == "scalar" else 16
    m = mu[:, None].expand(-1, copies).contiguous()
    l = lv[:, None].expand(-1, copies).contiguous()
    zeros = torch.zeros(len(mu), 1, dtype=mu.dtype)
    assert torch.equal(vae_fast.vae_loss(zeros, zeros, m, l, beta=0.0, reduction="none"),
                       torch.zeros(len(mu), dtype=vae_fast.vae_loss(zeros, zeros, m, l, reduction="none").dtype))
    return vae_fast.vae_loss(zeros, zeros, m, l, reduction="none").double() / copies


def _relative_errors(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    actual, expected = actual.double(), expected.double()
    exact_zero = expected == 0
    rel = (actual - expected).abs() / expected.abs().where(~exact_zero, torch.ones_like(expected))
    # where the reference is 0, the result must be exactly 0
    return torch.where(exact_zero, torch.where(actual == 0, 0.0, math.inf), rel)


def _assert_elementwise(actual, expected, rtol, mu, lv, what):
    rel = _relative_errors(actual, expected)
    worst = int(rel.argmax())
    assert rel.max().item() <= rtol, (
        f"{what}: relative error {rel[worst].item():.3g} > {rtol:g} at mu={mu[worst].item()!r}, "
        f"logvar={lv[worst].item()!r}: got {actual[worst].item()!r}, reference {expected[worst].item()!r} "
        f"({int((rel > rtol).sum())} of {rel.numel()} elements over)")


@pytest.mark.parametrize("layout", ["scalar", "vector"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kl_matches_torch_distributions(dtype, layout):
    mu64, lv64 = _kl_grid()
    keep = ~_in_cancellation_zone(mu64, lv64)
    mu, lv = mu64[keep].to(dtype), lv64[keep].to(dtype)
    reference = _kl_torch_distributions(mu, lv)  # of the values actually passed (rounded to dtype)
    assert (reference > FLT_MIN).all()
    _assert_elementwise(_fused_kl_per_element(mu, lv, layout), reference, KL_RTOL[dtype], mu, lv,
                        f"KL {dtype} {layout}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kl_gradients_match_autograd_through_torch_distributions(dtype):
    mu64, lv64 = _kl_grid(1)
    # torch.distributions' d/dlogvar is 0.5 (var_ratio - 1) by autograd, which cancels for |lv| << 1
    # (1e-16 / |lv| relative); the kernel's side is checked there against the series below.
    near = lv64.abs() < 1e-3
    width = 19  # 16 lanes' worth in SIMD vectors and 3 in the scalar tail, per sample
    n = (int((~near).sum()) // width) * width
    mu = mu64[~near][:n].to(dtype).reshape(-1, width).requires_grad_()
    lv = lv64[~near][:n].to(dtype).reshape(-1, width).requires_grad_()
    zeros = torch.zeros(mu.shape[0], 3, dtype=dtype)
    grad_mu, grad_lv = torch.autograd.grad(vae_fast.vae_loss(zeros, zeros, mu, lv), (mu, lv))

    mu_ref = mu.detach().double().requires_grad_()
    lv_ref = lv.detach().double().requires_grad_()
    ref_mu, ref_lv = torch.autograd.grad(_kl_torch_distributions(mu_ref, lv_ref).sum(), (mu_ref, lv_ref))
    flat_mu, flat_lv = mu.detach().flatten(), lv.detach().flatten()
    _assert_elementwise(grad_mu.flatten(), ref_mu.flatten(), KL_RTOL[dtype], flat_mu, flat_lv, f"d KL / d mu {dtype}")
    _assert_elementwise(grad_lv.flatten(), ref_lv.flatten(), KL_RTOL[dtype], flat_mu, flat_lv,
                        f"d KL / d logvar {dtype}")


def _near_zero_grid() -> tuple[torch.Tensor, torch.Tensor]:
    mags = torch.logspace(-12, -1.05, 24, dtype=torch.float64)
    lvs = torch.cat([mags, -mags, torch.zeros(1, dtype=torch.float64)])
    mus = torch.tensor([0.0, 1e-8, -1e-8, 1e-4, -1e-4, 1e-3, -1e-3, 0.01, -0.01, 0.05, -0.05, 0.099],
                       dtype=torch.float64)
    mu, lv = torch.cartesian_prod(mus, lvs).unbind(1)
    return mu.contiguous(), lv.contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kl_gradient_near_zero_matches_series(dtype):
    mu64, lv64 = _near_zero_grid()
    mu, lv = mu64.to(dtype).requires_grad_(), lv64.to(dtype).requires_grad_()
    zeros = torch.zeros(len(mu), 1, dtype=dtype)
    grad_mu, grad_lv = torch.autograd.grad(vae_fast.vae_loss(zeros, zeros, mu[:, None], lv[:, None]), (mu, lv))
    lv_exact = lv.detach().double()
    expm1 = _expm1_minus_x_series(lv_exact) + lv_exact  # d KL / d lv = 0.5 (e^lv - 1)
    _assert_elementwise(grad_mu, mu.detach().double(), KL_RTOL[dtype], mu, lv, f"d KL / d mu {dtype}")
    _assert_elementwise(grad_lv, 0.5 * expm1, KL_RTOL[dtype], mu, lv, f"d KL / d logvar {dtype}")


@pytest.mark.parametrize("layout", ["scalar", "vector"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kl_near_zero_matches_series(dtype, layout):
    """Found by this file: expm1(lv) - lv cancelled for |lv| << 1 (float32 relative error 1e-4 at
    lv = 1e-3, total at 1e-12); the kernels now use its series below |lv| = 0.1."""
    mu64, lv64 = _near_zero_grid()
    mu, lv = mu64.to(dtype), lv64.to(dtype)
    exact = 0.5 * (mu.double() ** 2 + _expm1_minus_x_series(lv.double()))  # two non-negative terms
    keep = exact > FLT_MIN
    _assert_elementwise(_fused_kl_per_element(mu, lv, layout)[keep], exact[keep], KL_RTOL[dtype], mu[keep],
                        lv[keep], f"KL near 0, {dtype} {layout}")


def test_kl_series_oracle_agrees_with_torch_distributions_where_both_are_exact():
    # The series oracle is checked against the first reference where that one is well-conditioned.
    mu, lv = _near_zero_grid()
    keep = (lv.abs() > 1e-2) & (mu.abs() >= 0.01)
    exact = 0.5 * (mu**2 + _expm1_minus_x_series(lv))
    rel = _relative_errors(exact[keep], _kl_torch_distributions(mu[keep], lv[keep]))
    assert rel.max().item() < 1e-12


# ---------------------------------------------------------------------------------------------
# Random numbers of reparameterize (CPU)
# ---------------------------------------------------------------------------------------------

N_DRAWS = 1 << 22
RNG_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SEED = 20261126
P_VALUE = 1e-6  # per check: all ~200 checks of this file together fail by chance with p < 2e-4


def _draw(dtype: torch.dtype, generator: torch.Generator, n: int = N_DRAWS) -> torch.Tensor:
    zeros = torch.zeros(n, dtype=dtype)
    z = vae_fast.reparameterize(zeros, zeros, generator=generator)
    assert z.dtype == dtype
    return z.double()


_DRAWS: dict[torch.dtype, dict[str, torch.Tensor]] = {}


def draws(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """eps of two successive calls on one generator and of one call on the next seed (cached)."""
    if dtype not in _DRAWS:
        # a seed per dtype: one seed would give every dtype the same uniforms (the same sample, rounded)
        seed = SEED + 1000 * RNG_DTYPES.index(dtype)
        g = torch.Generator().manual_seed(seed)
        first = _draw(dtype, g)
        second = _draw(dtype, g)
        next_seed = _draw(dtype, torch.Generator().manual_seed(seed + 1))
        _DRAWS[dtype] = {"first": first, "second": second, "next_seed": next_seed}
    return _DRAWS[dtype]


def _normal_quantile(p: float) -> float:
    return torch.special.ndtri(torch.tensor(p, dtype=torch.float64)).item()


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2))


# Each check returns (statistic, bound); it passes when statistic < bound.

def moment_checks(eps: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Sample moments of N(0, 1) draws within 5 standard errors: mean (SE 1/sqrt n), variance
    (sqrt(2/n)), third moment (sqrt(15/n)), fourth moment about 3 (sqrt(96/n))."""
    n = eps.numel()
    return {
        "mean": (abs(eps.mean().item()), 5 / math.sqrt(n)),
        "variance": (abs(eps.var().item() - 1), 5 * math.sqrt(2 / n)),
        "third moment": (abs(eps.pow(3).mean().item()), 5 * math.sqrt(15 / n)),
        "fourth moment": (abs(eps.pow(4).mean().item() - 3), 5 * math.sqrt(96 / n)),
    }


def _representable_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype, as sorted unique float64."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).double()
    return values[torch.isfinite(values)].unique()


def ks_check(eps: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """Kolmogorov-Smirnov distance to N(0, 1) (to N(0, 1) rounded to nearest for 16-bit floats, whose
    CDF is a staircase on the representable values), against the asymptotic critical value at
    P_VALUE: P(sqrt(n) D > t) ~ 2 exp(-2 t^2). For a discrete distribution that bound is conservative."""
    n = eps.numel()
    x = eps.sort().values
    if dtype in (torch.float16, torch.bfloat16):
        grid = _representable_values(dtype)
        upper_midpoint = torch.cat([(grid[:-1] + grid[1:]) / 2, torch.tensor([math.inf], dtype=torch.float64)])
        expected = _normal_cdf(upper_midpoint)  # P(round(X) <= v) at every representable v
        empirical = torch.searchsorted(x, grid, right=True).double() / n
        distance = (empirical - expected).abs().max().item()
    else:
        cdf = _normal_cdf(x)
        i = torch.arange(1, n + 1, dtype=torch.float64)
        distance = max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())
    return distance, math.sqrt(math.log(2 / P_VALUE) / 2) / math.sqrt(n)


AUTOCORRELATION_LAGS = [1, 2, 3, 4, 5, 6, 7, 8, 1024, 4096]


def autocorrelation_checks(eps: torch.Tensor, lags=AUTOCORRELATION_LAGS,
                           transforms=("eps", "eps^2", "|eps|")) -> dict[str, tuple[float, float]]:
    """Lag-k autocorrelation of eps, eps^2 and |eps| (each standardized): N(0, 1/n) for independent
    draws, bound 5/sqrt(n). Lags 1-8 cross the 4-element Philox blocks and their Box-Muller pairs
    (elements 4k, 4k+1 share a radius: eps^2 and |eps| would see it), 1024 and 4096 the kernel's
    1024-element chunks."""
    n = eps.numel()
    checks = {}
    for name in transforms:
        series = eps if name == "eps" else eps.square() if name == "eps^2" else eps.abs()
        y = (series - series.mean()) / series.std()
        for lag in lags:
            r = torch.dot(y[:-lag], y[lag:]).item() / n
            checks[f"{name} lag {lag}"] = (abs(r), 5 / math.sqrt(n))
    return checks


def cross_correlation_check(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, int]:
    """Largest |circular cross-correlation| of two standardized draws over all n shifts, by FFT,
    against a Bonferroni bound: each shift's correlation is ~N(0, 1/n) for independent draws, so
    P(max > t / sqrt n) <= n P(|Z| > t) = P_VALUE for t = Phi^-1(1 - P_VALUE / (2 n)) (7.3 at n = 2^22).
    Catches one draw repeating the other at any offset. Returns (max, bound, shift of the max)."""
    n = a.numel()
    x = (a - a.mean()) / a.std()
    y = (b - b.mean()) / b.std()
    corr = torch.fft.irfft(torch.fft.rfft(x).conj() * torch.fft.rfft(y), n=n) / n
    shift = int(corr.abs().argmax())
    t = -_normal_quantile(P_VALUE / (2 * n))
    return corr[shift].abs().item(), t / math.sqrt(n), shift


def _chi_square_critical(df: int, p: float = P_VALUE) -> float:
    """Upper p quantile of chi-square(df), Wilson-Hilferty (within 0.5% at df ~ 100, p = 1e-6)."""
    z = -_normal_quantile(p)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def uniform_chi_square(u: torch.Tensor, bins: int = 100) -> tuple[float, float]:
    counts = torch.histc(u, bins=bins, min=0.0, max=1.0)
    assert counts.sum().item() == u.numel()  # every value in [0, 1]
    expected = u.numel() / bins
    return ((counts - expected) ** 2 / expected).sum().item(), _chi_square_critical(bins - 1)


def joint_uniform_chi_square(u: torch.Tensor, v: torch.Tensor, bins: int = 10) -> tuple[float, float]:
    """(u, v) uniform on the unit square, i.e. independent uniforms: chi-square on a bins x bins grid."""
    iu = (u * bins).long().clamp_(0, bins - 1)
    iv = (v * bins).long().clamp_(0, bins - 1)
    counts = torch.bincount(iu * bins + iv, minlength=bins * bins).double()
    expected = u.numel() / bins**2
    return ((counts - expected) ** 2 / expected).sum().item(), _chi_square_critical(bins**2 - 1)


def invert_box_muller(eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Philox uniforms from float64 eps: elements (4k, 4k+1) are (r cos 2 pi u2, r sin 2 pi u2) with
    r = sqrt(-2 log u1) from words 0, 1 of block k; (4k+2, 4k+3) likewise from words 2, 3. So
    u1 = exp(-(a^2 + b^2) / 2) and u2 = atan2(b, a) / (2 pi) mod 1."""
    blocks = eps.reshape(-1, 4)
    out = {}
    for pair, (i, j) in (("a", (0, 1)), ("b", (2, 3))):
        a, b = blocks[:, i], blocks[:, j]
        out[f"u1_{pair}"] = torch.exp(-(a * a + b * b) / 2)
        out[f"u2_{pair}"] = torch.remainder(torch.atan2(b, a) / (2 * math.pi), 1.0)
    return out


def uniform_checks(eps: torch.Tensor) -> dict[str, tuple[float, float]]:
    u = invert_box_muller(eps)
    checks = {f"{name} 100 bins": uniform_chi_square(values) for name, values in u.items()}
    for first, second in (("u1_a", "u2_a"), ("u1_b", "u2_b"), ("u1_a", "u1_b"), ("u2_a", "u2_b")):
        checks[f"({first}, {second}) 10x10"] = joint_uniform_chi_square(u[first], u[second])
    return checks


def _failures(checks: dict) -> dict:
    return {name: value for name, value in checks.items() if not value[0] < value[1]}


@pytest.mark.parametrize("dtype", RNG_DTYPES, ids=str)
def test_noise_moments(dtype):
    assert not _failures(moment_checks(draws(dtype)["first"]))


@pytest.mark.parametrize("dtype", RNG_DTYPES, ids=str)
def test_noise_kolmogorov_smirnov(dtype):
    distance, bound = ks_check(draws(dtype)["first"], dtype)
    assert distance < bound, f"KS distance {distance:.3g} >= {bound:.3g} (p = {P_VALUE:g})"


@pytest.mark.parametrize("dtype", RNG_DTYPES, ids=str)
def test_noise_autocorrelation(dtype):
    assert not _failures(autocorrelation_checks(draws(dtype)["first"]))


@pytest.mark.parametrize("other", ["second", "next_seed"])
@pytest.mark.parametrize("dtype", RNG_DTYPES, ids=str)
def test_noise_cross_correlation(dtype, other):
    d = draws(dtype)
    peak, bound, shift = cross_correlation_check(d["first"], d[other])
    assert peak < bound, f"|cross-correlation| {peak:.3g} >= {bound:.3g} at shift {shift}"


@pytest.mark.skipif(not _extension.serves(torch.device("cpu")), reason="the Box-Muller layout is the kernels'")
def test_box_muller_uniforms():
    eps = draws(torch.float64)["first"]
    u = invert_box_muller(eps)
    # the inversion is right: the float64 uniforms are k * 2^-32 (u2) and (k + 1) * 2^-32 (u1)
    for name, values in u.items():
        scaled = values * 2.0**32
        assert (scaled - scaled.round()).abs().max().item() < 1e-2, name
    assert not _failures(uniform_checks(eps))


def test_the_checks_catch_a_biased_generator():
    """Each check above fails on a deliberately biased copy of a real draw (n = 2^22)."""
    eps = draws(torch.float64)["first"]
    n = eps.numel()
    # 1% scale error: variance off by 0.0201 = 29 standard errors (sqrt(2/n) = 6.9e-4); KS distance
    # ~0.01 * phi(1) = 2.4e-3 against the 1.3e-3 bound.
    assert "variance" in _failures(moment_checks(eps * 1.01))
    distance, bound = ks_check(eps * 1.01, torch.float64)
    assert distance > bound
    # a 0.3% sigma shift of the mean: 6 standard errors
    assert "mean" in _failures(moment_checks(eps + 0.003))
    # every 50th value 1.5x wider, rescaled to variance 1: fourth moment 3.24 (10 standard errors)
    mix = torch.where(torch.arange(n) % 50 == 0, eps * 1.5, eps)
    assert "fourth moment" in _failures(moment_checks(mix / mix.std()))
    # the same through the staircase CDF of the 16-bit dtypes (a 1% scale error, then rounding)
    for half in (torch.bfloat16, torch.float16):
        distance, bound = ks_check((eps * 1.01).to(half).double(), half)
        assert distance > bound, half
    # a 1% admixture of the previous element: lag-1 autocorrelation 0.01 = 20 standard errors
    assert "eps lag 1" in _failures(autocorrelation_checks(eps + 0.01 * torch.roll(eps, 1), [1], ["eps"]))
    # the second normal of a pair from another angle than the first (a wrong Philox word): a and b
    # then share the radius without being its cos/sin, so |a| and |b| correlate (|eps| lag-1
    # autocorrelation 0.026, 10 standard errors)
    blocks = eps.clone().reshape(-1, 4)
    radius = torch.hypot(blocks[:, 0], blocks[:, 1])
    blocks[:, 1] = radius * torch.sin(torch.atan2(blocks[:, 3], blocks[:, 2]))
    assert "|eps| lag 1" in _failures(autocorrelation_checks(blocks.flatten(), [1], ["|eps|"]))
    # a second call that repeats 1% of the first, 12,345 elements later
    repeat = draws(torch.float64)["second"].clone()
    repeat[12_345:12_345 + n // 100] = eps[: n // 100]
    peak, bound, shift = cross_correlation_check(eps, repeat)
    assert peak > bound and shift == 12_345
    # uniforms: u^1.05 instead of u, CDF off by at most 1.8% (chi-square ~2,700 against a bound of 181;
    # u^1.01 would give ~200, the bound's order: 2^20 uniforms in 100 bins resolve ~1% distortions)
    u = invert_box_muller(eps)
    statistic, bound = uniform_chi_square(u["u2_a"] ** 1.05)
    assert statistic > bound
    # radius and angle not independent: 1% of the pairs take the angle's uniform from the radius's
    # word (chi-square ~1,000 against 181)
    coupled = torch.where(torch.arange(len(u["u1_a"])) % 100 == 0, u["u1_a"], u["u2_a"])
    statistic, bound = joint_uniform_chi_square(u["u1_a"], coupled)
    assert statistic > bound
