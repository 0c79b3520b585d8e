"""vae_fast.captured_step.CapturedStep and `vae-fast train --cuda-graph`: capturing leaves no trace
(weights, Adam's state and the CUDA generator put back), replays train like the eager step, the
last partial batch is trained through a graph of its own, and a graph run resumes bit for bit,
from an epoch's end and from a Ctrl-C in the middle of one, during a KL warm-up (beta a device
tensor). GPU only, except the argument checks."""

import math
from dataclasses import replace

import pytest
import torch

import vae_fast
from vae_fast.captured_step import CapturedStep
from vae_fast.checkpoints import load_checkpoint
from vae_fast.train_step import make_optimizer
from vae_fast.training import train
from conftest import requires_cuda, stream_mismatch_is_an_error
from test_training import _config, _interrupted_after_step, _same_run, _toy


def test_an_optimizer_that_is_not_capturable_is_refused():
    model = vae_fast.VAE(16, latent_dim=2, hidden_dims=(8,))
    with pytest.raises(ValueError, match="capturable=True"):
        CapturedStep(lambda x: model.loss(x), make_optimizer(model.parameters(), 1e-3))


def test_cpu_inputs_are_refused():
    model = vae_fast.VAE(16, latent_dim=2, hidden_dims=(8,))
    # capturable=True is accepted on the CPU by torch; the capture is what needs CUDA tensors
    step = CapturedStep(lambda x: model.loss(x), torch.optim.Adam(model.parameters(), capturable=True))
    with pytest.raises(ValueError, match="inputs must be CUDA tensors, got one on cpu"):
        step(torch.rand(4, 16))


@requires_cuda
def test_capture_puts_weights_adam_and_the_generator_back_and_replays_train():
    """Capturing warms up with real steps; they are undone, or a run would train on more steps
    than it counts and a resumed run (capturing at another point) would draw other noise."""
    torch.manual_seed(0)
    model = vae_fast.VAE().cuda()
    before = [p.detach().clone() for p in model.parameters()]
    step = CapturedStep(lambda x: model.loss(x), make_optimizer(model.parameters(), 1e-3, capturable=True))
    x = torch.rand(64, 784, device="cuda")
    rng = torch.cuda.get_rng_state()
    step._capture([x])  # capture alone, no step
    torch.cuda.synchronize()
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(state["step"].item() == 0 and not state["exp_avg"].any() for state in step.optimizer.state.values())
    losses = []
    for _ in range(20):
        step(x)  # the first call captures again (a new shape key), then replays
        with torch.no_grad():
            losses.append(model.loss(x).item())
    assert all(s["step"].item() == 20 for s in step.optimizer.state.values())
    assert losses[-1] < losses[0]


@requires_cuda
def test_captures_and_eager_steps_leave_no_graph_on_another_stream():
    """Issue 18, item 6: a loss_of_batch that returns the loss alone made the captured step keep that
    loss, hence its graph and every parameter's AccumulateGrad node made on the capture stream; the
    next shape's warm-up (on another side stream) and any eager backward then ran into those nodes:
    torch warned of the stream mismatch and synchronized. The returned outputs hold no graph."""
    torch.manual_seed(0)
    model = vae_fast.VAE(64, latent_dim=4, hidden_dims=(32,)).cuda()
    step = CapturedStep(lambda x: model.loss(x), make_optimizer(model.parameters(), 1e-3, capturable=True))
    with stream_mismatch_is_an_error():
        for batch in (32, 7, 32):  # the 7: a capture of its own, after the first
            loss = step(torch.rand(batch, 64, device="cuda"))
            assert loss.grad_fn is None and not loss.requires_grad
        model.loss(torch.rand(8, 64, device="cuda")).backward()  # an eager backward after the captures
    torch.cuda.synchronize()


@requires_cuda
def test_replays_take_the_steps_of_the_eager_step():
    """From the same weights and generator state, 5 replayed steps and 5 eager steps (the same
    capturable Adam) end at the same weights, up to float32 rounding."""
    torch.manual_seed(0)
    models = [vae_fast.VAE(64, latent_dim=4, hidden_dims=(32,)).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [make_optimizer(m.parameters(), 1e-2, capturable=True) for m in models]
    x = torch.rand(32, 64, device="cuda")
    captured = CapturedStep(lambda batch: models[0].loss(batch), optimizers[0])
    torch.cuda.manual_seed(7)
    for _ in range(5):
        captured(x)
    torch.cuda.manual_seed(7)
    for _ in range(5):
        optimizers[1].zero_grad(set_to_none=True)
        models[1].loss(x).backward()
        optimizers[1].step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# The toy set's 64 rows in batches of 24: steps of 24, 24 and 16 rows, so the last, partial batch
# runs through a second graph; a KL warm-up over 1.5 epochs keeps beta changing across the resumes.
GRAPH = {"device": "cuda", "batch_size": 24, "epochs": 3, "kl_warmup": 1.5, "beta": 2.0, "lr": 1e-2}


@requires_cuda
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


@requires_cuda
def test_graph_training_matches_eager_training(tmp_path):
    """The same run with and without the graph: other arithmetic (capturable Adam, beta * KL added
    outside the fused loss), the same training, to float32 rounding."""
    graph = train(_config(tmp_path, out=str(tmp_path / "graph"), cuda_graph=True, **GRAPH), _toy())
    eager = train(_config(tmp_path, out=str(tmp_path / "eager"), cuda_graph=False, **GRAPH), _toy())
    for a, b in zip(graph, eager):
        for key in ("beta", "train_loss", "train_kl", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), key
    assert load_checkpoint(tmp_path / "eager" / "checkpoint.pt")["train_config"]["cuda_graph"] is False


@requires_cuda
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


@requires_cuda
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
