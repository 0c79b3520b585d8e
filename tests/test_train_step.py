"""vae_fast.train_step's pieces as `vae-fast train` uses them, and the step settings of training:
the direct fused Adam call against torch.optim.Adam, the tensor KL weight of compiled and captured
steps, --compile and --bf16 runs resuming exactly, --cuda-graph refused where it cannot run, and
--resume keeping the checkpoint's batch size. TrainStep's public contract: tests/test_train_step_public.py;
its CUDA graph: tests/test_captured_step.py (GPU only)."""

import copy
from dataclasses import replace

import pytest
import torch

from vae_fast import VAE
from vae_fast.checkpoints import load_checkpoint
from vae_fast.train_step import FusedAdamStep, TrainStep, make_optimizer
from vae_fast.training import NegativeElbo, train
from test_training import _config, _same_run, _toy


def _model_and_grads(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    model = VAE(16, latent_dim=3, hidden_dims=(8,))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def _twin(model: VAE) -> VAE:
    twin = VAE(16, latent_dim=3, hidden_dims=(8,))
    twin.load_state_dict(model.state_dict())
    for p, q in zip(twin.parameters(), model.parameters()):
        p.grad = q.grad.clone()
    return twin


def _fresh_gradients(models: tuple[VAE, VAE], g: torch.Generator) -> None:
    """The same new random gradient on both models' parameters."""
    for p, q in zip(*(m.parameters() for m in models)):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()


def _assert_same_adam(ours: VAE, theirs: VAE, ours_optimizer, theirs_optimizer) -> None:
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)
        a, b = ours_optimizer.state[p], theirs_optimizer.state[q]
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def _counting_fallbacks(optimizer: torch.optim.Adam) -> list:
    """Records each optimizer.step() call (FusedAdamStep's fallback) in the list returned."""
    calls, step = [], optimizer.step
    optimizer.step = lambda: calls.append(1) or step()
    return calls


@pytest.mark.parametrize("lr, weight_decay, maximize", [(1e-3, 0.0, False), (0.05, 0.01, True)])
def test_direct_fused_adam_gives_the_bits_of_optimizer_step(lr, weight_decay, maximize):
    ours = _model_and_grads()
    theirs = _twin(ours)
    options = {"lr": lr, "weight_decay": weight_decay, "maximize": maximize, "fused": True}
    direct = FusedAdamStep(torch.optim.Adam(ours.parameters(), **options))
    reference = torch.optim.Adam(theirs.parameters(), **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # the first creates Adam's state (through optimizer.step), the others call the kernel
        direct()
        reference.step()
        _fresh_gradients((ours, theirs), g)
    assert direct._tensors is not None  # the direct call did run
    _assert_same_adam(ours, theirs, direct.optimizer, reference)


def test_direct_fused_adam_leaves_other_optimizers_to_their_step():
    """An Adam that is not fused (an old checkpoint's: load_state_dict restores its options), or
    one with amsgrad, is stepped by its own optimizer.step()."""
    for options in ({"foreach": False}, {"fused": True, "amsgrad": True}):
        ours = _model_and_grads()
        theirs = _twin(ours)
        direct = FusedAdamStep(torch.optim.Adam(ours.parameters(), lr=0.01, **options))
        reference = torch.optim.Adam(theirs.parameters(), lr=0.01, **options)
        for _ in range(3):
            direct()
            reference.step()
        assert direct._tensors is None
        assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))


def test_direct_fused_adam_skips_parameters_without_gradients_like_adam():
    ours = _model_and_grads()
    theirs = _twin(ours)
    direct = FusedAdamStep(make_optimizer(ours.parameters(), 0.01))
    reference = make_optimizer(theirs.parameters(), 0.01)
    direct()
    reference.step()
    for model in (ours, theirs):
        model.decoder[0].bias.grad = None
    direct()
    reference.step()
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))


def test_direct_fused_adam_continues_from_a_loaded_state_like_adam():
    """optimizer.load_state_dict replaces Adam's state tensors: the next steps continue from the
    loaded step counts and moments, as torch.optim.Adam's own step does, and still by the direct
    call (a cache of the old tensors left `step` at the loaded 3 after a step, not 4)."""
    saved_model = _model_and_grads(seed=5)
    saved_optimizer = make_optimizer(saved_model.parameters(), 0.01)
    for _ in range(3):
        saved_optimizer.step()
    saved = saved_optimizer.state_dict()
    g = torch.Generator().manual_seed(2)

    ours = _model_and_grads()
    theirs = _twin(ours)
    direct = FusedAdamStep(make_optimizer(ours.parameters(), 0.01))
    fallbacks = _counting_fallbacks(direct.optimizer)
    reference = make_optimizer(theirs.parameters(), 0.01)
    for _ in range(2):
        direct()
        reference.step()
        _fresh_gradients((ours, theirs), g)
    # Copies, as from a checkpoint file: load_state_dict keeps the very tensors it is given.
    direct.optimizer.load_state_dict(copy.deepcopy(saved))
    reference.load_state_dict(copy.deepcopy(saved))
    for _ in range(3):
        direct()
        reference.step()
        _fresh_gradients((ours, theirs), g)
    _assert_same_adam(ours, theirs, direct.optimizer, reference)
    assert all(direct.optimizer.state[p]["step"] == 6 for p in ours.parameters())
    assert len(fallbacks) == 1  # the first step only: after the load, the direct call on the loaded tensors


def _all_but_the_decoder(model: VAE) -> list:
    return [*model.encoder.parameters(), *model.encoder_heads.parameters()]


def test_direct_fused_adam_steps_a_parameter_group_added_later_like_adam():
    """optimizer.add_param_group after direct steps: the new group is stepped (with its own
    learning rate) as torch.optim.Adam steps it; a cache of the first group left it untouched."""
    ours = _model_and_grads()
    theirs = _twin(ours)
    direct = FusedAdamStep(make_optimizer(_all_but_the_decoder(ours), 0.01))
    reference = make_optimizer(_all_but_the_decoder(theirs), 0.01)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        direct()
        reference.step()
        _fresh_gradients((ours, theirs), g)
    initial_decoder = [p.clone() for p in ours.decoder.parameters()]
    for optimizer, model in ((direct.optimizer, ours), (reference, theirs)):
        optimizer.add_param_group({"params": list(model.decoder.parameters()), "lr": 0.05})
    for _ in range(3):
        direct()
        reference.step()
        _fresh_gradients((ours, theirs), g)
    assert all(not torch.equal(p, q) for p, q in zip(ours.decoder.parameters(), initial_decoder))
    _assert_same_adam(ours, theirs, direct.optimizer, reference)


def test_a_tensor_kl_weight_gives_the_loss_and_gradients_of_the_number():
    """NegativeElbo with beta as a 0-d tensor (compiled and captured steps) computes the same
    negative ELBO as with the number, by the fused reconstruction term plus beta * KL."""
    torch.manual_seed(0)
    model = VAE(16, latent_dim=3, hidden_dims=(8,))
    x = _toy().train_x[:12]
    results = []
    for beta in (0.7, torch.tensor(0.7)):
        model.zero_grad()
        torch.manual_seed(3)
        loss, kl = NegativeElbo(model)(x, beta)
        loss.backward()
        results.append((loss.detach(), kl, [p.grad.clone() for p in model.parameters()]))
    (loss_a, kl_a, grads_a), (loss_b, kl_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-5)
    assert torch.equal(kl_a, kl_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_train_step_returns_the_batch_loss_and_kl_and_updates_the_weights():
    torch.manual_seed(0)
    model = VAE(16, latent_dim=3, hidden_dims=(8,))
    initial = VAE(16, latent_dim=3, hidden_dims=(8,))
    initial.load_state_dict(model.state_dict())
    x = _toy().train_x[:12]
    step = TrainStep(NegativeElbo(model), make_optimizer(model.parameters(), 0.01), lambda objective, x: objective(x, 0.5))
    torch.manual_seed(4)
    stats = step(x)
    torch.manual_seed(4)  # the same posterior noise
    with torch.no_grad():
        loss, kl = NegativeElbo(initial)(x, 0.5)
    assert all(not t.requires_grad for t in stats)
    assert torch.equal(torch.stack(stats), torch.stack((loss, kl)))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))


def test_train_step_resets_the_gradients_of_a_parameter_group_added_later():
    """TrainStep after optimizer.add_param_group: the new group's gradients are reset before each
    backward, as zero_grad resets them in a plain loop (a list of the parameters taken when the
    step was built let them accumulate), so the run equals that loop with torch.optim.Adam."""
    torch.manual_seed(0)
    ours = VAE(16, latent_dim=3, hidden_dims=(8,))
    theirs = VAE(16, latent_dim=3, hidden_dims=(8,))
    theirs.load_state_dict(ours.state_dict())
    x = _toy().train_x[:12]
    step = TrainStep(NegativeElbo(ours), make_optimizer(_all_but_the_decoder(ours), 0.01),
                     lambda objective, x: objective(x, 0.5))
    reference = make_optimizer(_all_but_the_decoder(theirs), 0.01)
    for i in range(4):
        if i == 1:
            step.optimizer.add_param_group({"params": list(ours.decoder.parameters())})
            reference.add_param_group({"params": list(theirs.decoder.parameters())})
        torch.manual_seed(10 + i)
        step(x)
        torch.manual_seed(10 + i)  # the same posterior noise
        reference.zero_grad(set_to_none=True)
        NegativeElbo(theirs)(x, 0.5)[0].backward()
        reference.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("setting", ["bf16", "compile"])
def test_step_settings_train_are_recorded_and_resume_exactly(tmp_path, setting):
    """--bf16 and --compile change the arithmetic: the checkpoint records them, and a run resumed
    with them equals the uninterrupted one bit for bit. (KL warm-up on: with --compile, beta goes
    in as a tensor, so the changing weight does not recompile.)"""
    settings = {setting: True, "epochs": 2, "kl_warmup": 1.5, "lr": 1e-2}
    straight = train(_config(tmp_path, out=str(tmp_path / "straight"), **settings), _toy())
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in straight)
    split = _config(tmp_path, out=str(tmp_path / "split"), **settings)
    train(replace(split, epochs=1), _toy())
    first = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert first["train_config"][setting] is True and first["train_config"]["cuda_graph"] is False
    train(replace(split, resume=str(tmp_path / "split" / "checkpoint.pt")), _toy())
    _same_run(load_checkpoint(tmp_path / "split" / "checkpoint.pt"), load_checkpoint(tmp_path / "straight" / "checkpoint.pt"))


def test_bf16_changes_the_arithmetic_but_not_the_model(tmp_path):
    """Not a silent no-op: a bf16 run ends with other weights than a float32 one, close to them."""
    plain = train(_config(tmp_path, out=str(tmp_path / "f32"), epochs=1), _toy())
    bf16 = train(_config(tmp_path, out=str(tmp_path / "bf16"), epochs=1, bf16=True), _toy())
    a = load_checkpoint(tmp_path / "f32" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "bf16" / "checkpoint.pt")["model"]
    assert a["encoder.0.weight"].dtype == b["encoder.0.weight"].dtype == torch.float32
    assert not torch.equal(a["encoder.0.weight"], b["encoder.0.weight"])
    assert bf16[0]["train_loss"] == pytest.approx(plain[0]["train_loss"], rel=0.02)


@pytest.mark.parametrize("overrides, message", [
    ({"cuda_graph": True}, "--cuda-graph replays the training step from a CUDA graph: it needs --device cuda, got --device cpu"),
    ({"cuda_graph": True, "compile": True, "device": "cuda"}, "--cuda-graph and --compile: choose one"),
])
def test_cuda_graph_is_refused_where_it_cannot_run(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(_config(tmp_path, **overrides), _toy())


def test_cuda_graph_is_refused_under_torchrun(tmp_path, monkeypatch):
    import vae_fast.training as training

    monkeypatch.setattr(training, "_distributed_setup", lambda device: (0, 2, torch.device(device)))
    with pytest.raises(ValueError, match="--cuda-graph runs in one process; this run has 2"):
        train(_config(tmp_path, cuda_graph=True, device="cuda"), _toy())


def test_cpu_runs_record_that_no_graph_was_used(tmp_path):
    train(_config(tmp_path, epochs=1), _toy())
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["train_config"]["cuda_graph"] is False


def test_the_kl_metric_matches_the_reference_and_keeps_near_prior_precision():
    from vae_fast import reference
    from vae_fast.training import _kl_sum

    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    expected = reference.kl_divergence(mu.double(), logvar.double()).sum()
    torch.testing.assert_close(_kl_sum(mu, logvar), expected.float(), rtol=1e-6, atol=0)
    # A posterior at the prior but for 1e-4: KL ~ 1e-8 per dimension, which 1 + logvar - exp(logvar)
    # in float32 loses entirely (the reference gives 0 there); expm1 keeps it to 1e-3.
    near = torch.full((64, 8), 1e-4)
    exact = reference.kl_divergence(near.double(), near.double()).sum()
    torch.testing.assert_close(_kl_sum(near, near).double(), exact, rtol=1e-3, atol=0)


def test_cli_resume_takes_the_batch_size_from_the_checkpoint(tmp_path, capsys):
    """`vae-fast train --resume` at an epoch's end trained on at the default batch 128, whatever the
    checkpoint's; now the checkpoint's, so the resumed run equals the straight one, and another
    --batch-size is refused in one line."""
    from vae_fast.cli import main

    run = ["--hidden-dims", "16", "--latent-dim", "2", "--device", "cpu", "--quiet"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--out", str(straight), "--epochs", "2", "--batch-size", "300", *run]) == 0
    assert main(["train", "--out", str(split), "--epochs", "1", "--batch-size", "300", *run]) == 0
    assert main(["train", "--out", str(split), "--epochs", "2", "--resume", str(split / "checkpoint.pt"), *run]) == 0
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert b["train_config"]["batch_size"] == 300
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    capsys.readouterr()
    assert main(["train", "--out", str(split), "--epochs", "3", "--resume", str(split / "checkpoint.pt"),
                 "--batch-size", "64", *run]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size 64 differs from the 300 that" in err, err
