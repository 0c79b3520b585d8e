"""vae_fast.ConvVAE: shapes for several image sizes (odd ones restored exactly), the layers the
docs promise, the loss and gradients against torch.distributions, training on real data (sklearn's
8x8 digits), checkpoints, torch.compile, and bad arguments."""

import math

import pytest
import torch
from torch import nn

import likelihood_oracle
from vae_fast import ConvVAE, loss_function
from conftest import checkpoint_round_trip, relative_error, requires_cuda

_SIZES = [
    ((1, 28, 28), (32, 64)),  # MNIST: 28 -> 14 -> 7
    ((1, 28, 28), (8, 16, 32)),  # 7 -> 3 at the third layer: output_padding brings 3 back to 7
    ((3, 12, 20), (8, 16)),
    ((2, 9, 13), (4, 8)),  # odd sizes from the start
    ((1, 8, 8), (16, 32)),  # sklearn's digits
]


def _halved(n: int, times: int) -> int:
    for _ in range(times):
        n = (n + 2 - 4) // 2 + 1  # Conv2d's output size for kernel 4, stride 2, padding 1
    return n


@pytest.mark.parametrize("image_shape, channels", _SIZES)
def test_shapes_and_layers_for_several_image_sizes(image_shape, channels):
    torch.manual_seed(0)
    model = ConvVAE(image_shape, 5, channels, likelihood="gaussian")
    convs = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    transposed = [m for m in model.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in convs] == list(channels)
    assert all((m.kernel_size, m.stride, m.padding) == ((4, 4), (2, 2), (1, 1)) for m in convs + transposed)
    assert [m.out_channels for m in transposed] == [*reversed(channels[:-1]), image_shape[0]]
    assert model.encoder_heads.out_features == 2 * 5 and model.input_dim == math.prod(image_shape)
    # The decoder passes through the encoder's feature-map sizes in reverse.
    seen = {"encoder": [], "decoder": []}
    for name in seen:
        for layer in getattr(model, name):
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                layer.register_forward_hook(lambda m, args, out, name=name: seen[name].append((tuple(args[0].shape[2:]), tuple(out.shape[2:]))))
    x = torch.randn(3, *image_shape)
    recon, mu, logvar = model(x)
    assert recon.shape == (3, *image_shape) and mu.shape == logvar.shape == (3, 5)
    assert seen["decoder"] == [(out, into) for into, out in reversed(seen["encoder"])]
    h, w = image_shape[1:]
    assert seen["encoder"][-1][1] == (_halved(h, len(channels)), _halved(w, len(channels)))
    # Rows of flattened images are the same input.
    torch.testing.assert_close(model.reconstruct(x.reshape(3, -1)), model.reconstruct(x), rtol=0, atol=0)


def test_grey_images_may_come_without_a_channel_axis():
    model = ConvVAE((1, 8, 8), 3, (4, 8))
    x = torch.rand(2, 8, 8)
    torch.testing.assert_close(model.reconstruct(x), model.reconstruct(x.unsqueeze(1)), rtol=0, atol=0)


def test_bernoulli_forward_gives_probabilities_for_the_examples_loss():
    torch.manual_seed(0)
    model, x = ConvVAE((1, 8, 8), 3, (4, 8)), torch.rand(6, 1, 8, 8)
    torch.manual_seed(1)
    recon, mu, logvar = model(x)
    torch.manual_seed(1)
    logits = model.forward_output(x)[0]
    torch.testing.assert_close(recon, torch.sigmoid(logits), rtol=0, atol=0)
    torch.manual_seed(1)
    torch.testing.assert_close(model.loss(x), loss_function(recon, x, mu, logvar), rtol=1e-5, atol=0)


@pytest.mark.parametrize("likelihood, learn_scale", [("gaussian", "shared"), ("laplace", "feature"), ("gaussian", "none"), ("bernoulli", "none")])
def test_loss_and_every_gradient_match_torch_distributions(likelihood, learn_scale):
    """model.loss (the fused loss) against torch.distributions on the same forward pass (same seed,
    same z), every parameter gradient included (log_scale's too), in float64."""
    torch.manual_seed(0)
    model = ConvVAE((2, 6, 10), 3, (4, 8), likelihood=likelihood, learn_scale=learn_scale).double()
    if model.log_scale is not None:
        with torch.no_grad():
            model.log_scale.uniform_(-1.0, 0.7)
    x = torch.rand(5, 2, 6, 10, dtype=torch.float64)
    if likelihood != "bernoulli":
        x = 3 * x - 1  # any real
    torch.manual_seed(4)
    loss = model.loss(x.reshape(5, -1))
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(4)
    expected = likelihood_oracle.negative_elbo(model, x, *model.forward_output(x)).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
    for name, p in model.named_parameters():
        assert ours[name].shape == p.shape and p.grad.abs().max() > 0, f"{name}: no gradient reaches it"
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's bundled 8x8 digits as continuous grey levels in [0, 1]: (train [1437, 1, 8, 8], held-out [360, 1, 8, 8])."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().data).float().div(16).reshape(-1, 1, 8, 8)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[360:]], x[order[:360]]


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_a_few_steps_on_digits_lower_the_held_out_loss_and_learn_the_scale(likelihood):
    """80 Adam steps on real data. At the start (unit scale, near-zero means) the held-out loss is
    ~64 pixels x ~1.1 nats (70-73 measured); the residuals are much smaller than 1, so a fitted
    scale and mean are worth tens of nats (measured after: 6.4 gaussian, 3.4 laplace). The rate
    is high (2e-2) because Adam moves log_scale by about lr per step and it must travel ~1.4.
    Seeded, so the run is the same every time."""
    train, held_out = _digits()
    torch.manual_seed(0)
    model = ConvVAE((1, 8, 8), 8, (16, 32), likelihood=likelihood, learn_scale="shared")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)

    def held_out_loss() -> float:
        with torch.no_grad():
            torch.manual_seed(100)
            return model.loss(held_out, reduction="mean").item()

    before = held_out_loss()
    batches = torch.randperm(80 * 64, generator=torch.Generator().manual_seed(1)) % len(train)
    for batch in batches.reshape(80, 64):
        optimizer.zero_grad()
        model.loss(train[batch], reduction="mean").backward()
        optimizer.step()
    after = held_out_loss()
    scale = model.log_scale.exp().item()
    assert after < before - 40, f"held-out loss {before:.1f} -> {after:.1f} nats"
    assert scale < 0.4, f"the learned scale stayed at {scale:.3f}"
    # The learned scale fits the data: near the best scale for the model's own reconstructions,
    # RMS residual (gaussian) or mean absolute residual (laplace), within a factor 2 (measured:
    # 0.27 against 0.26, 0.24 against 0.19).
    with torch.no_grad():
        residual = held_out - model.reconstruct(held_out)
        best = residual.pow(2).mean().sqrt().item() if likelihood == "gaussian" else residual.abs().mean().item()
    assert best / 2 < scale < 2 * best, f"learned scale {scale:.3f}, best for the reconstructions {best:.3f}"


@pytest.mark.parametrize("likelihood, learn_scale", [("gaussian", "feature"), ("bernoulli", "none")])
def test_checkpoint_round_trip(tmp_path, likelihood, learn_scale):
    torch.manual_seed(0)
    model = ConvVAE((1, 12, 8), 4, (8, 16), likelihood=likelihood, learn_scale=learn_scale)
    loaded = checkpoint_round_trip(model, tmp_path)
    assert type(loaded) is ConvVAE
    assert loaded.config() == {"model": "conv", "image_shape": [1, 12, 8], "latent_dim": 4, "channels": [8, 16],
                               "likelihood": likelihood, "learn_scale": learn_scale}
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    x = torch.rand(3, 96)
    torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)


def test_torch_compile_of_the_loss_matches_eager():
    """Same seed, same noise: the compiled model.loss gives the eager loss and parameter gradients
    (float32; rtol 1e-4 as for VAE: re-associated sums only, while other noise differs by O(1)).
    One conv layer each way: inductor's compile time grows with the graph (~20 s here for one
    layer, ~30 s for two on a busy 2-core machine) and one layer exercises every kind of op."""
    torch.manual_seed(0)
    model = ConvVAE((1, 8, 8), 4, (8,), likelihood="gaussian", learn_scale="shared")
    x = torch.rand(16, 1, 8, 8)

    def loss_and_grads(loss_fn, seed: int):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = loss_fn(x)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    eager_loss, eager = loss_and_grads(model.loss, 3)
    compiled_loss, compiled = loss_and_grads(torch.compile(model.loss), 3)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-4)
    assert "log_scale" in eager
    for name, expected in eager.items():
        assert expected.abs().max() > 0, f"{name}: a zero eager gradient would make the check vacuous"
        torch.testing.assert_close(compiled[name], expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    _, other = loss_and_grads(model.loss, 4)
    assert relative_error(other["encoder.0.weight"], eager["encoder.0.weight"]) > 1e-3


def test_autocast_matches_float32():
    """Under bfloat16 autocast the convolutions run in bfloat16 while the loss stays float32: loss
    and parameter gradients equal the float32 run's (same seed, same noise) within the dtype's
    precision, u = 2^-9 for the loss and 32 u = 0.0625 norm-wise for gradients, as for VAE
    (measured here: 2.4e-5 and 0.033)."""
    torch.manual_seed(0)
    model, x = ConvVAE((1, 8, 8), 4, (8, 16), likelihood="gaussian", learn_scale="feature"), torch.rand(16, 64)

    def loss_and_grads(enabled: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = model.loss(x)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss32, grads32 = loss_and_grads(False)
    loss16, grads16 = loss_and_grads(True)
    u = 2.0**-9
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=u, atol=0)
    for name, expected in grads32.items():
        assert grads16[name].dtype == torch.float32
        assert relative_error(grads16[name], expected) <= 32 * u, name


def test_a_nan_pixel_gives_its_sample_a_nan_loss_and_no_finite_total():
    torch.manual_seed(0)
    model = ConvVAE((1, 8, 8), 4, (8, 16), likelihood="laplace", learn_scale="shared")
    x = torch.randn(3, 1, 8, 8)
    x[1, 0, 2, 5] = float("nan")
    per_sample = model.loss(x, reduction="none")
    assert per_sample[1].isnan() and bool(per_sample[[0, 2]].isfinite().all())
    assert model.loss(x).isnan()


@requires_cuda
def test_cuda_training_step():
    torch.manual_seed(0)
    model = ConvVAE((1, 28, 28), 16, likelihood="laplace", learn_scale="feature").cuda()
    loss = model.loss(torch.randn(8, 784, device="cuda"))
    loss.backward()
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (((28, 28),), {}, r"image_shape must be \(C, H, W\), three positive integers, got \(28, 28\)"),
        (((1, 0, 28),), {}, r"image_shape must be \(C, H, W\).*got \(1, 0, 28\)"),
        (((1, 28.0, 28),), {}, r"image_shape must be \(C, H, W\)"),
        (((1, 2, 2), 4, (4, 8)), {}, r"image_shape \(1, 2, 2\) is too small for channels \(4, 8\).*height 2 -> 1 -> 0"),
        (((1, 64, 3), 4, (4, 8)), {}, r"image_shape \(1, 64, 3\) is too small.*width 3 -> 1 -> 0"),
        (((1, 8, 8), 4, ()), {}, "channels must name at least one"),
        (((1, 8, 8), 4, (8, 0)), {}, "channels entry must be a positive integer, got 0"),
        (((1, 8, 8), 0), {}, "latent_dim must be a positive integer, got 0"),
        (((1, 8, 8),), {"likelihood": "cauchy"}, "likelihood must be one of"),
        (((1, 8, 8),), {"learn_scale": "feature"}, "learn_scale='feature' needs a 'gaussian' or 'laplace' likelihood"),
    ],
)
def test_bad_arguments_are_rejected(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvVAE(*args, **kwargs)


@pytest.mark.parametrize("shape", [(4, 63), (4, 1, 8, 7), (4, 8, 8, 1), (4, 8, 8)])
def test_wrong_input_shapes_name_image_shape(shape):
    model = ConvVAE((1, 8, 7), 3, (4, 8)) if shape == (4, 8, 8) else ConvVAE((1, 8, 8), 3, (4, 8))
    with pytest.raises(ValueError, match=r"ConvVAE: expected images of shape \[B, 1, 8, \d\] \(image_shape=\(1, 8, \d\)\).*got input of shape"):
        model.loss(torch.rand(*shape))
