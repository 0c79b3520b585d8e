"""vae_fast.reparameterize: distribution of the in-kernel noise, reproducibility, gradients,
opcheck, torch.compile, edge cases and bad input (CPU; CUDA variants in test_cuda.py)."""

import math

import pytest
import torch

import vae_fast
from conftest import DEVICES, relative_error

SIZES = [1, 7, 33, 257, 1000, 100_003]


def standardized(mu, logvar, z):
    return ((z.double() - mu.double()) / torch.exp(0.5 * logvar.double())).flatten()


@pytest.mark.parametrize("numel", SIZES)
def test_noise_is_standard_normal(numel):
    mu = torch.randn(numel)
    logvar = torch.randn(numel)
    eps = standardized(mu, logvar, vae_fast.reparameterize(mu, logvar))
    assert torch.isfinite(eps).all()
    if numel >= 1000:
        n = eps.numel()
        # mean, variance, and the fraction beyond 1.96 (5%), each within ~5 standard errors
        assert abs(eps.mean().item()) < 5 / math.sqrt(n)
        assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)
        tail = (eps.abs() > 1.959964).double().mean().item()
        assert abs(tail - 0.05) < 5 * math.sqrt(0.05 * 0.95 / n)


def test_noise_is_uncorrelated_across_neighbours():
    eps = vae_fast.reparameterize(torch.zeros(400_000), torch.zeros(400_000)).double()
    n = eps.numel()
    # elements 4k..4k+3 share one Philox block; every pairing inside it must still be independent
    for lag in (1, 2, 3, 4, 5):
        corr = torch.corrcoef(torch.stack([eps[:-lag], eps[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), lag


def test_manual_seed_and_generator_reproduce():
    mu, logvar = torch.randn(64, 20), torch.randn(64, 20)
    torch.manual_seed(123)
    a = vae_fast.reparameterize(mu, logvar)
    b = vae_fast.reparameterize(mu, logvar)
    torch.manual_seed(123)
    assert torch.equal(vae_fast.reparameterize(mu, logvar), a)
    assert not torch.equal(a, b)  # successive draws differ
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(vae_fast.reparameterize(mu, logvar, generator=g1), vae_fast.reparameterize(mu, logvar, generator=g2))
    assert not torch.equal(vae_fast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(6)),
                           vae_fast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_same_draw_on_any_thread_count(dtype):
    """640,000 elements are 80 tasks of 8 noise chunks: 1, 2, 3, 5 and 8 threads split them
    differently, and the draw and the logvar gradient (which draws the noise again) keep their bits."""
    mu, logvar = torch.randn(64, 10000).to(dtype), torch.randn(64, 10000).to(dtype)
    g = torch.randn(64, 10000).to(dtype)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3, 5, 8):
            torch.set_num_threads(n)
            lv = logvar.clone().requires_grad_()
            z = vae_fast.reparameterize(mu, lv, generator=torch.Generator().manual_seed(9))
            z.backward(g)
            runs.append((z.detach(), lv.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(z, runs[0][0]) and torch.equal(grad, runs[0][1]) for z, grad in runs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_gradients(dtype):
    mu = torch.randn(33, 7, dtype=dtype, requires_grad=True)
    logvar = torch.randn(33, 7, dtype=dtype, requires_grad=True)
    z = vae_fast.reparameterize(mu, logvar)
    assert z.dtype == dtype and z.shape == mu.shape
    grad = torch.randn_like(z)
    z.backward(grad)
    assert torch.equal(mu.grad, grad)
    expected = 0.5 * grad.double() * (z.double() - mu.double())
    assert relative_error(logvar.grad, expected) <= (1e-6 if dtype in (torch.float32, torch.float64) else 1e-2)


def test_gradcheck_float64():
    mu = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    # a fresh generator with one seed per call makes the op a deterministic function for gradcheck
    fn = lambda m, l: vae_fast.reparameterize(m, l, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(fn, (mu, logvar))


def test_double_backward_is_the_hand_derived_second_derivative():
    """z = mu + exp(logvar / 2) * eps: d2z/dlogvar2 = 0.25 * sigma * eps, d2z/dlogvar dmu = 0,
    and d(dz/dlogvar)/d(grad_z) = 0.5 * sigma * eps, with eps recovered in float64 from z."""
    mu = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    z = vae_fast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(1))
    sigma = torch.exp(0.5 * logvar.detach())
    eps = (z.detach() - mu.detach()) / sigma
    weights = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)  # an arbitrary grad_z
    (d_logvar,) = torch.autograd.grad(z, logvar, weights, create_graph=True)
    assert torch.allclose(d_logvar, 0.5 * weights * sigma * eps, rtol=1e-12, atol=1e-12)
    second_logvar, second_mu, second_weights = torch.autograd.grad(d_logvar.sum(), (logvar, mu, weights), allow_unused=True)
    assert torch.allclose(second_logvar, 0.25 * weights.detach() * sigma * eps, rtol=1e-12, atol=1e-12)
    assert second_mu is None or not second_mu.any()
    assert torch.allclose(second_weights, 0.5 * sigma * eps, rtol=1e-12, atol=1e-12)


def test_gradgradcheck_float64():
    mu = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda m, l: vae_fast.reparameterize(m, l, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradgradcheck(fn, (mu, logvar))


def test_opcheck():
    # logvar = -inf gives z = mu exactly, so the repeated runs inside opcheck agree
    for requires_grad in (False, True):
        mu = torch.randn(6, 5, requires_grad=requires_grad)
        logvar = torch.full((6, 5), -float("inf"), requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.vae_fast.reparameterize.default, (mu, logvar, None))
    _, state = torch.ops.vae_fast.reparameterize_sample(torch.randn(4, 3), torch.randn(4, 3))
    assert state.dtype == torch.int64 and state.shape == (2,)
    torch.library.opcheck(torch.ops.vae_fast.reparameterize_sample.default,
                          (torch.randn(6, 5), torch.full((6, 5), -float("inf")), None))
    torch.library.opcheck(torch.ops.vae_fast.reparameterize_backward.default, (torch.randn(4, 3), torch.randn(4, 3), state))
    torch.library.opcheck(torch.ops.vae_fast.reparameterize_noise.default, (torch.randn(4, 3), state))


def test_torch_compile_fullgraph():
    mu = torch.randn(16, 8, requires_grad=True)
    logvar = torch.randn(16, 8, requires_grad=True)

    def sample_and_reduce(m, l):
        return (vae_fast.reparameterize(m, l) ** 2).sum()

    compiled = torch.compile(sample_and_reduce, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    expected = sample_and_reduce(mu, logvar)
    torch.manual_seed(0)
    got = compiled(mu, logvar)
    assert torch.equal(got, expected)
    got.backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()


def test_non_contiguous_inputs():
    mu = torch.randn(20, 10).t()
    logvar = torch.randn(20, 10).t()
    z = vae_fast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(1))
    z_contig = vae_fast.reparameterize(mu.contiguous(), logvar.contiguous(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, z_contig)


def test_edge_values():
    assert vae_fast.reparameterize(torch.empty(0, 20), torch.empty(0, 20)).shape == (0, 20)
    mu = torch.zeros(8)
    logvar = torch.zeros(8)
    logvar[0] = 1e4  # std overflows: z is +-inf, never NaN
    mu[1] = float("nan")
    logvar[2] = -float("inf")  # zero variance: z == mu exactly
    mu[2] = 3.0
    z = vae_fast.reparameterize(mu, logvar)
    assert torch.isinf(z[0]) and torch.isnan(z[1]) and z[2] == 3.0 and torch.isfinite(z[3:]).all()


def test_bad_input():
    mu = torch.randn(4, 3)
    with pytest.raises(ValueError, match="mu and logvar must have the same shape"):
        vae_fast.reparameterize(mu, torch.randn(4, 2))
    with pytest.raises(TypeError, match="logvar must be a floating-point tensor"):
        vae_fast.reparameterize(mu, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="mu must be a torch.Tensor"):
        vae_fast.reparameterize([0.0], torch.zeros(1))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        vae_fast.reparameterize(mu, mu, generator=7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, mu_value, logvar_value",
    [(torch.bfloat16, 1.0, -8.0), (torch.float16, 8.0, -6.0), (torch.float32, 100.0, -24.0), (torch.float64, 1e6, -60.0)],
    ids=["bfloat16", "float16", "float32", "float64"],
)
def test_logvar_gradient_is_exact_where_z_minus_mu_cancels(device, dtype, mu_value, logvar_value):
    """The backward draws eps again instead of using 0.5 (z - mu) from the rounded z, which cancels
    where sigma * eps is small next to mu's spacing (bfloat16 mu=1, logvar=-8 gave 0 or +42%; float32
    mu=100, logvar=-24 ~100%). Reference: float64 with the same eps, which mu = 0, logvar = 0 in the
    compute dtype return exactly (z = 0 + 1 * eps)."""
    n = 4099  # odd: the tail past the last whole Philox block too
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    zeros = torch.zeros(n, dtype=compute, device=device)
    eps = vae_fast.reparameterize(zeros, zeros, generator=torch.Generator(device).manual_seed(11)).double()
    mu = torch.full((n,), mu_value, dtype=dtype, device=device, requires_grad=True)
    logvar = torch.full((n,), logvar_value, dtype=dtype, device=device, requires_grad=True)
    z = vae_fast.reparameterize(mu, logvar, generator=torch.Generator(device).manual_seed(11))
    g = (torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5).to(dtype).to(device)
    z.backward(g)
    expected = 0.5 * g.double() * torch.exp(0.5 * logvar.detach().double()) * eps
    rtol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    error = (logvar.grad.double() - expected).abs()
    assert bool((error <= rtol * expected.abs() + torch.finfo(dtype).tiny).all()), error.max()
    assert torch.equal(mu.grad, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_same_seed_draws_the_same_noise_for_float32_and_half_inputs(device, dtype):
    """Half-precision inputs draw eps in float, as float32 inputs do: with mu = 0 and logvar = 0 the
    half result is the float32 one rounded once."""
    zeros = torch.zeros(3000, device=device)
    wide = vae_fast.reparameterize(zeros, zeros, generator=torch.Generator(device).manual_seed(5))
    narrow = vae_fast.reparameterize(zeros.to(dtype), zeros.to(dtype), generator=torch.Generator(device).manual_seed(5))
    assert torch.equal(narrow, wide.to(dtype))


def test_noise_state_ops_draw_the_forward_eps():
    """reparameterize_sample's state makes reparameterize_noise return exactly the eps of that call,
    and reparameterize_backward the hand-derived gradient from it (CPU; CUDA in test_cuda.py)."""
    mu, logvar = torch.randn(7, 33, dtype=torch.float64), torch.randn(7, 33, dtype=torch.float64)
    z, state = torch.ops.vae_fast.reparameterize_sample(mu, logvar, torch.Generator().manual_seed(2))
    eps = torch.ops.vae_fast.reparameterize_noise(logvar, state)
    assert torch.allclose(z, mu + torch.exp(0.5 * logvar) * eps, rtol=1e-15, atol=1e-15)
    g = torch.randn(7, 33, dtype=torch.float64)
    grad = torch.ops.vae_fast.reparameterize_backward(g, logvar, state)
    assert torch.allclose(grad, 0.5 * g * torch.exp(0.5 * logvar) * eps, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="noise_state must be the contiguous int64"):
        torch.ops.vae_fast.reparameterize_noise(logvar, state.double())
