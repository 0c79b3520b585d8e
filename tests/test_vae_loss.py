"""vae_fast.vae_loss: parity with the float64 reference, gradients, opcheck, torch.compile,
determinism, edge cases and bad input (CPU; the CUDA variants live in test_cuda.py)."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vae_fast
from vae_fast import reference
from conftest import DEVICES, TOLERANCE, gradient_tolerance, loss_tolerance, max_elementwise_relative_error, relative_error

SIZES = [(1, 1, 1), (7, 33, 5), (33, 257, 20), (257, 1000, 64), (1000, 7, 3), (2, 5000, 2)]
REDUCTIONS = ["sum", "mean", "none"]


def sample_inputs(batch, features, latents, *, logits, dtype=torch.float32, device="cpu", seed=0, x_shape=None):
    """recon, x, mu, logvar for one case: logits ~ N(0, 3^2) or probabilities in (0, 1), binary-ish targets."""
    g = torch.Generator().manual_seed(seed)
    if logits:
        recon = torch.randn(batch, features, generator=g, dtype=torch.float64) * 3
    else:
        recon = torch.rand(batch, features, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x = torch.rand(batch, features, generator=g, dtype=torch.float64)
    x = torch.where(x > 0.7, x.round(), x)  # a mix of exact 0/1 and fractional targets
    if x_shape is not None:
        x = x.reshape(x_shape)
    mu = torch.randn(batch, latents, generator=g, dtype=torch.float64)
    logvar = torch.randn(batch, latents, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (recon, x, mu, logvar)]


def loss_and_grads(fn, inputs, grad_output=None, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves, **kwargs)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), [t.grad for t in leaves]


def assert_parity(inputs, dtype, grad_output=None, **kwargs):
    loss, grads = loss_and_grads(vae_fast.vae_loss, inputs, grad_output, **kwargs)
    ref_inputs = [t.double() for t in inputs]
    ref_go = None if grad_output is None else grad_output.double()
    ref_loss, ref_grads = loss_and_grads(reference.vae_loss, ref_inputs, ref_go, **kwargs)
    assert relative_error(loss, ref_loss) <= loss_tolerance(dtype)
    for name, g, rg in zip(("recon", "x", "mu", "logvar"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape, name
        assert relative_error(g, rg) <= gradient_tolerance(dtype), name


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
def test_float32_matches_float64_reference(size, reduction, logits):
    inputs = sample_inputs(*size, logits=logits)
    assert_parity(inputs, torch.float32, logits=logits, reduction=reduction, beta=0.7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_other_dtypes_match_reference(dtype, logits, reduction):
    inputs = sample_inputs(65, 300, 20, logits=logits, dtype=dtype)
    loss = vae_fast.vae_loss(*inputs, logits=logits, reduction=reduction)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_parity(inputs, dtype, logits=logits, reduction=reduction, beta=2.5)


def test_large_batch_matches_reference():
    inputs = sample_inputs(4096, 784, 20, logits=True, seed=3)
    assert_parity(inputs, torch.float32, logits=True)
    inputs = sample_inputs(4096, 784, 20, logits=False, seed=4)
    assert_parity(inputs, torch.float32, logits=False)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_output_scales_gradients(reduction):
    inputs = sample_inputs(9, 40, 4, logits=True)
    shape = (9,) if reduction == "none" else ()
    grad_output = torch.randn(shape, dtype=torch.float32)
    assert_parity(inputs, torch.float32, grad_output=grad_output, logits=True, reduction=reduction)


@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(logits, reduction):
    inputs = sample_inputs(3, 11, 4, logits=logits, dtype=torch.float64)
    inputs[1] = inputs[1].clamp(0.05, 0.95)  # finite differences must stay inside [0, 1]
    inputs = [t.requires_grad_() for t in inputs]
    fn = lambda r, x, mu, lv: vae_fast.vae_loss(r, x, mu, lv, logits=logits, reduction=reduction, beta=0.6)
    assert torch.autograd.gradcheck(fn, inputs)


def test_opcheck():
    for logits, reduction, mask in itertools.product([False, True], REDUCTIONS, [(True, False, True, True), (False,) * 4, (True,) * 4]):
        inputs = sample_inputs(5, 12, 3, logits=logits)
        inputs = [t.requires_grad_(m) for t, m in zip(inputs, mask)]
        torch.library.opcheck(torch.ops.vae_fast.vae_loss.default, (*inputs, None, None, "bernoulli", logits, 0.0, 0.5, reduction, [*mask, False, False]))


def test_x_may_have_another_shape_than_recon():
    recon, x, mu, logvar = sample_inputs(6, 784, 20, logits=False)
    images = x.reshape(6, 1, 28, 28).requires_grad_()
    loss = vae_fast.vae_loss(recon, images, mu, logvar)
    loss.backward()
    expected = reference.vae_loss(recon.double(), x.double(), mu.double(), logvar.double())
    assert relative_error(loss, expected) <= 1e-5
    assert images.grad.shape == (6, 1, 28, 28)


def test_loss_function_is_the_examples_loss():
    recon, x, mu, logvar = sample_inputs(8, 784, 20, logits=False)
    images = x.reshape(8, 1, 28, 28)
    expected = F.binary_cross_entropy(recon, images.view(-1, 784), reduction="sum") - 0.5 * torch.sum(
        1 + logvar - mu.pow(2) - logvar.exp()
    )
    assert relative_error(vae_fast.loss_function(recon, images, mu, logvar), expected) <= 1e-5


def test_no_grad_gives_the_same_loss():
    inputs = sample_inputs(33, 100, 8, logits=True)
    with torch.no_grad():
        a = vae_fast.vae_loss(*inputs, logits=True)
    b = vae_fast.vae_loss(*[t.requires_grad_() for t in inputs], logits=True)
    assert torch.equal(a, b.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
def test_same_bits_on_every_run_and_thread_count(dtype, logits):
    """Rows of 10,000 features span three 4096-feature blocks, and 64 rows split over 1, 2, 3, 5 and
    8 threads cut the blocks differently each time: the loss (every reduction) and every gradient
    must keep their bits."""
    inputs = sample_inputs(64, 10000, 32, logits=logits, dtype=dtype, seed=7)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5, 8, 1):
            torch.set_num_threads(n)
            results.append([loss_and_grads(vae_fast.vae_loss, inputs, logits=logits, reduction=r) for r in REDUCTIONS])
    finally:
        torch.set_num_threads(threads)
    for run in results[1:]:
        for (loss, grads), (first_loss, first_grads) in zip(run, results[0]):
            assert torch.equal(loss, first_loss)
            assert all(torch.equal(a, b) for a, b in zip(grads, first_grads))


def test_non_contiguous_inputs():
    recon, x, mu, logvar = sample_inputs(40, 30, 6, logits=True)
    args = [recon.t().contiguous().t(), x[:, ::1].t().contiguous().t(), mu.t().contiguous().t(), logvar]
    assert not args[0].is_contiguous()
    assert_parity(args, torch.float32, logits=True, reduction="none")
    strided = sample_inputs(40, 60, 6, logits=False)
    strided = [strided[0][:, ::2], strided[1][:, ::2], strided[2], strided[3]]
    assert_parity(strided, torch.float32, logits=False)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    inputs = [t.requires_grad_() for t in sample_inputs(0, 10, 3, logits=True)]
    loss = vae_fast.vae_loss(*inputs, logits=True, reduction=reduction)
    if reduction == "sum":
        assert loss.item() == 0.0
    elif reduction == "mean":
        assert torch.isnan(loss)  # the mean of nothing, as torch.mean
    else:
        assert loss.shape == (0,)
    loss.sum().backward()
    assert inputs[0].grad.shape == (0, 10)


@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("where", ["recon", "x", "mu", "logvar"])
def test_nan_propagates(logits, where):
    inputs = sample_inputs(4, 16, 3, logits=logits)
    index = ["recon", "x", "mu", "logvar"].index(where)
    inputs[index][2, 1] = float("nan")
    loss = vae_fast.vae_loss(*inputs, logits=logits, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    assert torch.isnan(vae_fast.vae_loss(*inputs, logits=logits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_huge_logvar_gives_inf_not_nan(dtype):
    recon, x, mu, logvar = sample_inputs(3, 8, 2, logits=True, dtype=dtype)
    logvar[1, 0] = 1e4 if dtype != torch.float16 else 6e4
    loss = vae_fast.vae_loss(recon, x, mu, logvar, logits=True, reduction="none")
    assert loss[1] == float("inf") and torch.isfinite(loss[[0, 2]]).all()


def test_saturated_logits_are_exact():
    # |r| up to 100: the naive sigmoid(r) - x gradient loses all digits here in float32.
    g = torch.Generator().manual_seed(1)
    r = torch.randn(64, 500, generator=g).sign() * torch.empty(64, 500).uniform_(10, 100, generator=g)
    for x in ((r > 0).float(), (r < 0).float()):
        inputs = [r, x, torch.zeros(64, 2), torch.zeros(64, 2)]
        assert_parity(inputs, torch.float32, logits=True, reduction="none")
        # Element by element: the tiny gradients (sigmoid(-|r|) down to ~1e-38) are the claim here, and
        # a norm is dominated by the large ones. The oracle is the hand-derived gradient
        # (1 - x) sigmoid(r) - x sigmoid(-r) in float64: autograd through the float64 reference
        # computes sigmoid(r) - x, which itself cancels (r = 36.7, x = 1: -2.2e-16 for -1.1e-16).
        loss, grads = loss_and_grads(vae_fast.vae_loss, inputs, logits=True, reduction="none")
        ref_loss = reference.vae_loss(*[t.double() for t in inputs], logits=True, reduction="none")
        rd, xd = r.double(), x.double()
        assert max_elementwise_relative_error(loss, ref_loss) <= 1e-5
        assert max_elementwise_relative_error(grads[0], (1 - xd) * torch.sigmoid(rd) - xd * torch.sigmoid(-rd)) <= 1e-5
        assert torch.equal(grads[1], -r)


def test_probabilities_at_the_clamp_match_torch():
    p = torch.tensor([[0.0, 1.0, 1e-30, 1 - 1e-7, 0.5]])
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.5]])
    zero = torch.zeros(1, 1)
    expected = F.binary_cross_entropy(p, x, reduction="sum")
    assert relative_error(vae_fast.vae_loss(p, x, zero, zero), expected) <= 1e-6
    p_leaf = p.clone().requires_grad_()
    vae_fast.vae_loss(p_leaf, x, zero, zero).backward()
    p_ref = p.clone().requires_grad_()
    F.binary_cross_entropy(p_ref, x, reduction="sum").backward()
    assert relative_error(p_leaf.grad, p_ref.grad) <= 1e-6


def test_autocast_keeps_the_loss_in_float32():
    recon, x, mu, logvar = sample_inputs(16, 64, 4, logits=False)
    layer = torch.nn.Linear(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = torch.sigmoid(layer(recon))  # bf16 under autocast
        loss = vae_fast.vae_loss(probs, x, mu, logvar)
    assert probs.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_beta_weights_the_kl_term():
    recon, x, mu, logvar = sample_inputs(5, 20, 3, logits=True)
    zero_beta = vae_fast.vae_loss(recon, x, mu, logvar, logits=True, beta=0.0)
    rec = reference.reconstruction_loss(recon, x, logits=True).sum()
    kl = reference.kl_divergence(mu, logvar).sum()
    assert relative_error(zero_beta, rec) <= 1e-6
    assert relative_error(vae_fast.vae_loss(recon, x, mu, logvar, logits=True, beta=4.0), rec + 4 * kl) <= 1e-6


def test_double_backward_is_refused():
    inputs = [t.requires_grad_() for t in sample_inputs(3, 5, 2, logits=True)]
    loss = vae_fast.vae_loss(*inputs, logits=True)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(loss, inputs[0], create_graph=True)


def test_torch_compile_fullgraph():
    inputs = sample_inputs(32, 100, 8, logits=True)

    def step(recon, x, mu, logvar):
        return vae_fast.vae_loss(recon, x, mu, logvar, logits=True, beta=0.5, reduction="mean")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected_loss, expected_grads = loss_and_grads(step, inputs)
    loss, grads = loss_and_grads(compiled, inputs)
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    with torch.no_grad():
        assert torch.equal(compiled(*inputs), expected_loss)


def test_torch_compile_inductor():
    inputs = sample_inputs(16, 50, 4, logits=False)
    compiled = torch.compile(lambda *a: vae_fast.vae_loss(*a) * 2.0, fullgraph=True)
    loss, grads = loss_and_grads(compiled, inputs)
    ref_loss, ref_grads = loss_and_grads(lambda *a: reference.vae_loss(*a) * 2.0, [t.double() for t in inputs])
    assert relative_error(loss, ref_loss) <= 1e-5
    assert all(relative_error(a, b) <= 1e-5 for a, b in zip(grads, ref_grads))


def test_portable_cpu_path_matches_reference():
    """The kernels built for CPUs without AVX2 (forced with VAE_FAST_CPU_ISA=generic)."""
    script = (
        "import torch, vae_fast, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_vae_loss import sample_inputs, assert_parity\n"
        "assert vae_fast.backend_info()['extension']['cpu_isa'] == 'generic'\n"
        "for logits in (False, True):\n"
        "    for dtype in (torch.float32, torch.bfloat16):\n"
        "        assert_parity(sample_inputs(33, 257, 20, logits=logits, dtype=dtype), dtype, logits=logits, reduction='none')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, VAE_FAST_CPU_ISA="generic")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# ---- bad input: each error names the argument and the problem ----

def _good():
    return sample_inputs(4, 10, 3, logits=False)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.__setitem__(1, a[1][:, :9]), ValueError, "recon has 10 elements per sample but x has 9"),
        (lambda a: a.__setitem__(1, a[1][:3]), ValueError, "x must have batch size 4"),
        (lambda a: a.__setitem__(2, a[2][:3]), ValueError, "mu must have batch size 4"),
        (lambda a: a.__setitem__(3, a[3][:, :2]), ValueError, "mu and logvar must have the same shape"),
        (lambda a: a.__setitem__(1, (a[1] > 0.5).long()), TypeError, "x must be a floating-point tensor"),
        (lambda a: a.__setitem__(0, a[0].tolist()), TypeError, "recon must be a torch.Tensor"),
        (lambda a: a.__setitem__(2, None), TypeError, "mu must be a torch.Tensor"),
        (lambda a: a.__setitem__(0, torch.tensor(0.5)), ValueError, "recon must have a batch dimension"),
        (lambda a: a[0].__setitem__((1, 1), 1.5), ValueError, "recon must hold probabilities in \\[0, 1\\]"),
        (lambda a: a[0].__setitem__((1, 1), -0.1), ValueError, "recon must hold probabilities in \\[0, 1\\]"),
        (lambda a: a[1].__setitem__((0, 0), 2.0), ValueError, "x \\(the target\\) must lie in \\[0, 1\\]"),
    ],
)
def test_bad_tensors(mutate, error, match):
    args = _good()
    mutate(args)
    with pytest.raises(error, match=match):
        vae_fast.vae_loss(*args)


def test_target_out_of_range_is_refused_with_logits_too():
    args = sample_inputs(4, 10, 3, logits=True)
    args[1][3, 3] = -1.0
    with pytest.raises(ValueError, match="x \\(the target\\)"):
        vae_fast.vae_loss(*args, logits=True)


def test_bad_options():
    args = _good()
    with pytest.raises(ValueError, match="reduction must be one of"):
        vae_fast.vae_loss(*args, reduction="avg")
    with pytest.raises(ValueError, match="beta must be a non-negative number, got -1"):
        vae_fast.vae_loss(*args, beta=-1.0)
    with pytest.raises(ValueError, match="beta must be a non-negative number, got nan"):
        vae_fast.vae_loss(*args, beta=float("nan"))
    with pytest.raises(TypeError, match="beta must be a real number"):
        vae_fast.vae_loss(*args, beta="1")


def test_op_checks_its_arguments_too():
    recon, x, mu, logvar = _good()
    with pytest.raises(ValueError, match="reduction must be 'sum', 'mean' or 'none'"):
        torch.ops.vae_fast.vae_loss(recon, x, mu, logvar, None, None, "bernoulli", False, 0.0, 1.0, "avg", [False] * 6)
    with pytest.raises(TypeError, match="x has dtype"):
        torch.ops.vae_fast.vae_loss(recon, x.double(), mu, logvar, None, None, "bernoulli", False, 0.0, 1.0, "sum", [False] * 6)
    with pytest.raises(ValueError, match="beta must be a non-negative number"):
        torch.ops.vae_fast.vae_loss(recon, x, mu, logvar, None, None, "bernoulli", False, 0.0, -2.0, "sum", [False] * 6)


def test_mixed_dtypes_are_promoted():
    recon, x, mu, logvar = _good()
    loss = vae_fast.vae_loss(recon.bfloat16(), x, mu.bfloat16(), logvar.bfloat16())
    expected = reference.vae_loss(recon.bfloat16().double(), x.double(), mu.bfloat16().double(), logvar.bfloat16().double())
    assert relative_error(loss, expected) <= 1e-5


def reference_grads(inputs, factor, **kwargs):
    """d (factor * loss) / d input for each input, from the pure-torch reference in float64."""
    _, grads = loss_and_grads(reference.vae_loss, [t.double().cpu() for t in inputs], torch.tensor(float(factor),
                              dtype=torch.float64), **kwargs)
    return grads


def assert_close_to(grads, expected, dtype=torch.float32):
    for name, g, e in zip(("recon", "x", "mu", "logvar"), grads, expected):
        assert relative_error(g.cpu(), e) <= gradient_tolerance(dtype), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # the two ways of scaling
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("factors", [(1.0, 2.0), (3.0, 0.5), (0.0, 1.0)], ids=str)
def test_a_gradient_handed_out_never_changes_again(device, dtype, reduction, factors):
    """Issue 18, item 1: a backward through a retained graph must not rewrite a gradient an earlier
    backward returned (it used to scale the saved tensor, which the first backward had handed out,
    in place: `loss` then `2 * loss` doubled the first gradient), and it must not be refused."""
    inputs = [t.requires_grad_() for t in sample_inputs(5, 12, 3, logits=True, dtype=dtype, device=device, seed=6)]
    loss = vae_fast.vae_loss(*inputs, logits=True, reduction=reduction)
    first = torch.autograd.grad(factors[0] * loss, inputs, retain_graph=True)
    kept = [g.clone() for g in first]
    second = torch.autograd.grad(factors[1] * loss, inputs)
    for g, k in zip(first, kept):
        assert torch.equal(g, k)
    assert_close_to(first, reference_grads(inputs, factors[0], logits=True, reduction=reduction), dtype)
    assert_close_to(second, reference_grads(inputs, factors[1], logits=True, reduction=reduction), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_a_gradient_a_hook_kept_never_changes_again(device):
    """The same through a tensor hook that stashes the gradient, with loss.backward()."""
    inputs = [t.requires_grad_() for t in sample_inputs(5, 12, 3, logits=True, device=device, seed=7)]
    stash = []
    inputs[0].register_hook(stash.append)
    loss = vae_fast.vae_loss(*inputs, logits=True)
    loss.backward(retain_graph=True)
    kept = stash[0].clone()
    (loss * 3.0).backward(retain_graph=True)
    loss.backward(torch.tensor(-0.5, device=device))
    assert torch.equal(stash[0], kept)
    expected = [reference_grads(inputs, f, logits=True)[0] for f in (1.0, 3.0, -0.5)]
    for got, e in zip(stash, expected):
        assert relative_error(got.cpu(), e) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seeds", [(2.0, 1.0), (1.0, 2.0)], ids=str)
def test_repeated_backward_reads_its_own_grad_output(device, seeds):
    """Issue 18, item 2: the node kept the caller's grad_output tensor to check a later backward, so
    `seed.fill_(1)` after a backward with 2 made the next backward return the first gradient again
    (expected half), and the reverse order raised a false error. Each backward scales by the value
    its grad_output has when it runs."""
    inputs = [t.requires_grad_() for t in sample_inputs(4, 9, 2, logits=True, device=device, seed=8)]
    loss = vae_fast.vae_loss(*inputs, logits=True)
    seed = torch.tensor(seeds[0], device=device)
    loss.backward(seed, retain_graph=True)
    first = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    seed.fill_(seeds[1])
    loss.backward(seed)
    assert_close_to(first, reference_grads(inputs, seeds[0], logits=True))
    assert_close_to([t.grad for t in inputs], reference_grads(inputs, seeds[1], logits=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_repeated_backward_accumulates_exactly(device, reduction):
    """Every backward through a retained graph (gradcheck runs several) gives the gradient of the
    first, times its own grad_output: the same bits for 1, exact halves for 0.5."""
    inputs = sample_inputs(4, 9, 3, logits=True, device=device, seed=3)
    _, once = loss_and_grads(vae_fast.vae_loss, inputs, logits=True, reduction=reduction)
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = vae_fast.vae_loss(*leaves, logits=True, reduction=reduction)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    for leaf, g in zip(leaves, once):
        assert torch.equal(leaf.grad, 2 * g)
    loss.backward(torch.tensor(0.5, device=device), retain_graph=True)
    loss.backward()
    for leaf, g in zip(leaves, once):
        assert torch.equal(leaf.grad, 2.5 * g + g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_scales_low_precision_gradients_in_float(dtype):
    """(loss * c).backward() must give the float gradient times c (c in float, as the loss is),
    rounded once to the dtype: rounding the gradient first and scaling after rounds twice (and
    overflows float16 above 65504), rounding c to the gradient's dtype first (1.3 -> 1.296875 in
    bfloat16, 1.001 -> 1 in bfloat16) would scale by another number, or not at all. The float
    gradient comes from the float32 kernel on the same (exactly widened) values."""
    inputs = sample_inputs(16, 40, 6, logits=True, dtype=dtype, seed=4)
    _, float_grads = loss_and_grads(vae_fast.vae_loss, [t.float() for t in inputs], logits=True)
    for factor in (1.3, 1.001, -0.7, 2.0**-12):
        _, grads = loss_and_grads(vae_fast.vae_loss, inputs, torch.tensor(factor), logits=True)
        for got, g in zip(grads, float_grads):
            expected = (g * torch.tensor(factor, dtype=torch.float32)).to(dtype)
            assert torch.equal(got, expected), (factor, (got.double() - expected.double()).abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_scale_by_grad_output_op(device, dtype):
    """One call scales every tensor of the list (empty ones included), in float, and bumps each
    tensor's version once, so autograd sees the change (CUDA writes through a raw pointer)."""
    op = torch.ops.vae_fast.scale_by_grad_output_
    grads = [torch.randn(shape, device=device, dtype=dtype) for shape in [(4, 5), (0,), (3,), (70000,)]]
    factor_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for value in (1.0, -2.5, 1.001):
        factor = torch.tensor(value, device=device, dtype=factor_dtype)
        torch.library.opcheck(op.default, ([g.clone() for g in grads], factor))
        scaled = [g.clone() for g in grads]
        versions = [g._version for g in scaled]
        op(scaled, factor)
        for before, after, version in zip(grads, scaled, versions):
            assert after._version == version + 1
            assert torch.equal(after, (before.to(factor_dtype) * value).to(dtype))


def test_scale_by_grad_output_op_checks_its_arguments():
    op = torch.ops.vae_fast.scale_by_grad_output_
    with pytest.raises(ValueError, match="grad_output must have one element"):
        op([torch.ones(3)], torch.ones(2))
    with pytest.raises(TypeError, match="must share one"):
        op([torch.ones(3), torch.ones(3, dtype=torch.float64)], torch.tensor(2.0))
    with pytest.raises(ValueError, match="contiguous"):
        op([torch.ones(3, 4).t()], torch.tensor(2.0))


def _grads_op_args(inputs, grad_output, keep_if_one, grads, reduction="sum"):
    return (*inputs, None, None, "bernoulli", True, 0.0, 0.7, reduction, [True] * 4 + [False, False], grad_output, keep_if_one, grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_vae_loss_grads_op(device, dtype, reduction):
    """The op writes every wanted gradient times grad_output into the given tensors, leaves them
    alone for grad_output 1 with keep_if_one, and bumps each tensor's version once, so autograd sees
    the change (the kernels write through raw pointers)."""
    op = torch.ops.vae_fast.vae_loss_grads_
    inputs = sample_inputs(6, 70, 3, logits=True, dtype=dtype, device=device, seed=5)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for value, keep_if_one in itertools.product((1.0, -2.5, 1.001), (True, False)):
        factor = torch.tensor(value, device=device, dtype=loss_dtype)
        sentinel = [torch.full(t.shape, 7.0, device=device, dtype=dtype) for t in inputs] + [torch.empty(0, device=device)] * 2
        torch.library.opcheck(op.default, _grads_op_args(inputs, factor, keep_if_one, [g.clone() for g in sentinel],
                                                         reduction))
        grads = [g.clone() for g in sentinel]
        versions = [g._version for g in grads]
        op(*_grads_op_args(inputs, factor, keep_if_one, grads, reduction))
        assert [g._version for g in grads] == [v + 1 for v in versions]
        if keep_if_one and value == 1.0:
            assert all(torch.equal(g, s) for g, s in zip(grads, sentinel))
        else:
            expected = reference_grads(inputs, value, logits=True, beta=0.7, reduction=reduction)
            assert_close_to(grads, expected, dtype)


def test_vae_loss_grads_op_checks_its_arguments():
    op = torch.ops.vae_fast.vae_loss_grads_
    inputs = sample_inputs(3, 4, 2, logits=True)
    grads = [torch.empty_like(t) for t in inputs] + [torch.empty(0)] * 2
    with pytest.raises(ValueError, match="grad_output must have one element"):
        op(*_grads_op_args(inputs, torch.ones(2), False, grads))
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean', got 'none'"):
        op(*_grads_op_args(inputs, torch.tensor(2.0), False, grads, reduction="none"))
    with pytest.raises(ValueError, match=r"grads must hold 6 tensors"):
        op(*_grads_op_args(inputs, torch.tensor(2.0), False, grads[:5]))
    with pytest.raises(ValueError, match=r"grads\[2\] must be contiguous, of shape \[3, 2\]"):
        op(*_grads_op_args(inputs, torch.tensor(2.0), False, grads[:2] + [torch.empty(2, 3).t()] + grads[3:]))


@pytest.mark.parametrize("case", ["tiny", "near_one", "denormal"])
def test_extreme_probabilities(case):
    # exercises the inline AVX2 log/log1p over the whole float range, denormals included
    g = torch.Generator().manual_seed(2)
    if case == "tiny":
        p = torch.exp(-torch.empty(64, 700).uniform_(0, 80, generator=g))
    elif case == "near_one":
        p = 1 - torch.exp(-torch.empty(64, 700).uniform_(0, 16, generator=g))
    else:
        p = torch.empty(64, 700).uniform_(1e-44, 1e-38, generator=g)
    for x in (torch.zeros_like(p), torch.ones_like(p), torch.rand(p.shape, generator=g)):
        inputs = [p, x, torch.zeros(64, 2), torch.zeros(64, 2)]
        loss, grads = loss_and_grads(vae_fast.vae_loss, inputs, reduction="none")
        ref_loss, ref_grads = loss_and_grads(reference.vae_loss, [t.double() for t in inputs], reduction="none")
        assert max_elementwise_relative_error(loss, ref_loss) <= 1e-5
        assert max_elementwise_relative_error(grads[0], ref_grads[0]) <= 1e-5
