"""The CUDA-graph mode of vae_fast.TrainStep (vae_fast.captured_step.CapturedStep) and `vae-fast train
--cuda-graph`: capturing leaves no trace (weights, batch norm's buffers, the optimizer's state and
the CUDA generator put back), replays train as a plain eager loop written here does (the user's own
models, capturable Adam and SGD, clipping, a KL weight tensor, the last partial batch through a
graph of its own), a step that reads the host is refused (cuda_graph=True) or run eagerly (the
default) with nothing changed by the failed capture, no step waits for the device, and a graph
run resumes bit for bit, from an epoch's end and from a Ctrl-C in the middle of one, during a KL
warm-up (beta a device tensor). GPU only: written to run wherever CUDA exists."""

import copy
import math
from dataclasses import replace

import pytest
import torch

import vae_fast
from vae_fast import TrainStep, vae_loss
from vae_fast.captured_step import CapturedStep, CaptureError
from vae_fast.checkpoints import load_checkpoint
from vae_fast.training import train
from conftest import requires_cuda, stream_mismatch_is_an_error
from test_train_step_public import UserConvVAE, UserVAE, _batches, elbo, plain_loop
from test_training import _config, _interrupted_after_step, _same_run, _toy

pytestmark = requires_cuda


def capturable_adam(model):
    return torch.optim.Adam(model.parameters(), lr=0.01, capturable=True)


def _cuda_batches(shape=(30,)):
    return [b.cuda() for b in _batches(shape)] * 2  # 16, 16 and 5 rows, twice


def _graph_and_loop(make_model, make_optimizer, loss_fn, batches, **options):
    """TrainStep with its graph and the plain loop from the same weights and CUDA generator state;
    returns (step, its model, the loop's model, the step's losses, the loop's)."""
    torch.manual_seed(0)
    model = make_model().cuda()
    twin = make_model().cuda()
    twin.load_state_dict(model.state_dict())
    step = TrainStep(model, make_optimizer(model), loss_fn, **options)
    assert step.cuda_graph
    torch.cuda.manual_seed(7)
    losses = [step(b) for b in batches]
    torch.cuda.manual_seed(7)
    expected = plain_loop(twin, make_optimizer(twin), loss_fn, batches, clip=options.get("clip_grad_norm"))
    return step, model, twin, losses, expected


def _assert_close_models(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("make_model, likelihood, shape, make_optimizer, clip", [
    (UserVAE, "bernoulli", (30,), capturable_adam, None),
    (lambda: UserVAE(learned_scale=True), "gaussian", (30,), capturable_adam, 1.0),
    (lambda: UserVAE(dropout=0.2, batch_norm=True), "bernoulli", (30,),
     lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, capturable=True), None),
    (UserConvVAE, "gaussian", (1, 8, 8), lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9), None),
], ids=["mlp-adam", "mlp-gaussian-clip", "dropout-batchnorm-adamw", "conv-sgd"])
def test_replays_train_as_the_plain_loop(make_model, likelihood, shape, make_optimizer, clip):
    """Captured by default (cuda_graph=None): one graph per batch shape (16 and the last 5), the
    same training as the eager loop up to float32 rounding (capture changes no arithmetic but
    cuBLAS may pick other kernels)."""
    step, model, twin, losses, expected = _graph_and_loop(make_model, make_optimizer, elbo(likelihood),
                                                          _cuda_batches(shape), clip_grad_norm=clip)
    assert len(step._captured.graphs) == 2
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-4, atol=1e-3)
    _assert_close_models(model, twin)


def test_a_kl_weight_tensor_in_the_batch_is_read_at_every_replay():
    def beta_elbo(model, batch):
        x, beta = batch
        out, mu, logvar = model(x)
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum()
        return vae_loss(out, x, mu, logvar, logits=True, beta=0.0) + beta * kl

    betas = [torch.tensor(b, device="cuda") for b in (0.0, 0.5, 1.0, 3.0, 0.25, 2.0)]
    batches = [(x, b) for x, b in zip(_cuda_batches(), betas)]
    _, model, twin, losses, expected = _graph_and_loop(UserVAE, capturable_adam, beta_elbo, batches)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-4, atol=1e-3)
    _assert_close_models(model, twin)


def test_a_learning_rate_changed_between_steps_is_the_one_used():
    """A graph holds the lr it was captured with: a scheduler's change must capture again, not
    replay the old rate."""

    torch.manual_seed(0)
    model, twin = UserVAE().cuda(), UserVAE().cuda()
    twin.load_state_dict(model.state_dict())
    step = TrainStep(model, capturable_adam(model), elbo("bernoulli"))
    twin_optimizer = capturable_adam(twin)
    batches = _cuda_batches()
    torch.cuda.manual_seed(7)
    for i, x in enumerate(batches):
        step.optimizer.param_groups[0]["lr"] = 0.01 / (i + 1)
        step(x)
    torch.cuda.manual_seed(7)
    for i, x in enumerate(batches):
        twin_optimizer.param_groups[0]["lr"] = 0.01 / (i + 1)
        plain_loop(twin, twin_optimizer, elbo("bernoulli"), [x])
    _assert_close_models(model, twin)


def test_an_optimizer_state_loaded_between_replays_is_the_one_stepped():
    """load_state_dict replaces the optimizer's state tensors, which a graph reads by address: the
    next step captures again, so the loaded state is continued, as in the loop."""
    torch.manual_seed(5)
    source = UserVAE().cuda()
    source_optimizer = capturable_adam(source)
    plain_loop(source, source_optimizer, elbo("bernoulli"), _cuda_batches()[:3])
    saved = source_optimizer.state_dict()
    torch.manual_seed(0)
    model, twin = UserVAE().cuda(), UserVAE().cuda()
    twin.load_state_dict(model.state_dict())
    step, twin_optimizer = TrainStep(model, capturable_adam(model), elbo("bernoulli")), capturable_adam(twin)
    batches = _cuda_batches()
    torch.cuda.manual_seed(7)
    for x in batches[:3]:
        step(x)
    step.optimizer.load_state_dict(copy.deepcopy(saved))
    for x in batches[3:]:
        step(x)
    torch.cuda.manual_seed(7)
    plain_loop(twin, twin_optimizer, elbo("bernoulli"), batches[:3])
    twin_optimizer.load_state_dict(copy.deepcopy(saved))
    plain_loop(twin, twin_optimizer, elbo("bernoulli"), batches[3:])
    _assert_close_models(model, twin)
    assert all(s["step"].item() == 6 for s in step.optimizer.state.values())


def test_capture_puts_weights_buffers_optimizer_and_generator_back():
    """Capturing warms up with real steps; they are undone, or a run would train on more steps
    than it counts and a resumed run (capturing at another point) would draw other noise."""
    torch.manual_seed(0)
    model = UserVAE(dropout=0.2, batch_norm=True).cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = TrainStep(model, capturable_adam(model), elbo("bernoulli"))
    x = torch.rand(16, 30, device="cuda")
    rng = torch.cuda.get_rng_state()
    step._captured._capture([x])  # capture alone, no step
    torch.cuda.synchronize()
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(s["step"].item() == 0 and not s["exp_avg"].any() for s in step.optimizer.state.values())


def _reads_the_host(model, x):
    loss = elbo("bernoulli")(model, x)
    return loss * (1.0 if loss.item() > 0 else 2.0)


def _data_dependent_shape(model, x):
    return elbo("bernoulli")(model, x) + x[x > 0.5].sum() * 0


@pytest.mark.parametrize("loss_fn", [_reads_the_host, _data_dependent_shape], ids=["item", "boolean-mask"])
def test_a_step_that_cannot_be_captured_is_refused_or_run_eagerly(loss_fn):
    """cuda_graph=True: CaptureError naming the fix, the state as before. The default: a warning,
    then the eager step, which trains as the plain loop does, bit for bit."""
    torch.manual_seed(0)
    model = UserVAE().cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = TrainStep(model, capturable_adam(model), loss_fn, cuda_graph=True)
    with pytest.raises(CaptureError, match="must not read values on the host.*pass cuda_graph=False"):
        step(torch.rand(16, 30, device="cuda"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(s["step"].item() == 0 for s in step.optimizer.state.values())

    batches = _cuda_batches()
    twin = UserVAE().cuda()
    twin.load_state_dict(model.state_dict())
    step = TrainStep(model, capturable_adam(model), loss_fn)
    torch.cuda.manual_seed(7)
    with pytest.warns(UserWarning, match="could not be captured.*Running eagerly from now on"):
        losses = [step(b) for b in batches]
    assert not step.cuda_graph
    torch.cuda.manual_seed(7)
    expected = plain_loop(twin, capturable_adam(twin), loss_fn, batches)
    assert all(torch.equal(a, b) for a, b in zip(losses, expected))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_the_default_runs_eagerly_with_an_optimizer_that_cannot_be_captured():
    model = UserVAE().cuda()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    assert not TrainStep(model, optimizer, elbo("bernoulli")).cuda_graph
    with pytest.raises(ValueError, match=r"capturable=False.*Adam\(params, \.\.\., capturable=True\)"):
        TrainStep(model, optimizer, elbo("bernoulli"), cuda_graph=True)


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "eager"])
def test_no_step_waits_for_the_device(graph):
    """After the first step (the capture), steps make no host synchronisation: torch's sync debug
    mode turns one into an error."""
    torch.manual_seed(0)
    model = UserVAE().cuda()
    optimizer = capturable_adam(model) if graph else torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    step = TrainStep(model, optimizer, elbo("bernoulli"))
    assert step.cuda_graph == graph
    batches = _cuda_batches()
    step(batches[0])
    step(batches[2])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(b) for b in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(loss.is_cuda and loss.shape == () for loss in losses)


def test_captures_and_eager_steps_leave_no_graph_on_another_stream():
    """Issue 18, item 6: a step that kept the loss, hence its graph and every parameter's
    AccumulateGrad node made on the capture stream, made the next shape's warm-up (on another side
    stream) and any eager backward run into those nodes: torch warned of the stream mismatch and
    synchronized. The returned outputs hold no graph."""
    torch.manual_seed(0)
    model = vae_fast.VAE(64, latent_dim=4, hidden_dims=(32,)).cuda()
    step = TrainStep(model, capturable_adam(model), lambda m, x: m.loss(x))
    with stream_mismatch_is_an_error():
        for batch in (32, 7, 32):  # the 7: a capture of its own, after the first
            loss = step(torch.rand(batch, 64, device="cuda"))
            assert loss.grad_fn is None and not loss.requires_grad
        model.loss(torch.rand(8, 64, device="cuda")).backward()  # an eager backward after the captures
    torch.cuda.synchronize()


def test_cpu_inputs_are_refused_by_the_capture():
    model = UserVAE().cuda()
    step = CapturedStep(lambda x: model(x)[0].sum(), capturable_adam(model), model)
    with pytest.raises(ValueError, match="inputs must be CUDA tensors, got one on cpu"):
        step(torch.rand(4, 30))


# The toy set's 64 rows in batches of 24: steps of 24, 24 and 16 rows, so the last, partial batch
# runs through a second graph; a KL warm-up over 1.5 epochs keeps beta changing across the resumes.
GRAPH = {"device": "cuda", "batch_size": 24, "epochs": 3, "kl_warmup": 1.5, "beta": 2.0, "lr": 1e-2}


def test_graph_training_trains_every_row(tmp_path, monkeypatch):
    captured_batches = []
    capture = CapturedStep._capture

    def recording(self, inputs):
        captured_batches.append(len(inputs[0]))
        return capture(self, inputs)

    monkeypatch.setattr(CapturedStep, "_capture", recording)
    history = train(_config(tmp_path, cuda_graph=True, **{**GRAPH, "epochs": 2}), _toy())
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["train_config"]["cuda_graph"] is True
    assert captured_batches == [24, 16]  # one graph per batch shape, captured once for the whole run
    assert all(math.isfinite(row[key]) for row in history for key in ("train_loss", "train_kl", "test_loss"))


def test_graph_training_matches_eager_training(tmp_path):
    """The same run with and without the graph: other arithmetic (capturable Adam, beta * KL added
    outside the fused loss), the same training, to float32 rounding."""
    graph = train(_config(tmp_path, out=str(tmp_path / "graph"), cuda_graph=True, **GRAPH), _toy())
    eager = train(_config(tmp_path, out=str(tmp_path / "eager"), cuda_graph=False, **GRAPH), _toy())
    for a, b in zip(graph, eager):
        for key in ("beta", "train_loss", "train_kl", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), key
    assert load_checkpoint(tmp_path / "eager" / "checkpoint.pt")["train_config"]["cuda_graph"] is False


def test_graph_training_resumes_exactly(tmp_path, monkeypatch):
    train(_config(tmp_path, out=str(tmp_path / "straight"), cuda_graph=True, **GRAPH), _toy())
    reference = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    # From an epoch's end.
    split = _config(tmp_path, out=str(tmp_path / "split"), cuda_graph=True, **GRAPH)
    train(replace(split, epochs=1), _toy())
    train(replace(split, resume=str(tmp_path / "split" / "checkpoint.pt")), _toy())
    _same_run(load_checkpoint(tmp_path / "split" / "checkpoint.pt"), reference)
    # From a Ctrl-C in the middle of epoch 2 (the hook's SIGINT after step 4, seen at step 5).
    mid = _config(tmp_path, out=str(tmp_path / "mid"), cuda_graph=True, **GRAPH)
    saved = _interrupted_after_step(mid, 4, monkeypatch)
    assert (saved["epoch"], saved["step"]) == (1, 2)
    train(replace(mid, resume=str(tmp_path / "mid" / "checkpoint.pt")), _toy())
    _same_run(load_checkpoint(tmp_path / "mid" / "checkpoint.pt"), reference)


def test_a_resumed_run_keeps_how_its_checkpoint_was_trained(tmp_path):
    """Left unset, --cuda-graph follows the checkpoint: an eager CUDA run resumes eagerly (its Adam
    is not capturable), and so does a checkpoint from before the setting existed."""
    eager = _config(tmp_path, out=str(tmp_path / "eager"), cuda_graph=False, **{**GRAPH, "epochs": 1})
    train(eager, _toy())
    train(replace(eager, epochs=2, cuda_graph=None, resume=str(tmp_path / "eager" / "checkpoint.pt")), _toy())
    assert load_checkpoint(tmp_path / "eager" / "checkpoint.pt")["train_config"]["cuda_graph"] is False
    old = load_checkpoint(tmp_path / "eager" / "checkpoint.pt")
    del old["train_config"]["cuda_graph"]
    torch.save(old, tmp_path / "old.pt")
    train(replace(eager, out=str(tmp_path / "old"), epochs=3, cuda_graph=None, resume=str(tmp_path / "old.pt")), _toy())
    assert load_checkpoint(tmp_path / "old" / "checkpoint.pt")["train_config"]["cuda_graph"] is False
