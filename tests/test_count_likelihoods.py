"""The count likelihoods of vae_fast.vae_loss (issue 20): Poisson, NB and ZINB, fused and in the
pure-torch reference, against the mpmath oracle of tests/count_oracle.py, which is written from the
definitions. Each check runs both implementations: the fused op (vae_fast.vae_loss) and the
reference (vae_fast.reference.vae_loss, the fallback where the extension does not serve a device).

Accuracy rule, per element: |result - oracle| <= max(rel * |oracle|, rounding * magnitude), rel =
1e-5 for float32 (1e-9 for float64) and rounding = 16 units of float32's roundoff (32 of float64's), magnitude the
sum of |terms| of the quantity's definition (count_oracle's docstring: only where the definition
itself cancels does the bound leave relative error). The loss's magnitude is the loss.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, strategies as st

import vae_fast
from vae_fast import baselines, reference

import count_oracle
from conftest import DEVICES, relative_error

IMPLEMENTATIONS = {"fused": vae_fast.vae_loss, "reference": reference.vae_loss}
COUNTS = ("poisson", "nb", "zinb")
# float64: a count's loss near its mode (about 8 at x = mu = 1e6) is made of terms of about 1e7,
# whose float64 roundings alone are 1e-9 of it.
REL = {torch.float32: 1e-5, torch.float64: 1e-9}
# Float64 gets 32 units: the reference's Stirling form of the Gamma ratio (theta >= 10) takes a few
# more roundings than 16 in d/d log_theta at x = 1 (measured: 26 units at theta = 10, mu = 1e-8).
ROUNDING = {torch.float32: 16 * 2.0**-24, torch.float64: 32 * 2.0**-53}
TINY = torch.finfo(torch.float32).tiny

# The ranges: theta 1e-4..1e8 (10 is the reference's lgamma/Stirling switch), mu 1e-8..1e6,
# counts 0..1e6 (the likely ones near mu, and far tails), zero inflation certain (30) to absent (-30).
THETAS = (1e-4, 1e-2, 1.0, 9.99, 10.0, 1e2, 1e4, 1e6, 1e8)
MUS = (1e-8, 1e-4, 0.1, 1.0, 10.0, 1e3, 1e6)
ZI_LOGITS = (-30.0, -2.0, 0.0, 3.0, 30.0)


def counts_for(mu: float, theta: float) -> list[float]:
    """0, small counts, the mean and three standard deviations above it, and the range's top."""
    sd = math.sqrt(mu + mu * mu / theta)
    return sorted({0.0, 1.0, 2.0, 7.0, float(round(mu)), min(float(round(mu + 3 * sd)), 1e6), 1e6})


def extreme_grid(likelihood: str) -> dict[str, torch.Tensor]:
    """Every combination of the ranges' corner values, as float32 [N] tensors (log_mu, x,
    log_theta, zi_logits; the last two None where the likelihood has none)."""
    rows = []
    thetas = (math.inf,) if likelihood == "poisson" else THETAS
    zis = (0.0,) if likelihood != "zinb" else ZI_LOGITS
    for theta, mu, zi in itertools.product(thetas, MUS, zis):
        extra = [0.5, 2.5] if likelihood != "zinb" else []  # Poisson/NB take non-integer counts too
        for x in counts_for(mu, theta) + extra:
            rows.append((math.log(mu), x, math.log(theta), zi))
    columns = torch.tensor(rows, dtype=torch.float32).T
    return {"log_mu": columns[0], "x": columns[1],
            "log_theta": None if likelihood == "poisson" else columns[2],
            "zi_logits": columns[3] if likelihood == "zinb" else None}


def loss_and_gradients(impl, likelihood: str, inputs: dict, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-element loss (one element per sample, KL exactly 0) and the gradient of their sum with
    respect to each tensor input, in count_oracle's quantity names."""
    leaves = {name: t.to(device=device, dtype=dtype).reshape(-1, 1).requires_grad_()
              for name, t in inputs.items() if t is not None}
    n = leaves["log_mu"].shape[0]
    zeros = torch.zeros(n, 1, device=device, dtype=dtype)
    loss = impl(leaves["log_mu"], leaves["x"], zeros, zeros, likelihood=likelihood, log_theta=leaves.get("log_theta"),
                zi_logits=leaves.get("zi_logits"), reduction="none")
    names = list(leaves)
    grads = torch.autograd.grad(loss.sum(), [leaves[k] for k in names])
    out = {"loss": loss.detach()}
    for name, g in zip(names, grads):
        out[{"log_mu": "recon"}.get(name, name)] = g.reshape(-1)
    return out


def oracle_of(likelihood: str, inputs: dict, dtype: torch.dtype = torch.float32):
    """The oracle at the inputs as rounded to `dtype` (what the op sees)."""
    rounded = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    return count_oracle.elements(likelihood, rounded["log_mu"], rounded["x"], rounded["log_theta"], rounded["zi_logits"])


def accuracy_failures(results: dict, oracle: dict, rel: float, rounding: float, inputs: dict, floor: float = TINY) -> list[str]:
    """The quantities outside the accuracy rule, each with its worst point. Below `floor` (the
    result dtype's smallest normal number) the bound is absolute: rel * floor."""
    failures = []
    for name, actual in results.items():
        expected, magnitude = (t.reshape(-1) for t in oracle[name])
        actual = actual.detach().double().cpu().reshape(-1)
        allowed = torch.maximum(rel * expected.abs(), rounding * magnitude).clamp(min=rel * floor)
        excess = (actual - expected).abs() / allowed
        excess = torch.where(torch.isnan(excess), torch.full_like(excess, math.inf), excess)
        worst = int(excess.argmax())
        if excess[worst] > 1:
            point = {k: float(v[worst]) for k, v in inputs.items() if v is not None}
            failures.append(f"{name}: {float(actual[worst])!r} vs oracle {float(expected[worst])!r} "
                            f"(magnitude {float(magnitude[worst]):.3g}, {float(excess[worst]):.3g}x the bound) at {point}")
    return failures


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("likelihood", COUNTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_grid_matches_the_oracle(impl, likelihood, device, dtype):
    inputs = extreme_grid(likelihood)
    results = loss_and_gradients(IMPLEMENTATIONS[impl], likelihood, inputs, device, dtype)
    failures = accuracy_failures(results, oracle_of(likelihood, inputs, dtype), REL[dtype], ROUNDING[dtype], inputs)
    assert not failures, "\n".join(failures)


def test_oracle_derivatives_are_those_of_its_log_likelihood():
    """The hand-derived derivatives against mpmath.diff of the definition, at points from each regime."""
    points = [(0.3, 2.0, 1.2, -0.5), (13.8, 1e6, 18.4, 2.0), (-5.0, 3.0, -9.0, 0.0), (2.0, 7.0, 4.0, 30.0), (-18.4, 1.0, 2.3, -30.0)]
    for likelihood, point in itertools.product(COUNTS, points):
        element = count_oracle.element(likelihood, *point)
        for name, numeric in count_oracle.numeric_derivatives(likelihood, *point).items():
            assert getattr(element, name)[0] == pytest.approx(numeric, rel=1e-9, abs=1e-12), (likelihood, point, name)


def drawn_points(likelihood: str):
    """Lists of (log_mu, x, log_theta, zi_logit) over the issue's ranges, x a count near mu (within
    e^+-3) or anywhere in 0..1e6."""
    log_mu = st.floats(math.log(1e-8), math.log(1e6))
    near = st.tuples(log_mu, st.floats(-3, 3)).map(lambda p: (p[0], float(min(round(math.exp(p[0] + p[1])), 10**6))))
    anywhere = st.tuples(log_mu, st.integers(0, 10**6).map(float))
    point = st.tuples(st.one_of(near, anywhere), st.floats(math.log(1e-4), math.log(1e8)), st.floats(-30, 30))
    return st.lists(point.map(lambda p: (*p[0], *p[1:])), min_size=1, max_size=8)


def as_inputs(likelihood: str, points) -> dict:
    columns = torch.tensor(points, dtype=torch.float32).T
    return {"log_mu": columns[0], "x": columns[1],
            "log_theta": None if likelihood == "poisson" else columns[2],
            "zi_logits": columns[3] if likelihood == "zinb" else None}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("likelihood", COUNTS)
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_drawn_points_match_the_oracle(impl, likelihood, device, data):
    inputs = as_inputs(likelihood, data.draw(drawn_points(likelihood)))
    results = loss_and_gradients(IMPLEMENTATIONS[impl], likelihood, inputs, device, torch.float32)
    failures = accuracy_failures(results, oracle_of(likelihood, inputs), REL[torch.float32], ROUNDING[torch.float32], inputs)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("likelihood", COUNTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_the_oracle_at_their_rounded_values(impl, likelihood, device, dtype):
    """The loss is float32 (1e-5 of the oracle at the rounded inputs); a gradient is rounded to the
    dtype once, half its eps relative, so one eps bounds it. Points with a loss or gradient beyond
    half the dtype's range (float16: 65504) are left out."""
    inputs = extreme_grid(likelihood)
    oracle = oracle_of(likelihood, inputs, dtype)
    representable = torch.stack([v.abs() for v, _ in oracle.values()]).amax(0) <= torch.finfo(dtype).max / 2
    inputs = {k: None if v is None else v[representable] for k, v in inputs.items()}
    oracle = {k: (v[representable], m[representable]) for k, (v, m) in oracle.items()}
    results = loss_and_gradients(IMPLEMENTATIONS[impl], likelihood, inputs, device, dtype)
    rounded = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    loss_failures = accuracy_failures({"loss": results.pop("loss")}, oracle, REL[torch.float32], 0.0, rounded)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    gradient_failures = accuracy_failures(results, oracle, eps, ROUNDING[torch.float32] + eps, rounded, floor=tiny)
    assert not loss_failures + gradient_failures, "\n".join(loss_failures + gradient_failures)


LAYOUTS = {"float": None, "()": (), "(1,)": (1,), "(D,)": (5,), "(1, D)": (1, 5), "(B, D)": (3, 5)}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_every_log_theta_layout_and_its_gradient(impl, likelihood, layout, device):
    """log_theta shared, per gene or per element: the loss sums the oracle's elements, and the
    gradient comes back in log_theta's own shape, the oracle's summed over the dimensions it is shared on."""
    gen = torch.Generator().manual_seed(7)
    log_mu = torch.randn(3, 5, generator=gen) * 3
    x = torch.poisson(log_mu.exp(), generator=gen)
    zi = torch.randn(3, 5, generator=gen) * 2
    shape = LAYOUTS[layout]
    values = torch.randn(shape or (), generator=gen) * 4
    log_theta = float(values) if shape is None else values.to(device).requires_grad_()
    leaves = [t.to(device).requires_grad_() for t in (log_mu, x, zi)]
    zeros = torch.zeros(3, 1, device=device)
    loss = IMPLEMENTATIONS[impl](leaves[0], leaves[1], zeros, zeros, likelihood=likelihood, log_theta=log_theta,
                                 zi_logits=leaves[2] if likelihood == "zinb" else None)
    full = torch.as_tensor(float(values) if shape is None else values).expand(3, 5)
    oracle = count_oracle.elements(likelihood, log_mu, x, full, zi)
    assert accuracy_failures({"loss": loss.detach().reshape(1)}, {"loss": tuple(v.sum().reshape(1) for v in oracle["loss"])},
                             REL[torch.float32], ROUNDING[torch.float32], {}) == []
    if shape is None:
        return
    (grad,) = torch.autograd.grad(loss, [log_theta])
    assert grad.shape == log_theta.shape
    value, magnitude = (t.sum_to_size(shape if shape != () else ()).reshape(grad.shape) for t in oracle["log_theta"])
    assert accuracy_failures({"log_theta": grad}, {"log_theta": (value, magnitude)}, REL[torch.float32], ROUNDING[torch.float32], {}) == []


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("likelihood", COUNTS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("device", DEVICES)
def test_every_reduction_and_beta(impl, likelihood, reduction, beta, device):
    """Per sample: the oracle's NLL summed over genes + beta * KL (torch.distributions); reduced over
    the batch as asked; the latents' gradients are beta times the KL's, over B for "mean"."""
    gen = torch.Generator().manual_seed(11)
    log_mu = torch.randn(4, 6, generator=gen) * 2
    x = torch.poisson(log_mu.exp(), generator=gen)
    log_theta = torch.randn(6, generator=gen) * 2
    zi = torch.randn(4, 6, generator=gen)
    mu, logvar = (torch.randn(4, 3, generator=gen) for _ in range(2))
    leaves = [t.to(device).requires_grad_() for t in (mu, logvar)]
    loss = IMPLEMENTATIONS[impl](log_mu.to(device), x.to(device), *leaves, likelihood=likelihood,
                                 log_theta=None if likelihood == "poisson" else log_theta.to(device),
                                 zi_logits=zi.to(device) if likelihood == "zinb" else None, beta=beta, reduction=reduction)
    oracle = count_oracle.elements(likelihood, log_mu, x, log_theta.expand(4, 6), zi)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp()),
                                           torch.distributions.Normal(0.0, 1.0)).sum(1)
    per_sample = oracle["loss"][0].sum(1) + beta * kl
    expected = {"sum": per_sample.sum(), "mean": per_sample.mean(), "none": per_sample}[reduction]
    assert relative_error(loss, expected) <= 1e-5
    grads = torch.autograd.grad(loss.sum(), leaves)
    scale = beta / (4 if reduction == "mean" else 1)
    assert relative_error(grads[0], scale * mu.double()) <= 1e-5
    assert relative_error(grads[1], scale * 0.5 * (logvar.double().exp() - 1)) <= 1e-5


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("likelihood", COUNTS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_parameters_give_nan(impl, likelihood, bad, device):
    """A NaN or infinite log_mu, log_theta or zi_logits element makes its sample's loss NaN and its
    own gradient NaN; the other samples stay finite."""
    names = {"poisson": ["log_mu"], "nb": ["log_mu", "log_theta"], "zinb": ["log_mu", "log_theta", "zi_logits"]}[likelihood]
    for name in names:
        inputs = {"log_mu": torch.zeros(3, 4), "x": torch.tensor([0.0, 1, 2, 3]).expand(3, 4).clone(),
                  "log_theta": torch.zeros(3, 4), "zi_logits": torch.zeros(3, 4)}
        inputs[name][1, 2] = bad
        leaves = {k: v.to(device).requires_grad_() for k, v in inputs.items()}
        zeros = torch.zeros(3, 1, device=device)
        loss = IMPLEMENTATIONS[impl](leaves["log_mu"], leaves["x"], zeros, zeros, likelihood=likelihood,
                                     log_theta=leaves["log_theta"] if "log_theta" in names else None,
                                     zi_logits=leaves["zi_logits"] if "zi_logits" in names else None, reduction="none")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all(), (name, loss)
        (grad,) = torch.autograd.grad(loss.sum(), [leaves[name]])
        assert torch.isnan(grad[1, 2]), (name, grad)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_negative_or_non_finite_counts_are_an_error(bad):
    x = torch.ones(2, 3)
    x[1, 1] = bad
    with pytest.raises(ValueError, match="x"):
        vae_fast.vae_loss(torch.zeros(2, 3), x, torch.zeros(2, 1), torch.zeros(2, 1), likelihood="nb", log_theta=0.0)


def realistic_inputs(likelihood: str, batch: int = 16, genes: int = 301, device: str = "cpu", layout: str = "(D,)"):
    """A scVI-shaped batch: log_mu = log_softmax + log library size, NB counts drawn from it, log
    theta per gene (or another layout); an odd width, so vector bodies and scalar tails both run."""
    gen = torch.Generator().manual_seed(3)
    library = torch.randint(500, 20000, (batch, 1), generator=gen).float()
    log_mu = torch.log_softmax(torch.randn(batch, genes, generator=gen) * 2, 1) + library.log()
    theta_shape = {"()": (), "(D,)": (genes,), "(B, D)": (batch, genes)}[layout]
    log_theta = torch.randn(theta_shape, generator=gen) * 2
    rate = torch.distributions.Gamma(log_theta.exp(), (log_theta - log_mu).exp()).sample()
    x = torch.poisson(rate, generator=gen)
    zi = torch.randn(batch, genes, generator=gen) * 2
    x = torch.where(torch.rand(batch, genes, generator=gen) < torch.sigmoid(zi), 0.0, x)
    mu, logvar = torch.randn(batch, 10, generator=gen), torch.randn(batch, 10, generator=gen) * 0.5
    tensors = {"recon": log_mu, "x": x, "mu": mu, "logvar": logvar,
               "log_theta": None if likelihood == "poisson" else log_theta,
               "zi_logits": zi if likelihood == "zinb" else None}
    return {k: None if v is None else v.to(device) for k, v in tensors.items()}


def loss_and_all_gradients(fn, inputs: dict, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    loss = fn(leaves["recon"], leaves["x"], leaves["mu"], leaves["logvar"], log_theta=leaves.get("log_theta"),
              zi_logits=leaves.get("zi_logits"), **kwargs)
    grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
    return loss, dict(zip(leaves, grads))


@pytest.mark.parametrize("likelihood", COUNTS)
@pytest.mark.parametrize("layout", ["()", "(D,)", "(B, D)"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_op_matches_the_reference(likelihood, layout, reduction, device):
    inputs = realistic_inputs(likelihood, device=device, layout=layout)
    kwargs = {"likelihood": likelihood, "beta": 0.7, "reduction": reduction}
    loss, grads = loss_and_all_gradients(vae_fast.vae_loss, inputs, **kwargs)
    expected_loss, expected_grads = loss_and_all_gradients(reference.vae_loss, {k: None if v is None else v.double()
                                                                               for k, v in inputs.items()}, **kwargs)
    assert relative_error(loss, expected_loss) <= 1e-5
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape and relative_error(grad, expected_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("likelihood", COUNTS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_opcheck(likelihood, reduction):
    inputs = realistic_inputs(likelihood, batch=4, genes=9, layout="(D,)")
    for requires in (True, False):
        tensors = [None if inputs[k] is None else inputs[k].requires_grad_(requires)
                   for k in ("recon", "x", "mu", "logvar", "log_theta", "zi_logits")]
        mask = [t is not None and t.requires_grad for t in tensors]
        torch.library.opcheck(torch.ops.vae_fast.vae_loss.default,
                              (*tensors, likelihood, False, 0.0, 0.5, reduction, mask))


@pytest.mark.parametrize("likelihood", COUNTS)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(likelihood, device):
    inputs = realistic_inputs(likelihood, device=device)

    def step(recon, x, mu, logvar, log_theta=None, zi_logits=None):
        return vae_fast.vae_loss(recon, x, mu, logvar, likelihood=likelihood, log_theta=log_theta,
                                 zi_logits=zi_logits, reduction="mean") * 2.0

    expected_loss, expected_grads = loss_and_all_gradients(step, inputs)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        loss, grads = loss_and_all_gradients(torch.compile(step, fullgraph=True, backend=backend), inputs)
        assert relative_error(loss, expected_loss) <= 1e-6, backend
        assert all(relative_error(grads[k], expected_grads[k]) <= 1e-6 for k in grads), backend


@pytest.mark.cuda
@pytest.mark.parametrize("likelihood", COUNTS)
def test_cuda_graph_capture_replays_the_eager_loss_and_gradients(likelihood):
    inputs = realistic_inputs(likelihood, device="cuda")
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}

    def step():
        for leaf in leaves.values():
            leaf.grad = None if leaf.grad is None else leaf.grad.zero_()
        loss = vae_fast.vae_loss(leaves["recon"], leaves["x"], leaves["mu"], leaves["logvar"], likelihood=likelihood,
                                 log_theta=leaves.get("log_theta"), zi_logits=leaves.get("zi_logits"))
        loss.backward()
        return loss.detach()

    expected_loss, expected_grads = loss_and_all_gradients(vae_fast.vae_loss, inputs, likelihood=likelihood)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up outside the graph; the gradients now exist and are zeroed in place
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured_loss, expected_loss)
    assert all(torch.equal(leaves[k].grad, expected_grads[k]) for k in expected_grads)


def test_scvi_formula_loses_large_theta_where_ours_is_exact():
    """scvi-tools' log_nb_positive in float32 (vae_fast.baselines) against the oracle at mu = 10:
    its lgamma(x + theta) - lgamma(theta) cancels (scvi-tools issue 2965): already 1e-3 relative at
    theta = 1e4, a 100% error (a loss of 0 for a count of 0) from theta = 1e7. Ours stays at 1e-5."""
    x = torch.tensor([0.0, 1, 5, 10, 20, 40])
    worst = {}
    for impl in ("scvi", *IMPLEMENTATIONS):
        for theta in (1e4, 1e7):
            log_mu, log_theta = torch.full_like(x, math.log(10.0)), torch.full_like(x, math.log(theta))
            expected = count_oracle.elements("nb", log_mu, x, log_theta)["loss"][0]
            if impl == "scvi":
                loss = -baselines.log_nb_positive(x, log_mu.exp(), log_theta.exp())
            else:
                zeros = torch.zeros(len(x), 1)
                loss = IMPLEMENTATIONS[impl](log_mu[:, None], x[:, None], zeros, zeros, likelihood="nb",
                                             log_theta=log_theta[:, None], reduction="none")
            worst[impl, theta] = float(((loss.double() - expected).abs() / expected).max())
    assert worst["scvi", 1e4] > 5e-4 and worst["scvi", 1e7] >= 1.0, worst
    assert max(v for (impl, _), v in worst.items() if impl != "scvi") <= 1e-5, worst
