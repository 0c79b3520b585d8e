"""The CUDA kernels. The registration test runs wherever the extension was built with CUDA (CI
builds it without a GPU); the others need a GPU and skip without one."""

import pytest
import torch

import vae_fast
from vae_fast import _extension, reference
from conftest import TOLERANCE, relative_error, requires_cuda
from test_vae_loss import REDUCTIONS, assert_parity, loss_and_grads, sample_inputs

OPS = ("vae_loss", "reparameterize", "reparameterize_backward", "scale_by_grad_output_")


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
    torch.library.opcheck(torch.ops.vae_fast.vae_loss.default, (*inputs, True, 0.5, "mean", [True] * 4))
    mu = torch.randn(6, 5, device="cuda", requires_grad=True)
    logvar = torch.full((6, 5), -float("inf"), device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.vae_fast.reparameterize.default, (mu, logvar, None))
    args = tuple(torch.randn(4, 3, device="cuda") for _ in range(3))
    torch.library.opcheck(torch.ops.vae_fast.reparameterize_backward.default, args)


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
        torch.ops.vae_fast.vae_loss(recon, x, mu, logvar, True, 1.0, "sum", [True, False, True, True])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = vae_fast.reparameterize(mu, logvar)
        loss, grad_recon, _, _, _ = torch.ops.vae_fast.vae_loss(recon, x, mu, logvar, True, 1.0, "sum", [True, False, True, True])
    graph.replay()
    first = z.clone()
    graph.replay()
    assert not torch.equal(z, first)  # each replay draws new noise (the Philox offset advances)
    expected = reference.vae_loss(recon.double(), x.double(), mu.double(), logvar.double(), logits=True)
    assert relative_error(loss, expected) <= TOLERANCE[torch.float32]
    assert torch.isfinite(grad_recon).all()


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
def test_out_of_domain_inputs_give_nan_on_cuda():
    """No data-dependent check on CUDA (it would sync the stream): such samples' losses are NaN."""
    recon, x, mu, logvar = sample_inputs(4, 10, 3, logits=False, device="cuda")
    recon[1, 2] = 1.5
    x[2, 3] = -0.5
    loss = vae_fast.vae_loss(recon, x, mu, logvar, reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]) and torch.isfinite(loss[[0, 3]]).all()


def _training_benchmark_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vae_training.py"
    spec = importlib.util.spec_from_file_location("bench_vae_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@requires_cuda
def test_captured_training_step_starts_from_the_same_weights_and_trains():
    """Capturing warms up with real steps; the benchmark's captured variant must put the weights and
    Adam's state back, or it would train on more steps than the variants it is compared with."""
    bench = _training_benchmark_module()
    torch.manual_seed(0)
    model = vae_fast.VAE().cuda()
    before = [p.detach().clone() for p in model.parameters()]
    step = bench.CapturedStep(bench._step_drop_in(model, vae_fast.loss_function), model)
    x = torch.rand(64, 784, device="cuda")
    step._capture(x)  # capture alone, no step
    torch.cuda.synchronize()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(state["step"].item() == 0 and not state["exp_avg"].any() for state in step.optimizer.state.values())
    losses = []
    for _ in range(20):
        step(x)  # the first call captures again (a new shape key), then replays
        with torch.no_grad():
            recon, mu, logvar = model(x)
            losses.append(vae_fast.loss_function(recon, x, mu, logvar).item())
    assert all(s["step"].item() == 20 for s in step.optimizer.state.values())
    assert losses[-1] < losses[0]
