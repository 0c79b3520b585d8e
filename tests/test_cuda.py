"""The CUDA kernels. The registration test runs wherever the extension was built with CUDA (CI
builds it without a GPU); the others need a GPU and skip without one."""

import pytest
import torch

import vae_fast
from vae_fast import _extension, reference
from conftest import TOLERANCE, gradient_tolerance, relative_error, requires_cuda, stream_mismatch_is_an_error
from test_vae_loss import REDUCTIONS, assert_parity, loss_and_grads, sample_inputs

OPS = ("vae_loss", "reparameterize", "reparameterize_sample", "reparameterize_backward", "reparameterize_noise",
       "scale_by_grad_output_", "vae_loss_grads_")


@pytest.mark.skipif(not _extension.cuda_kernels_compiled(), reason="extension built without CUDA kernels")
def test_every_op_has_a_cuda_kernel():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vae_fast::{op}", "CUDA"), op


def test_every_op_has_a_cpu_kernel():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vae_fast::{op}", "CPU"), op


@requires_cuda
@pytest.mark.parametrize("size", [(1, 1, 1), (7, 33, 5), (33, 257, 20), (257, 1000, 64), (1000, 7, 3), (3, 5000, 2), (4096, 784, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_matches_reference_on_cuda(size, dtype, logits, reduction):
    inputs = sample_inputs(*size, logits=logits, dtype=dtype, device="cuda")
    assert_parity(inputs, dtype, logits=logits, reduction=reduction, beta=0.7)


@requires_cuda
def test_loss_unaligned_and_non_contiguous_on_cuda():
    recon, x, mu, logvar = sample_inputs(9, 33, 5, logits=True, device="cuda")  # 33 features: scalar path
    assert_parity([recon, x, mu, logvar], torch.float32, logits=True)
    big = sample_inputs(9, 65, 5, logits=True, device="cuda")
    shifted = [big[0][:, 1:], big[1][:, 1:], big[2], big[3]]  # misaligned, non-contiguous views
    assert_parity(shifted, torch.float32, logits=True, reduction="none")


@requires_cuda
@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
def test_gradcheck_float64_cuda(logits):
    inputs = sample_inputs(3, 11, 4, logits=logits, dtype=torch.float64, device="cuda")
    inputs[1] = inputs[1].clamp(0.05, 0.95)
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: vae_fast.vae_loss(*a, logits=logits, reduction="none"), inputs)
    mu, logvar = (torch.randn(5, 3, dtype=torch.float64, device="cuda", requires_grad=True) for _ in range(2))
    fn = lambda m, l: vae_fast.reparameterize(m, l, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.autograd.gradcheck(fn, (mu, logvar))


@requires_cuda
def test_opcheck_cuda():
    inputs = [t.requires_grad_() for t in sample_inputs(5, 12, 3, logits=True, device="cuda")]
    torch.library.opcheck(torch.ops.vae_fast.vae_loss.default, (*inputs, None, None, "bernoulli", True, 0.0, 0.5, "mean", [True] * 4 + [False, False]))
    mu = torch.randn(6, 5, device="cuda", requires_grad=True)
    logvar = torch.full((6, 5), -float("inf"), device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.vae_fast.reparameterize.default, (mu, logvar, None))
    _, state = torch.ops.vae_fast.reparameterize_sample(torch.randn(4, 3, device="cuda"), torch.randn(4, 3, device="cuda"))
    assert state.device.type == "cuda" and state.dtype == torch.int64 and state.shape == (2,)
    # an internal op without autograd of its own (the Autograd kernel of reparameterize calls it)
    torch.library.opcheck(torch.ops.vae_fast.reparameterize_sample.default, (mu.detach(), logvar.detach(), None))
    args = (torch.randn(4, 3, device="cuda"), torch.randn(4, 3, device="cuda"), state)
    torch.library.opcheck(torch.ops.vae_fast.reparameterize_backward.default, args)
    torch.library.opcheck(torch.ops.vae_fast.reparameterize_noise.default, (args[1], state))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_is_bitwise_deterministic_on_cuda(dtype):
    inputs = sample_inputs(8192, 784, 64, logits=True, dtype=dtype, device="cuda", seed=2)
    first_loss, first_grads = loss_and_grads(vae_fast.vae_loss, inputs, logits=True)
    for _ in range(3):
        loss, grads = loss_and_grads(vae_fast.vae_loss, inputs, logits=True)
        assert torch.equal(loss, first_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, first_grads))


@requires_cuda
def test_reparameterize_on_cuda():
    mu = torch.randn(1000, 64, device="cuda")
    logvar = torch.randn(1000, 64, device="cuda")
    torch.manual_seed(3)
    a = vae_fast.reparameterize(mu, logvar)
    torch.manual_seed(3)
    assert torch.equal(vae_fast.reparameterize(mu, logvar), a)
    eps = ((a.double() - mu.double()) / torch.exp(0.5 * logvar.double())).flatten()
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        m = torch.randn(7, 33, device="cuda", dtype=dtype, requires_grad=True)
        l = torch.randn(7, 33, device="cuda", dtype=dtype, requires_grad=True)
        z = vae_fast.reparameterize(m, l)
        z.backward(torch.ones_like(z))
        assert z.dtype == dtype and torch.isfinite(z).all() and torch.equal(m.grad, torch.ones_like(m))
    odd = vae_fast.reparameterize(torch.zeros(1001, device="cuda")[1:], torch.zeros(1001, device="cuda")[1:])
    assert odd.shape == (1000,) and torch.isfinite(odd).all()


@requires_cuda
def test_cuda_graph_capture_and_replay():
    mu = torch.randn(256, 64, device="cuda")
    logvar = torch.randn(256, 64, device="cuda")
    recon, x, _, _ = sample_inputs(256, 784, 64, logits=True, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        vae_fast.reparameterize(mu, logvar)
        torch.ops.vae_fast.vae_loss(recon, x, mu, logvar, None, None, "bernoulli", True, 0.0, 1.0, "sum", [True, False, True, True, False, False])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = vae_fast.reparameterize(mu, logvar)
        loss, grad_recon, _, _, _, _, _ = torch.ops.vae_fast.vae_loss(recon, x, mu, logvar, None, None, "bernoulli", True, 0.0, 1.0, "sum", [True, False, True, True, False, False])
    graph.replay()
    first = z.clone()
    graph.replay()
    assert not torch.equal(z, first)  # each replay draws new noise (the Philox offset advances)
    expected = reference.vae_loss(recon.double(), x.double(), mu.double(), logvar.double(), logits=True)
    assert relative_error(loss, expected) <= TOLERANCE[torch.float32]
    # The replayed kernels are the eager ones, deterministic: the same bits, gradients included.
    eager = torch.ops.vae_fast.vae_loss(recon, x, mu, logvar, None, None, "bernoulli", True, 0.0, 1.0, "sum", [True, False, True, True, False, False])
    assert torch.equal(loss, eager[0]) and torch.equal(grad_recon, eager[1])
    _, _, _, grad_mu, grad_logvar, _, _ = (t for t in eager)
    ref = [t.double().requires_grad_() for t in (recon, x, mu, logvar)]
    reference.vae_loss(*ref, logits=True).backward()
    assert relative_error(grad_recon, ref[0].grad) <= TOLERANCE[torch.float32]
    assert relative_error(grad_mu, ref[2].grad) <= TOLERANCE[torch.float32]
    assert relative_error(grad_logvar, ref[3].grad) <= TOLERANCE[torch.float32]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # scaled, or computed again
def test_graph_replay_gives_eager_gradients_through_autograd(dtype):
    """A captured forward+backward through autograd, with grad_output != 1 so the device-side
    scaling runs too, replays to the bits of the same step run eagerly."""
    inputs = sample_inputs(128, 784, 20, logits=True, dtype=dtype, device="cuda", seed=5)
    leaves = [t.clone().requires_grad_() for t in inputs]

    def step():
        loss = vae_fast.vae_loss(*leaves, logits=True, beta=0.5) * 2.5
        loss.backward()
        # Detached: the captured loss, kept, would keep its graph and so the leaves' AccumulateGrad
        # nodes made on the capture stream, which the eager step below would run into (issue 18).
        return loss.detach()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for leaf in leaves:  # backward accumulates in place into these, inside the graph's memory
            leaf.grad = torch.zeros_like(leaf)
        loss = step()
    graph.replay()
    graph.replay()  # replays do not accumulate: the zeroing is captured too
    replayed_loss, replayed = loss.clone(), [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    with stream_mismatch_is_an_error():
        eager_loss = step()
    assert torch.equal(replayed_loss, eager_loss)
    for got, leaf in zip(replayed, leaves):
        assert torch.equal(got, leaf.grad)
    ref = [t.double().requires_grad_() for t in inputs]
    (reference.vae_loss(*ref, logits=True, beta=0.5) * 2.5).backward()
    for got, want in zip(replayed, ref):
        assert relative_error(got, want.grad) <= gradient_tolerance(dtype)


@requires_cuda
def test_captured_reparameterize_backward_follows_each_replays_noise():
    """The backward reads (seed, offset) from the device tensor the forward kernel wrote, so in a
    CUDA graph each replay's gradient belongs to that replay's fresh eps (mu = 0, logvar = 0: z is
    eps, and d z / d logvar = 0.5 * g * eps)."""
    mu = torch.zeros(4099, device="cuda", requires_grad=True)
    logvar = torch.zeros(4099, device="cuda", requires_grad=True)
    g = torch.rand(4099, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) + 0.5

    def step():
        z = vae_fast.reparameterize(mu, logvar)
        (grad_logvar,) = torch.autograd.grad(z, (logvar,), g)
        return z, grad_logvar

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with stream_mismatch_is_an_error():
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            z, grad_logvar = step()
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(grad_logvar, 0.5 * g * z, rtol=1e-6, atol=0)
        seen.append(z.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


@requires_cuda
def test_torch_compile_fullgraph_cuda():
    inputs = sample_inputs(64, 784, 20, logits=True, device="cuda")

    def step(recon, x, mu, logvar):
        z = vae_fast.reparameterize(mu, logvar)
        return vae_fast.vae_loss(recon, x, mu, logvar, logits=True) + z.sum() * 0

    compiled = torch.compile(step, fullgraph=True)
    loss, grads = loss_and_grads(compiled, inputs)
    ref_loss, _ = loss_and_grads(reference.vae_loss, [t.double() for t in inputs], logits=True)
    assert relative_error(loss, ref_loss) <= 1e-5


@requires_cuda
@pytest.mark.parametrize("features", [10, 64], ids=["elements", "packs"])
def test_out_of_domain_inputs_give_nan_on_cuda(features):
    """No data-dependent check on CUDA (it would sync the stream): such samples' losses are NaN, and
    so are the gradients of the out-of-domain elements (p = 1.5 once gave ~1.5e12: an optimizer step
    would have moved on it), while every other element's gradient stays finite."""
    recon, x, mu, logvar = sample_inputs(4, features, 3, logits=False, device="cuda")
    recon[1, 2] = 1.5
    x[2, 3] = -0.5
    loss = vae_fast.vae_loss(recon, x, mu, logvar, reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]) and torch.isfinite(loss[[0, 3]]).all()
    _, grads = loss_and_grads(vae_fast.vae_loss, [recon, x, mu, logvar], reduction="none")
    bad = torch.zeros_like(recon, dtype=torch.bool)
    bad[1, 2] = bad[2, 3] = True
    for grad in grads[:2]:  # recon and x
        assert torch.isnan(grad[bad]).all() and torch.isfinite(grad[~bad]).all()
    assert all(torch.isfinite(g).all() for g in grads[2:])  # the KL term's inputs were in its domain


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("features", [64, 784], ids=str)
def test_misaligned_views_give_the_bits_of_aligned_copies(dtype, features):
    """A contiguous view one element past a 16-byte boundary must walk the row like an aligned copy
    (same sums, same bits), for the loss and for reparameterize under one seed."""
    def misaligned(t):
        flat = torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view

    inputs = sample_inputs(9, features, 64, logits=True, dtype=dtype, device="cuda", seed=6)
    shifted = [misaligned(t) for t in inputs]
    for reduction in REDUCTIONS:
        loss, grads = loss_and_grads(vae_fast.vae_loss, inputs, logits=True, reduction=reduction)
        loss_s, grads_s = loss_and_grads(vae_fast.vae_loss, shifted, logits=True, reduction=reduction)
        assert torch.equal(loss, loss_s), reduction
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_s)), reduction
    mu, logvar = inputs[2], inputs[3]
    z = vae_fast.reparameterize(mu, logvar, generator=torch.Generator("cuda").manual_seed(4))
    z_s = vae_fast.reparameterize(misaligned(mu), misaligned(logvar), generator=torch.Generator("cuda").manual_seed(4))
    assert torch.equal(z, z_s)


@requires_cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_output_scales_gradients_on_cuda(reduction, dtype):
    """backward with grad_output != 1 (scaled losses, GradScaler): the device-side scaling."""
    inputs = sample_inputs(33, 784, 16, logits=True, dtype=dtype, device="cuda", seed=8)
    shape = (33,) if reduction == "none" else ()
    grad_output = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    assert_parity(inputs, dtype, grad_output=grad_output, logits=True, reduction=reduction)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # scaled, or computed again
def test_forward_and_backward_never_sync_the_host(dtype):
    """The README promises no device-to-host sync in the ops: torch raises under "error" mode if one does."""
    inputs = [t.requires_grad_() for t in sample_inputs(64, 784, 20, logits=True, dtype=dtype, device="cuda")]
    generator = torch.Generator("cuda").manual_seed(0)
    for reduction in REDUCTIONS:
        for factor in (1.0, 2.5):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                z = vae_fast.reparameterize(inputs[2], inputs[3], generator=generator)
                loss = vae_fast.vae_loss(*inputs, logits=True, reduction=reduction) * factor
                (loss.sum() + z.sum()).backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(t.grad).all() for t in inputs)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_on_cuda_gives_the_loss_of_the_promoted_inputs(dtype):
    """Under autocast the op sees the decoder's low-precision output against float32 data: it
    promotes once (as outside autocast), returns float32, and the layer gets the same gradient as
    the same tensors give without autocast; both match float64 within float32's tolerance."""
    recon, x, mu, logvar = sample_inputs(16, 64, 4, logits=False, device="cuda")
    layer = torch.nn.Linear(64, 64).cuda()
    with torch.autocast("cuda", dtype=dtype):
        probs = torch.sigmoid(layer(recon))
        loss = vae_fast.vae_loss(probs, x, mu, logvar)
    assert probs.dtype == dtype and loss.dtype == torch.float32
    (grad_probs,) = torch.autograd.grad(loss, probs)
    assert grad_probs.dtype == dtype
    same_inputs = [probs.detach().float(), x, mu, logvar]
    outside, grads = loss_and_grads(vae_fast.vae_loss, same_inputs)
    assert torch.equal(loss.detach(), outside) and torch.equal(grad_probs, grads[0].to(dtype))
    ref, ref_grads = loss_and_grads(reference.vae_loss, [t.double() for t in same_inputs])
    assert relative_error(loss, ref) <= TOLERANCE[torch.float32]
    assert relative_error(grads[0], ref_grads[0]) <= TOLERANCE[torch.float32]
