"""vae_fast.vae_loss with likelihood="gaussian" / "laplace": the fused kernels against an oracle that
shares nothing with them (torch.distributions' log_prob in float64 for the loss, gradients derived by
hand), on every device in DEVICES (CUDA cases run where a GPU is present).

Hand-derived gradients, with u = x - m and s = log_scale:
  gaussian: NLL = u^2 / (2 e^{2s}) + s + log(2 pi) / 2;  dm = -u e^{-2s},      dx = u e^{-2s},      ds = 1 - u^2 e^{-2s}
  laplace:  NLL = |u| e^{-s} + s + log 2;               dm = -sign(u) e^{-s},  dx = sign(u) e^{-s},  ds = 1 - |u| e^{-s}
  KL = 0.5 (mu^2 + e^lv - 1 - lv);                      dmu = mu,             dlv = 0.5 (e^lv - 1)
"""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Laplace, Normal

import vae_fast
from conftest import DEVICES, gradient_tolerance, loss_tolerance, max_elementwise_relative_error, relative_error, requires_cuda

LIKELIHOODS = ["gaussian", "laplace"]
SCALES = ["none", "float", "shared", "shared_1", "feature", "element"]
REDUCTIONS = ["sum", "mean", "none"]


def make_case(batch, features, latents, scale, *, dtype=torch.float32, device="cpu", seed=0, image=False):
    """recon, x, mu, logvar and log_scale (None, a float or a tensor) for one case."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, features // 4, 4) if image else (batch, features)
    recon = torch.randn(shape, generator=g, dtype=torch.float64)
    x = recon + torch.randn(shape, generator=g, dtype=torch.float64) * 0.7
    mu = torch.randn(batch, latents, generator=g, dtype=torch.float64)
    logvar = torch.randn(batch, latents, generator=g, dtype=torch.float64)
    log_scale = {
        "none": None,
        "float": -0.3,
        "shared": torch.tensor(0.25, dtype=torch.float64),
        "shared_1": torch.tensor([-0.4], dtype=torch.float64),  # nn.Parameter(torch.zeros(1)) style
        "feature": 0.4 * torch.randn(shape[1:], generator=g, dtype=torch.float64),
        "element": 0.4 * torch.randn(shape, generator=g, dtype=torch.float64),
    }[scale]
    tensors = [t.to(device=device, dtype=dtype) for t in (recon, x, mu, logvar)]
    if isinstance(log_scale, torch.Tensor):
        log_scale = log_scale.to(device=device, dtype=dtype)
    return (*tensors, log_scale)


def oracle(likelihood, recon, x, mu, logvar, log_scale, beta, reduction, weights):
    """Loss (torch.distributions, float64) and hand-derived gradients of sum(weights * loss)."""
    r, t = recon.double().reshape(len(recon), -1), x.double().reshape(len(x), -1)
    s = torch.zeros((), dtype=torch.float64) if log_scale is None else torch.as_tensor(log_scale, dtype=torch.float64)
    s_rows = s.reshape(()) if s.numel() == 1 else s.reshape(1, -1) if s.numel() == r.shape[1] else s.reshape(r.shape)
    s_rows = s_rows.to(r.device)
    dist = (Normal if likelihood == "gaussian" else Laplace)(r, s_rows.exp())
    nll = -dist.log_prob(t).sum(1)
    m64, lv64 = mu.double(), logvar.double()
    kl = 0.5 * (m64**2 + lv64.exp() - 1 - lv64).sum(1)
    per_sample = nll + beta * kl
    u = t - r
    if likelihood == "gaussian":
        inv = torch.exp(-2 * s_rows)
        d_target, d_scale = u * inv, 1 - u**2 * inv
    else:
        inv = torch.exp(-s_rows)
        d_target, d_scale = torch.sign(u) * inv, 1 - u.abs() * inv
    batch = len(recon)
    if reduction == "none":
        w = weights.double().reshape(-1, 1)
        loss = per_sample
    else:
        w = torch.full((batch, 1), float(weights) / (batch if reduction == "mean" else 1), dtype=torch.float64, device=r.device)
        loss = per_sample.sum() / (batch if reduction == "mean" else 1)
    grads = {
        "recon": (-d_target * w).reshape(recon.shape),
        "x": (d_target * w).reshape(x.shape),
        "mu": beta * m64 * w,
        "logvar": beta * 0.5 * torch.expm1(lv64) * w,
    }
    if isinstance(log_scale, torch.Tensor):
        grads["log_scale"] = (d_scale.expand_as(u) * w).sum_to_size(s_rows.shape).reshape(log_scale.shape)
    return loss, grads


def fused(likelihood, recon, x, mu, logvar, log_scale, beta, reduction, weights):
    leaves = {"recon": recon, "x": x, "mu": mu, "logvar": logvar}
    if isinstance(log_scale, torch.Tensor):
        leaves["log_scale"] = log_scale
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    scale_arg = leaves.get("log_scale", log_scale)
    loss = vae_fast.vae_loss(leaves["recon"], leaves["x"], leaves["mu"], leaves["logvar"], likelihood=likelihood,
                             log_scale=scale_arg, beta=beta, reduction=reduction)
    (loss * weights.to(loss.device, loss.dtype) if reduction == "none" else loss * float(weights)).sum().backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def weights_for(reduction, batch, device):
    g = torch.Generator().manual_seed(7)
    return torch.rand(batch, generator=g, dtype=torch.float64).to(device) + 0.5 if reduction == "none" else 1.7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("size", [(1, 4, 1), (37, 44, 5), (300, 784, 20), (3, 9000, 4)], ids=lambda s: "x".join(map(str, s)))
def test_float32_within_1e5_of_float64_oracle(size, likelihood, scale, reduction, device):
    """The issue's bar: float32 loss and every gradient within 1e-5 relative (norm-wise) of float64."""
    case = make_case(*size, scale, device=device)
    weights = weights_for(reduction, size[0], device)
    loss, grads = fused(likelihood, *case, 0.7, reduction, weights)
    ref_loss, ref_grads = oracle(likelihood, *case, 0.7, reduction, weights)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert relative_error(loss, ref_loss) <= 1e-5
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and g.shape == ref_grads[name].shape, name
        assert relative_error(g, ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", ["float", "shared", "feature", "element"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("device", DEVICES)
def test_other_dtypes_within_their_tolerance(likelihood, scale, dtype, device):
    case = make_case(23, 130, 6, scale, dtype=dtype, device=device, seed=3)
    loss, grads = fused(likelihood, *case, 1.0, "sum", 1.0)
    # The oracle sees the inputs as rounded to `dtype`: only the kernel's own error is measured.
    ref_loss, ref_grads = oracle(likelihood, *case, 1.0, "sum", 1.0)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert relative_error(loss, ref_loss) <= loss_tolerance(dtype)
    for name, g in grads.items():
        assert g.dtype == dtype, name
        assert relative_error(g, ref_grads[name]) <= gradient_tolerance(dtype), name


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", ["shared", "feature", "element"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_gradcheck_float64(likelihood, scale, reduction):
    recon, x, mu, logvar, log_scale = make_case(3, 8, 2, scale, dtype=torch.float64, image=True)
    inputs = [t.requires_grad_() for t in (recon, x, mu, logvar, log_scale)]
    fn = lambda r, t, m, lv, s: vae_fast.vae_loss(r, t, m, lv, likelihood=likelihood, log_scale=s, beta=0.6,
                                                  reduction=reduction)
    # |x - recon| >= ~0.01 here, far from the Laplace kink next to the finite-difference step.
    assert ((x - recon).abs() > 1e-3).all()
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(likelihood, device):
    for scale, reduction, wants_scale_grad in itertools.product(["shared", "feature", "element"], REDUCTIONS, [False, True]):
        recon, x, mu, logvar, log_scale = make_case(5, 12, 3, scale, device=device)
        tensors = [t.requires_grad_() for t in (recon, x, mu, logvar)]
        log_scale.requires_grad_(wants_scale_grad)
        mask = [True] * 4 + [wants_scale_grad, False]
        torch.library.opcheck(torch.ops.vae_fast.vae_loss.default,
                              (*tensors, log_scale, None, likelihood, False, 0.0, 0.5, reduction, mask))
    recon, x, mu, logvar, _ = make_case(5, 12, 3, "none", device=device)
    torch.library.opcheck(torch.ops.vae_fast.vae_loss.default,
                          (recon, x, mu, logvar, None, None, likelihood, False, -0.5, 1.0, "sum", [False] * 6))


@pytest.mark.parametrize("scale", ["float", "shared", "feature"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(likelihood, scale, device):
    case = make_case(64, 100, 8, scale, device=device, seed=5)

    def step(recon, x, mu, logvar, log_scale):
        return vae_fast.vae_loss(recon, x, mu, logvar, likelihood=likelihood, log_scale=log_scale, reduction="mean")

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in case]
        loss = fn(*leaves)
        (loss * 3.0).backward()
        results.append((loss.detach(), [t.grad for t in leaves if isinstance(t, torch.Tensor)]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    for g_compiled, g_eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bf16_model_output_against_float32_data(likelihood, device):
    """A decoder under bf16 autocast gives a bf16 mean; data and the learned scale stay float32: the
    inputs are promoted to float32 and the loss is that of the promoted values."""
    recon, x, mu, logvar, log_scale = make_case(16, 64, 4, "shared", device=device)
    decoder = torch.nn.Linear(64, 64).to(device)
    log_scale.requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        mean = decoder(recon)
        assert mean.dtype == torch.bfloat16
        loss = vae_fast.vae_loss(mean, x, mu, logvar, likelihood=likelihood, log_scale=log_scale)
    loss.backward()
    assert loss.dtype == torch.float32 and log_scale.grad.dtype == torch.float32
    ref_loss, ref_grads = oracle(likelihood, mean.detach().float(), x, mu, logvar, log_scale.detach(), 1.0, "sum", 1.0)
    assert relative_error(loss.detach(), ref_loss) <= 1e-5
    assert relative_error(log_scale.grad, ref_grads["log_scale"]) <= 1e-5


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("device", DEVICES)
def test_fixed_float_scale_equals_a_constant_tensor(likelihood, device):
    recon, x, mu, logvar, _ = make_case(9, 50, 3, "none", device=device)
    as_float = vae_fast.vae_loss(recon, x, mu, logvar, likelihood=likelihood, log_scale=-1.25)
    as_tensor = vae_fast.vae_loss(recon, x, mu, logvar, likelihood=likelihood,
                                  log_scale=torch.tensor(-1.25, device=device))
    default = vae_fast.vae_loss(recon, x, mu, logvar, likelihood=likelihood)
    zero = vae_fast.vae_loss(recon, x, mu, logvar, likelihood=likelihood, log_scale=0.0)
    assert relative_error(as_float, as_tensor) <= 1e-6
    assert torch.equal(default, zero)


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_with_unit_scale_is_half_the_summed_squared_error_plus_a_constant(device):
    """The README's statement about "MSE"."""
    recon, x, mu, logvar, _ = make_case(10, 30, 2, "none", dtype=torch.float64, device=device)
    loss = vae_fast.vae_loss(recon, x, mu, logvar, likelihood="gaussian", beta=0.0)
    sse = torch.nn.functional.mse_loss(recon, x, reduction="sum")
    expected = 0.5 * sse + 0.5 * recon.numel() * math.log(2 * math.pi)
    assert relative_error(loss, expected) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_laplace_gradient_is_zero_where_x_equals_recon(device):
    recon = torch.tensor([[0.5, -1.0, 2.0, 3.0]], device=device, requires_grad=True)
    x = torch.tensor([[0.5, -1.0, 1.0, 3.0]], device=device, requires_grad=True)
    mu = torch.zeros(1, 1, device=device)
    log_scale = torch.tensor(math.log(2.0), device=device, requires_grad=True)
    loss = vae_fast.vae_loss(recon, x, mu, mu, likelihood="laplace", log_scale=log_scale)
    loss.backward()
    assert recon.grad.tolist() == [[0.0, 0.0, 0.5, 0.0]] and x.grad.tolist() == [[0.0, 0.0, -0.5, 0.0]]
    # d/ds = sum(1 - |u| / b) = 4 - 1/2
    assert log_scale.grad.item() == pytest.approx(3.5, rel=1e-6)


@pytest.mark.parametrize("bad", ["x_inf", "x_nan", "recon_inf", "recon_nan", "scale_inf", "scale_minus_inf", "scale_nan"])
@pytest.mark.parametrize("scale", ["shared", "feature", "element"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_inputs_give_nan_never_a_finite_number(likelihood, scale, bad, device):
    recon, x, mu, logvar, log_scale = make_case(4, 12, 2, scale, device=device)
    name, value = bad.split("_", 1)
    value = {"inf": math.inf, "minus_inf": -math.inf, "nan": math.nan}[value]
    target = {"x": x, "recon": recon, "scale": log_scale}[name]
    target.view(-1)[0] = value
    leaves = [t.requires_grad_() for t in (recon, x, mu, logvar, log_scale)]
    loss = vae_fast.vae_loss(*leaves[:4], likelihood=likelihood, log_scale=leaves[4], reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[0]), "the sample with the bad value"
    if name != "scale" or scale == "element":
        assert torch.isfinite(loss[1:]).all(), "other samples are untouched"
        assert torch.isnan(recon.grad.reshape(4, -1)[0, 0]) and torch.isnan(x.grad.reshape(4, -1)[0, 0])
    assert torch.isnan(log_scale.grad.view(-1)[0]), "the scale the bad element used"


def test_per_feature_scale_gradient_is_the_same_bits_on_any_thread_count():
    """Rows are summed in fixed groups: 1, 2 and 3 threads give identical loss and gradients (the
    case spans several feature blocks and row groups)."""
    case = make_case(700, 5000, 16, "feature", seed=11)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for likelihood in LIKELIHOODS:
                results.append((threads, likelihood, fused(likelihood, *case, 1.0, "sum", 1.0)))
    finally:
        torch.set_num_threads(before)
    for likelihood in LIKELIHOODS:
        runs = [r for t, lik, r in results if lik == likelihood]
        for loss, grads in runs[1:]:
            assert torch.equal(loss, runs[0][0])
            for name in grads:
                assert torch.equal(grads[name], runs[0][1][name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_second_backward_with_unit_grad_output_accumulates_exactly(device):
    recon, x, mu, logvar, log_scale = make_case(8, 20, 3, "feature", device=device)
    log_scale.requires_grad_()
    loss = vae_fast.vae_loss(recon, x, mu, logvar, likelihood="gaussian", log_scale=log_scale)
    loss.backward(retain_graph=True)
    once = log_scale.grad.clone()
    loss.backward()
    assert torch.equal(log_scale.grad, 2 * once)


@given(
    batch=st.integers(1, 40),
    features=st.integers(1, 300),
    likelihood=st.sampled_from(LIKELIHOODS),
    scale=st.sampled_from(["float", "shared", "feature", "element"]),
    reduction=st.sampled_from(REDUCTIONS),
    spread=st.sampled_from([1e-3, 1.0, 1e3]),
    log_scale_center=st.floats(-6, 6),
    seed=st.integers(0, 2**16),
)
def test_property_float32_elementwise_against_hand_derived_gradients(batch, features, likelihood, scale, reduction,
                                                                     spread, log_scale_center, seed):
    """Every element's gradient within 1e-5 relative of the hand-derived float64 value (where that
    value is not tiny next to float32's rounding of the residual), across residual magnitudes from
    1e-3 to 1e3 and scales from e^-6 to e^6; the loss within 1e-5 norm-wise."""
    recon, x, mu, logvar, log_scale = make_case(batch, features, 3, scale, seed=seed)
    x = (recon + (x - recon) * spread).float()
    if isinstance(log_scale, torch.Tensor):
        log_scale = log_scale + log_scale_center
    elif isinstance(log_scale, float):
        log_scale = log_scale_center
    weights = weights_for(reduction, batch, "cpu")
    loss, grads = fused(likelihood, recon, x, mu, logvar, log_scale, 1.0, reduction, weights)
    ref_loss, ref_grads = oracle(likelihood, recon, x, mu, logvar, log_scale, 1.0, reduction, weights)
    assert relative_error(loss, ref_loss) <= 1e-5
    for name in ("recon", "x", "mu", "logvar"):
        # Elements whose residual rounds to few float32 digits are excluded by the floor.
        floor = 1e-6 * float(ref_grads[name].abs().max())
        assert max_elementwise_relative_error(grads[name], ref_grads[name], floor=floor) <= 1e-5, name
    if "log_scale" in grads:
        assert relative_error(grads["log_scale"], ref_grads["log_scale"]) <= 1e-5


def test_errors_name_the_argument_and_the_problem():
    recon, x, mu, logvar, _ = make_case(4, 6, 2, "none")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        vae_fast.vae_loss(recon, x, mu, logvar, likelihood="normal")
    with pytest.raises(ValueError, match="logits=True applies to the Bernoulli likelihood only"):
        vae_fast.vae_loss(recon, x, mu, logvar, likelihood="gaussian", logits=True)
    with pytest.raises(ValueError, match="log_scale must be None"):
        vae_fast.vae_loss(recon.sigmoid(), x.sigmoid(), mu, logvar, log_scale=torch.zeros(()))
    with pytest.raises(ValueError, match=r"log_scale has shape \(5,\).*per-sample shape \(6,\)"):
        vae_fast.vae_loss(recon, x, mu, logvar, likelihood="laplace", log_scale=torch.zeros(5))
    with pytest.raises(ValueError, match=r"log_scale has shape \(2, 4, 6\)"):
        vae_fast.vae_loss(recon, x, mu, logvar, likelihood="gaussian", log_scale=torch.zeros(2, 4, 6))
    with pytest.raises(TypeError, match="log_scale must be a floating-point tensor"):
        vae_fast.vae_loss(recon, x, mu, logvar, likelihood="gaussian", log_scale=torch.zeros((), dtype=torch.int64))
    with pytest.raises(TypeError, match="log_scale must be None, a real number or a floating tensor"):
        vae_fast.vae_loss(recon, x, mu, logvar, likelihood="gaussian", log_scale="0")
    with pytest.raises(ValueError, match="log_scale must be finite"):
        vae_fast.vae_loss(recon, x, mu, logvar, likelihood="gaussian", log_scale=math.inf)
    # The op checks for itself when called directly.
    op = torch.ops.vae_fast.vae_loss
    with pytest.raises(ValueError, match="likelihood must be 'bernoulli', 'gaussian', 'laplace', 'poisson', 'nb' or 'zinb'"):
        op(recon, x, mu, logvar, None, None, "gamma", False, 0.0, 1.0, "sum", [False] * 6)
    with pytest.raises(ValueError, match="logits=True applies to the Bernoulli likelihood only"):
        op(recon, x, mu, logvar, None, None, "laplace", True, 0.0, 1.0, "sum", [False] * 6)
    with pytest.raises(ValueError, match="Bernoulli likelihood has no scale"):
        op(recon, x, mu, logvar, torch.zeros(()), None, "bernoulli", False, 0.0, 1.0, "sum", [False] * 6)
    with pytest.raises(TypeError, match="log_scale has dtype"):
        op(recon, x, mu, logvar, torch.zeros((), dtype=torch.float64), None, "gaussian", False, 0.0, 1.0, "sum", [False] * 6)
    with pytest.raises(ValueError, match="log_scale has shape"):
        op(recon, x, mu, logvar, torch.zeros(3), None, "gaussian", False, 0.0, 1.0, "sum", [False] * 6)
    with pytest.raises(ValueError, match="grad_mask\\[4\\]"):
        op(recon, x, mu, logvar, None, None, "gaussian", False, 0.0, 1.0, "sum", [False] * 4 + [True, False])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_log_scale_with_more_dimensions_than_recon_is_refused_at_the_call(reduction, device):
    """(1, 1, D) against recon (B, D) would broadcast the loss to (1, B, D): it used to pass the checks
    and crash the backward of reduction "none" with a sizes error. The function and the op refuse it."""
    recon, x, mu, logvar, _ = make_case(3, 4, 2, "none", device=device)
    for shape in [(1, 1, 4), (1, 1, 1)]:
        log_scale = torch.zeros(shape, device=device, requires_grad=True)
        # "." for the brackets: Python prints shapes as (3, 4), the op as [3, 4]
        dims = ", ".join(map(str, shape))
        expected = rf"log_scale has shape .{dims}., more dimensions than recon's .3, 4."
        with pytest.raises(ValueError, match=expected):
            vae_fast.vae_loss(recon, x, mu, logvar, likelihood="gaussian", log_scale=log_scale, reduction=reduction)
        with pytest.raises(ValueError, match=expected):
            torch.ops.vae_fast.vae_loss(recon, x, mu, logvar, log_scale.detach(), None, "gaussian", False, 0.0, 1.0,
                                        reduction, [False] * 6)


def test_targets_may_be_any_real_number():
    """Unlike Bernoulli, no [0, 1] check: large and negative targets are ordinary data here."""
    recon, x, mu, logvar, _ = make_case(3, 5, 2, "none")
    x = x * 1e4 - 5e3
    for likelihood in LIKELIHOODS:
        assert torch.isfinite(vae_fast.vae_loss(recon, x, mu, logvar, likelihood=likelihood))


@requires_cuda
@pytest.mark.parametrize("scale", ["shared", "feature", "element"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_cuda_graph_replay_gives_the_eager_bits(likelihood, scale):
    """The per-feature reduction allocates its group sums inside the op: captured, that memory comes
    from the graph's pool, and a replay must give the eager call's loss and gradients bit for bit."""
    recon, x, mu, logvar, log_scale = make_case(300, 784, 20, scale, device="cuda", seed=9)
    args = (recon, x, mu, logvar, log_scale, None, likelihood, False, 0.0, 0.7, "mean", [True, True, True, True, True, False])
    op = torch.ops.vae_fast.vae_loss
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        op(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op(*args)
    graph.replay()
    torch.cuda.synchronize()
    eager = op(*args)
    for name, got, expected in zip(("loss", "recon", "x", "mu", "logvar", "log_scale", "zi_logits"), captured, eager):
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("scale", ["shared", "feature", "element"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(likelihood, scale, device):
    """No samples: a summed loss of 0 and a zero log_scale gradient of log_scale's shape."""
    recon, x, mu, logvar, log_scale = make_case(0, 12, 3, scale, device=device)
    log_scale.requires_grad_()
    loss = vae_fast.vae_loss(recon, x, mu, logvar, likelihood=likelihood, log_scale=log_scale)
    loss.backward()
    assert loss.item() == 0.0
    assert log_scale.grad.shape == log_scale.shape and not log_scale.grad.any()
    per_sample = vae_fast.vae_loss(recon, x, mu, logvar, likelihood=likelihood, log_scale=log_scale, reduction="none")
    assert per_sample.shape == (0,)
