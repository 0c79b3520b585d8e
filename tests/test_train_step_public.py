"""vae_fast.TrainStep's eager path (the CPU's) against a plain PyTorch loop written here:
`optimizer.zero_grad(); loss_fn(model, batch).backward(); [clip_grad_norm_]; optimizer.step()`,
from the same weights and the same random numbers. Where the arithmetic is the same (every case
but the tensor KL weight's), the weights, buffers and optimizer state after every step are the
loop's bit for bit, and so is each returned loss. Models are the user's own, written here in plain
torch: an MLP VAE with its own layer sizes, a conv VAE, one with dropout and batch norm, each
trained through `vae_fast.vae_loss` (Bernoulli logits, Gaussian and Laplace with a learned scale).
The CUDA-graph path's refusals are checked here; its training, in tests/test_captured_step.py (GPU)."""

import copy
import io

import pytest
import torch
from torch import nn

import vae_fast
from vae_fast import TrainStep, vae_loss
from vae_fast.train_step import _batch_tensors

FEATURES, LATENT = 30, 5


class UserVAE(nn.Module):
    """An MLP VAE of the user's sizes (30-17-5-17-30), torch's own reparameterization, and, for a
    Gaussian or Laplace decoder, a learned log scale (one per feature)."""

    def __init__(self, learned_scale: bool = False, dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        layers = [nn.Linear(FEATURES, 17)] + ([nn.BatchNorm1d(17)] if batch_norm else []) + [nn.ReLU(), nn.Dropout(dropout)]
        self.encoder = nn.Sequential(*layers, nn.Linear(17, 2 * LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, 17), nn.ReLU(), nn.Linear(17, FEATURES))
        self.log_scale = nn.Parameter(torch.full((FEATURES,), -0.5)) if learned_scale else None

    def forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decoder(z), mu, logvar


class UserConvVAE(nn.Module):
    """A conv VAE of the widely copied shape, scaled down: 1x8x8 -> 4x4x4 -> 8x2x2 -> z, and back."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 4, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 4, 2, 1), nn.ReLU(), nn.Flatten())
        self.heads = nn.Linear(32, 2 * LATENT)
        self.decoder = nn.Sequential(nn.Linear(LATENT, 32), nn.ReLU(), nn.Unflatten(1, (8, 2, 2)),
                                     nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(4, 1, 4, 2, 1))
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        mu, logvar = self.heads(self.encoder(x)).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decoder(z), mu, logvar


def elbo(likelihood: str):
    """loss_fn(model, x): the summed negative ELBO of the model's likelihood through vae_loss."""

    def loss_fn(model, x):
        out, mu, logvar = model(x)
        if likelihood == "bernoulli":
            return vae_loss(out, x, mu, logvar, logits=True)
        return vae_loss(out, x, mu, logvar, likelihood=likelihood, log_scale=model.log_scale)

    return loss_fn


def _batches(shape=(FEATURES,), rows=37, size=16, seed=0) -> list[torch.Tensor]:
    """Batches of 16, 16 and the last, partial one of 5."""
    return list(torch.rand(rows, *shape, generator=torch.Generator().manual_seed(seed)).split(size))


def plain_loop(model, optimizer, loss_fn, batches, clip=None) -> list[torch.Tensor]:
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _twins(model: nn.Module, make_optimizer):
    twin = copy.deepcopy(model)
    return (model, make_optimizer(model)), (twin, make_optimizer(twin))


def _assert_same_training(ours, theirs) -> None:
    (model, optimizer), (twin, twin_optimizer) = ours, theirs
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), twin_optimizer.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_both(model, make_optimizer, loss_fn, batches, *, clip=None, **options):
    """TrainStep and the plain loop from the same weights and seeds; returns both (model,
    optimizer) pairs and the steps' losses, after checking the losses are the same bits."""
    ours, theirs = _twins(model, make_optimizer)
    step = TrainStep(*ours, loss_fn, clip_grad_norm=clip, **options)
    torch.manual_seed(1)
    losses = [step(batch) for batch in batches]
    torch.manual_seed(1)
    expected = plain_loop(*theirs, loss_fn, batches, clip=clip)
    assert step.cuda_graph is False
    for loss, want in zip(losses, expected):
        loss = loss[0] if isinstance(loss, tuple) else loss
        assert not loss.requires_grad and torch.equal(loss, want)
    return ours, theirs, step


def fused_adam(model):
    return torch.optim.Adam(model.parameters(), lr=0.01, fused=True)


@pytest.mark.parametrize("make_model, likelihood, shape", [
    (UserVAE, "bernoulli", (FEATURES,)),
    (lambda: UserVAE(learned_scale=True), "gaussian", (FEATURES,)),
    (lambda: UserVAE(learned_scale=True), "laplace", (FEATURES,)),
    (UserConvVAE, "gaussian", (1, 8, 8)),
], ids=["mlp-bernoulli", "mlp-gaussian-learned-scale", "mlp-laplace-learned-scale", "conv-gaussian-learned-scale"])
def test_user_models_train_as_the_plain_loop_bit_for_bit(make_model, likelihood, shape):
    torch.manual_seed(0)
    ours, theirs, step = _train_both(make_model(), fused_adam, elbo(likelihood), _batches(shape) * 2)
    _assert_same_training(ours, theirs)
    assert step.optimizer_step._tensors is not None  # the fused kernel was called directly
    if likelihood != "bernoulli":
        assert not torch.equal(ours[0].log_scale, make_model().log_scale)  # the scale is learned


@pytest.mark.parametrize("make_optimizer, direct", [
    (fused_adam, True),
    (lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.05, fused=True), True),
    (lambda m: torch.optim.Adam(m.parameters(), lr=0.01), False),  # foreach: its own step()
    (lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, amsgrad=True, fused=True), False),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), False),
], ids=["adam-fused", "adamw-fused", "adam-foreach", "adamw-amsgrad", "sgd-momentum"])
def test_optimizers_step_as_in_the_plain_loop(make_optimizer, direct):
    torch.manual_seed(0)
    ours, theirs, step = _train_both(UserVAE(), make_optimizer, elbo("bernoulli"), _batches() * 2)
    _assert_same_training(ours, theirs)
    assert (step.optimizer_step._tensors is not None) == direct


def test_several_parameter_groups_keep_their_own_settings():
    def grouped(model):
        return torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": 0.02},
                                  {"params": model.decoder.parameters(), "lr": 0.003, "weight_decay": 0.1}], fused=True)

    torch.manual_seed(0)
    ours, theirs, step = _train_both(UserVAE(), grouped, elbo("bernoulli"), _batches() * 2)
    _assert_same_training(ours, theirs)
    assert len(step.optimizer_step._tensors.groups) == 2


def test_train_mode_layers_dropout_and_batch_norm():
    """Dropout draws the loop's masks and batch norm updates the loop's running statistics."""
    torch.manual_seed(0)
    model = UserVAE(dropout=0.3, batch_norm=True)
    running_mean = model.encoder[1].running_mean.clone()
    ours, theirs, _ = _train_both(model, fused_adam, elbo("bernoulli"), _batches())
    _assert_same_training(ours, theirs)  # buffers included
    assert ours[0].training and not torch.equal(ours[0].encoder[1].running_mean, running_mean)


def test_gradient_clipping_by_norm():
    torch.manual_seed(0)
    ours, theirs, _ = _train_both(UserVAE(), fused_adam, elbo("bernoulli"), _batches(), clip=0.5)
    _assert_same_training(ours, theirs)
    torch.manual_seed(0)
    unclipped, _, _ = _train_both(UserVAE(), fused_adam, elbo("bernoulli"), _batches())
    assert not torch.equal(ours[0].encoder[0].weight, unclipped[0].encoder[0].weight)  # the clip did act


def test_a_kl_weight_that_changes_every_step_through_a_tensor():
    """A beta-VAE whose KL weight comes in with the batch as a 0-d tensor (as a captured step needs
    it), against the loop handing vae_loss the number: other arithmetic (beta * KL added outside the
    fused loss), so float32 rounding apart."""

    def with_tensor_beta(model, batch):
        x, beta = batch
        out, mu, logvar = model(x)
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum()
        return vae_loss(out, x, mu, logvar, logits=True, beta=0.0) + beta * kl

    betas = [0.0, 0.25, 0.5, 4.0, 1.0, 2.0]
    batches = _batches() * 2
    torch.manual_seed(0)
    (model, optimizer), (twin, twin_optimizer) = _twins(UserVAE(), fused_adam)
    step = TrainStep(model, optimizer, with_tensor_beta)
    beta = torch.zeros(())
    torch.manual_seed(1)
    losses = []
    for x, b in zip(batches, betas):
        beta.fill_(b)
        losses.append(step((x, beta)))
    torch.manual_seed(1)
    for x, b, loss in zip(batches, betas, losses):
        twin_optimizer.zero_grad()
        out, mu, logvar = twin(x)
        expected = vae_loss(out, x, mu, logvar, logits=True, beta=b)
        expected.backward()
        twin_optimizer.step()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-4)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_load_state_dict_before_or_after_the_step_is_made():
    """An optimizer state loaded before TrainStep is built, or between its steps, is the one the
    next steps continue from, as in the loop (a cache of the old state tensors stepped those)."""
    torch.manual_seed(5)
    source = UserVAE()
    source_optimizer = fused_adam(source)
    plain_loop(source, source_optimizer, elbo("bernoulli"), _batches(seed=3))
    saved = source_optimizer.state_dict()
    torch.manual_seed(0)
    (model, optimizer), (twin, twin_optimizer) = _twins(UserVAE(), fused_adam)
    for opt in (optimizer, twin_optimizer):
        opt.load_state_dict(copy.deepcopy(saved))  # copies, as from a file
    step = TrainStep(model, optimizer, elbo("bernoulli"))
    torch.manual_seed(1)
    for batch in _batches():
        step(batch)
    optimizer.load_state_dict(copy.deepcopy(saved))
    for batch in _batches(seed=1):
        step(batch)
    torch.manual_seed(1)
    plain_loop(twin, twin_optimizer, elbo("bernoulli"), _batches())
    twin_optimizer.load_state_dict(copy.deepcopy(saved))
    plain_loop(twin, twin_optimizer, elbo("bernoulli"), _batches(seed=1))
    _assert_same_training((model, optimizer), (twin, twin_optimizer))
    assert all(s["step"] == 3 + 3 for s in optimizer.state.values())


def _checkpoint(model, optimizer) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, buffer)
    return buffer.getvalue()


def test_a_checkpoint_taken_mid_run_resumes_bit_for_bit():
    batches = _batches() * 2
    torch.manual_seed(0)
    straight = UserVAE(learned_scale=True)
    start = copy.deepcopy(straight.state_dict())
    straight_optimizer = fused_adam(straight)
    straight_step = TrainStep(straight, straight_optimizer, elbo("gaussian"))
    torch.manual_seed(1)
    for batch in batches:
        straight_step(batch)

    first = UserVAE(learned_scale=True)
    first.load_state_dict(start)
    first_optimizer = fused_adam(first)
    first_step = TrainStep(first, first_optimizer, elbo("gaussian"))
    torch.manual_seed(1)
    for batch in batches[:4]:
        first_step(batch)
    saved = torch.load(io.BytesIO(_checkpoint(first, first_optimizer)))
    del first, first_optimizer, first_step

    resumed = UserVAE(learned_scale=True)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = fused_adam(resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    resumed_step = TrainStep(resumed, resumed_optimizer, elbo("gaussian"))
    for batch in batches[4:]:
        resumed_step(batch)
    _assert_same_training((resumed, resumed_optimizer), (straight, straight_optimizer))


def test_a_loss_fn_that_reads_the_host_runs_eagerly_on_the_cpu():
    """.item() and data-dependent shapes are fine where nothing is captured."""

    def masked(model, x):
        out, mu, logvar = model(x)
        loss = vae_loss(out, x, mu, logvar, logits=True)
        return loss + 0.0 * float(loss.item()) + x[x > 0.5].sum() * 0

    torch.manual_seed(0)
    ours, theirs, _ = _train_both(UserVAE(), fused_adam, masked, _batches())
    _assert_same_training(ours, theirs)


def test_a_tuple_loss_returns_its_extra_tensors_detached():
    def with_kl(model, x):
        out, mu, logvar = model(x)
        return vae_loss(out, x, mu, logvar, logits=True), (mu.square() + logvar.exp() - 1 - logvar).sum() / 2

    torch.manual_seed(0)
    model = UserVAE()
    loss, kl = TrainStep(model, fused_adam(model), with_kl)(_batches()[0])
    assert loss.shape == kl.shape == () and not kl.requires_grad and kl > 0


@pytest.mark.parametrize("make_optimizer, options, message", [
    (fused_adam, {}, r"Adam was built with capturable=False.*Adam\(params, \.\.\., capturable=True\)"),
    (lambda m: torch.optim.Adagrad(m.parameters()), {}, "Adagrad has no capturable mode; use SGD, or Adam/AdamW"),
    (lambda m: torch.optim.Adam(m.parameters(), capturable=True), {"compile": True}, "compile=True: choose one"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), {}, "the optimizer.s parameters must all be on a CUDA device"),
])
def test_a_cuda_graph_that_cannot_be_had_is_refused_naming_the_fix(make_optimizer, options, message):
    model = UserVAE()
    with pytest.raises(ValueError, match=r"TrainStep\(cuda_graph=True\): " + message):
        TrainStep(model, make_optimizer(model), elbo("bernoulli"), cuda_graph=True, **options)


def test_the_default_runs_eagerly_where_no_graph_can_be_had():
    model = UserVAE()
    for optimizer in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(model.parameters(), capturable=True)):
        assert TrainStep(model, optimizer, elbo("bernoulli")).cuda_graph is False  # CPU parameters


def test_a_graphs_batch_must_be_tensors():
    x = torch.rand(2, 3)
    assert _batch_tensors(x) == (x,) and _batch_tensors([x, x]) == (x, x)
    with pytest.raises(ValueError, match="got Tensor, float; pass a value that changes every step as a 0-d tensor"):
        _batch_tensors((x, 0.5))


def test_bad_clip_is_refused():
    model = UserVAE()
    with pytest.raises(ValueError, match="clip_grad_norm must be positive, got 0"):
        TrainStep(model, fused_adam(model), elbo("bernoulli"), clip_grad_norm=0)


def test_it_is_exported():
    assert vae_fast.TrainStep is TrainStep and "TrainStep" in vae_fast.__all__


def test_optimizer_step_hooks_run_as_in_the_plain_loop():
    """A hook on optimizer.step (a scheduler's counter, a logger) sees every step: the direct kernel
    call would skip it, so a hooked optimizer is stepped through optimizer.step()."""
    torch.manual_seed(0)
    model = UserVAE()
    optimizer = fused_adam(model)
    calls = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    step = TrainStep(model, optimizer, elbo("bernoulli"))
    for batch in _batches():
        step(batch)
    assert len(calls) == 3
