"""vae_fast.VAE: the drop-in contract with the PyTorch examples' VAE, its own paths (logits, mean
reconstruction, prior samples, several hidden layers), torch.compile, autocast, state_dict, CUDA,
and bad arguments."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import vae_fast
from vae_fast import VAE, loss_function
from vae_fast.baselines import ExampleVAE, example_loss_function
import likelihood_oracle
from conftest import checkpoint_round_trip, relative_error, requires_cuda


def _mnist_like(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 1, 28, 28] images in [0, 1] with some structure (a bright blob per image)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centres = torch.rand(n, 2, generator=g) * 14 + 7
    d2 = (ys - centres[:, 0, None, None]) ** 2 + (xs - centres[:, 1, None, None]) ** 2
    return torch.exp(-d2 / 20).unsqueeze(1)


def _from_example(example: ExampleVAE, **kwargs) -> VAE:
    """A VAE holding the example's weights (its two heads stacked into one)."""
    model = VAE(**kwargs)
    with torch.no_grad():
        model.encoder[0].weight.copy_(example.fc1.weight)
        model.encoder[0].bias.copy_(example.fc1.bias)
        model.encoder_heads.weight.copy_(torch.cat([example.fc21.weight, example.fc22.weight]))
        model.encoder_heads.bias.copy_(torch.cat([example.fc21.bias, example.fc22.bias]))
        model.decoder[0].weight.copy_(example.fc3.weight)
        model.decoder[0].bias.copy_(example.fc3.bias)
        model.decoder[2].weight.copy_(example.fc4.weight)
        model.decoder[2].bias.copy_(example.fc4.bias)
    return model


def test_default_is_the_examples_architecture():
    model, example = VAE(), ExampleVAE()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in example.parameters())
    assert (model.input_dim, model.hidden_dims, model.latent_dim) == (784, (400,), 20)


@pytest.mark.parametrize("fused", [False, True])
def test_same_weights_same_outputs_as_the_example(fused):
    torch.manual_seed(0)
    example = ExampleVAE()
    model = _from_example(example, fused=fused)
    x = _mnist_like(16)
    torch.manual_seed(1)
    recon_ex, mu_ex, logvar_ex = example(x)
    torch.manual_seed(1)
    recon, mu, logvar = model(x)
    torch.testing.assert_close(mu, mu_ex)
    torch.testing.assert_close(logvar, logvar_ex)
    if not fused:  # the reference draws eps exactly as the example does; the kernel draws its own
        torch.testing.assert_close(recon, recon_ex)
    torch.testing.assert_close(model.reconstruct(x), example.decode(mu_ex))
    torch.testing.assert_close(loss_function(recon, x, mu, logvar), example_loss_function(recon, x, mu, logvar), rtol=1e-5, atol=1e-3)


# --- The drop-in's autograd contract (issue 13): `recon` is a node of the loss's graph, exactly as
# in the example, so user code can take gradients wrt it, retain them, or change it in place.


def _same_noise_pair(fused: bool, seed: int = 1):
    """(ours, example, eps): the same weights, and the [16, 20] noise both draw on their next
    forward after torch.manual_seed(seed). The reference path draws eps with torch.randn as the
    example does; the fused kernel draws its own, so the example is handed that draw (the kernel on
    mu = 0, logvar = 0 gives z = eps). Callers check that ours really decoded mu + std * eps."""
    torch.manual_seed(0)
    example = ExampleVAE()
    model = _from_example(example, fused=fused)
    torch.manual_seed(seed)
    if fused:
        eps = vae_fast.reparameterize(torch.zeros(16, 20), torch.zeros(16, 20))
        example.reparameterize = lambda mu, logvar: mu + eps * torch.exp(0.5 * logvar)
    else:
        eps = torch.randn(16, 20)
    return model, example, eps


def _captured_z(model: VAE, x: torch.Tensor, seed: int):
    """model(x) after manual_seed(seed), and the z its decoder received."""
    seen = []
    hook = model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(seed)
    outputs = model(x)
    hook.remove()
    return outputs, seen[0]


@pytest.mark.parametrize("fused", [False, True])
def test_autograd_grad_wrt_recon_is_the_examples(fused):
    model, _, _ = _same_noise_pair(fused)
    x = _mnist_like(16)
    recon, mu, logvar = model(x)
    # The example's loss on the very same tensors is the oracle: both gradients are dL/drecon.
    (ours,) = torch.autograd.grad(loss_function(recon, x, mu, logvar), recon, retain_graph=True)
    (theirs,) = torch.autograd.grad(example_loss_function(recon, x, mu, logvar), recon)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_retained_recon_grad_is_the_hand_derived_bernoulli_gradient(fused):
    model, _, _ = _same_noise_pair(fused)
    x = _mnist_like(16)
    recon, mu, logvar = model(x)
    recon.retain_grad()
    loss_function(recon, x, mu, logvar).backward()
    assert recon.grad is not None, "the loss did not flow through recon"
    # d/dp [-(x log p + (1 - x) log(1 - p))] = -x/p + (1 - x)/(1 - p) = (p - x) / (p (1 - p)),
    # evaluated in float64 on the float32 values; near 0 and 1 the BCE clamps, so only p away from them.
    p, t = recon.detach().double(), x.reshape(recon.shape).double()
    expected = (p - t) / (p * (1 - p))
    away = (p > 1e-4) & (p < 1 - 1e-4)
    assert away.double().mean() > 0.99  # an untrained decoder: nearly every element is checked
    torch.testing.assert_close(recon.grad.double()[away], expected[away], rtol=1e-5, atol=0)


def test_in_place_changes_to_hidden_tensors_cannot_change_the_loss():
    """The loss is a function of (recon, x, mu, logvar) only: overwriting any other tensor the
    forward pass made (every submodule's output that does not share memory with the returned
    tensors, the decoder's logits among them) leaves it unchanged."""
    torch.manual_seed(0)
    model, x = VAE(), _mnist_like(8)
    made = []
    hooks = [m.register_forward_hook(lambda module, args, out: made.append(out)) for m in model.modules() if m is not model]
    recon, mu, logvar = model(x)
    for hook in hooks:
        hook.remove()
    expected = loss_function(recon.detach().clone(), x, mu.detach().clone(), logvar.detach().clone())
    returned = {t.untyped_storage().data_ptr() for t in (recon, mu, logvar)}
    hidden = [t for t in made if t.untyped_storage().data_ptr() not in returned]
    assert hidden  # the decoder's logits at least
    with torch.no_grad():
        for t in hidden:
            t.mul_(-3).add_(5)
    torch.testing.assert_close(loss_function(recon, x, mu, logvar), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_parameter_gradients_are_the_examples(fused):
    model, example, eps = _same_noise_pair(fused, seed=1)
    x = _mnist_like(16)
    (recon, mu, logvar), z = _captured_z(model, x, seed=1)
    torch.manual_seed(1)
    recon_ex, mu_ex, logvar_ex = example(x)
    # Same noise: ours decoded z = mu + exp(logvar / 2) * eps for the eps the example uses.
    torch.testing.assert_close(z, (mu + torch.exp(0.5 * logvar) * eps).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recon, recon_ex, rtol=1e-5, atol=1e-6)
    recon.retain_grad()
    recon_ex.retain_grad()
    loss, loss_ex = loss_function(recon, x, mu, logvar), example_loss_function(recon_ex, x, mu_ex, logvar_ex)
    torch.testing.assert_close(loss, loss_ex, rtol=1e-5, atol=0)
    loss.backward()
    loss_ex.backward()
    assert relative_error(recon.grad, recon_ex.grad) <= 1e-5
    pairs = {
        "fc1": (model.encoder[0], [example.fc1]),
        "fc21+fc22": (model.encoder_heads, [example.fc21, example.fc22]),
        "fc3": (model.decoder[0], [example.fc3]),
        "fc4": (model.decoder[2], [example.fc4]),
    }
    for name, (ours, theirs) in pairs.items():
        for attr in ("weight", "bias"):
            expected = torch.cat([getattr(layer, attr).grad for layer in theirs])
            error = relative_error(getattr(ours, attr).grad, expected)
            assert error <= 1e-5, f"{name}.{attr}: relative error {error:.2e}"


def test_examples_training_loop_runs_unchanged():
    """The train/test functions of pytorch/examples vae/main.py, verbatim but for the data."""
    torch.manual_seed(0)
    images = _mnist_like(256)
    train_loader = DataLoader(TensorDataset(images, torch.zeros(256)), batch_size=64, shuffle=True)
    test_loader = DataLoader(TensorDataset(images[:64], torch.zeros(64)), batch_size=32)
    device = torch.device("cpu")
    model = VAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train(epoch):
        model.train()
        train_loss = 0
        for batch_idx, (data, _) in enumerate(train_loader):
            data = data.to(device)
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = loss_function(recon_batch, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        return train_loss / len(train_loader.dataset)

    def test(epoch):
        model.eval()
        test_loss = 0
        with torch.no_grad():
            for i, (data, _) in enumerate(test_loader):
                data = data.to(device)
                recon_batch, mu, logvar = model(data)
                test_loss += loss_function(recon_batch, data, mu, logvar).item()
                if i == 0:
                    n = min(data.size(0), 8)
                    comparison = torch.cat([data[:n], recon_batch.view(32, 1, 28, 28)[:n]])
                    assert comparison.shape == (16, 1, 28, 28)
        return test_loss / len(test_loader.dataset)

    losses = []
    for epoch in range(1, 4):
        losses.append(train(epoch))
        test(epoch)
        with torch.no_grad():
            sample = torch.randn(64, 20).to(device)
            sample = model.decode(sample).cpu()
            assert sample.view(64, 1, 28, 28).shape == (64, 1, 28, 28)
    assert losses[-1] < losses[0] * 0.9


def test_logits_path_computes_the_same_loss():
    torch.manual_seed(0)
    model, x = VAE(), _mnist_like(8)
    torch.manual_seed(2)
    recon, mu, logvar = model(x)
    probs_loss = loss_function(recon, x, mu, logvar)
    torch.manual_seed(2)
    logits, mu2, logvar2 = model.forward_logits(x)
    logits_loss = vae_fast.vae_loss(logits, x, mu2, logvar2, logits=True)
    torch.testing.assert_close(logits_loss, probs_loss, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(torch.sigmoid(logits), recon)


def test_eval_mode_samples_but_reconstruct_is_deterministic():
    model, x = VAE().eval(), _mnist_like(4)
    assert not torch.equal(model(x)[0], model(x)[0])
    torch.testing.assert_close(model.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)


def test_sample_draws_probabilities_from_the_prior():
    model = VAE(input_dim=64, hidden_dim=32, latent_dim=3)
    images = model.sample(10, generator=torch.Generator().manual_seed(0))
    assert images.shape == (10, 64)
    assert bool(((images >= 0) & (images <= 1)).all())
    torch.testing.assert_close(images, model.sample(10, generator=torch.Generator().manual_seed(0)))


def test_several_hidden_layers_mirror_in_the_decoder():
    model = VAE(input_dim=64, latent_dim=4, hidden_dims=(48, 32, 16))
    widths = [m.out_features for m in model.decoder if isinstance(m, torch.nn.Linear)]
    assert widths == [16, 32, 48, 64]
    recon, mu, logvar = model(torch.rand(5, 64))
    assert recon.shape == (5, 64) and mu.shape == logvar.shape == (5, 4)
    loss_function(recon, torch.rand(5, 64), mu, logvar).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_state_dict_round_trip(tmp_path):
    model, x = VAE(input_dim=64, hidden_dims=(32, 16), latent_dim=2), torch.rand(6, 64)
    torch.save(model.state_dict(), tmp_path / "vae.pt")
    loaded = VAE(input_dim=64, hidden_dims=(32, 16), latent_dim=2)
    loaded.load_state_dict(torch.load(tmp_path / "vae.pt"))
    torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)


def _loss_and_grads(model, forward, x, seed: int, *, logits: bool = False, autocast_dtype=None):
    """The loss of forward(x) after torch.manual_seed(seed) (same noise on every call) and the
    parameter gradients of `model` it produced (zeroed first, so calls do not accumulate)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        if logits:
            out, mu, logvar = forward.forward_logits(x) if forward is model else forward(x)
            loss = vae_fast.vae_loss(out, x, mu, logvar, logits=True)
        else:
            recon, mu, logvar = forward(x)
            loss = loss_function(recon, x, mu, logvar)
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def test_torch_compile_matches_eager():
    """Loss and every parameter gradient of the compiled model equal the eager ones for the same
    seed (hence the same noise: the existing loss check shows the fused kernel draws identically
    under compile). float32 throughout; the compiled graph only re-associates sums, so rtol 1e-4
    is ~1000 float32 ulps of headroom yet far below any real difference (a dropped term or wrong
    noise gives O(1) relative errors)."""
    torch.manual_seed(0)
    model, x = VAE(input_dim=64, hidden_dim=32, latent_dim=4), torch.rand(8, 64)
    compiled = torch.compile(model)
    eager_loss, eager_grads = _loss_and_grads(model, model, x, seed=3)
    compiled_loss, compiled_grads = _loss_and_grads(model, compiled, x, seed=3)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-4)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == 8
    for name, expected in eager_grads.items():
        assert expected.abs().max() > 0, f"{name}: a zero eager gradient would make the check vacuous"
        torch.testing.assert_close(compiled_grads[name], expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # A different seed gives different noise and so different gradients: the comparison above
    # really depends on both runs seeing the same eps.
    _, other_grads = _loss_and_grads(model, model, x, seed=4)
    assert relative_error(other_grads["encoder.0.weight"], eager_grads["encoder.0.weight"]) > 1e-3


# Unit roundoff of each low-precision dtype (half its machine epsilon).
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}


@pytest.mark.parametrize("logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_float32(dtype, logits):
    """Under autocast the loss stays float32 and equals the float32 run's (same weights, same
    seed, so the same noise) within the dtype's precision; so do the parameter gradients.

    Tolerances, with u the dtype's unit roundoff: the loss is a float32 sum of per-element terms
    each off by O(u) relative with mixed signs, so its relative error is at most ~u (measured:
    5e-5 for bf16, 3e-6 for fp16). Gradients pass through the four layers' low-precision GEMMs and ReLU masks
    (a pre-activation near 0 can flip), so they get 32 u norm-wise (bf16 0.0625, measured 0.044;
    fp16 0.0078, measured 0.0007). A wrong gradient or different noise gives errors of order 1."""
    torch.manual_seed(0)
    model, x = VAE(), _mnist_like(8)
    if not logits:  # the drop-in path returns recon in the autocast dtype
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=dtype):
            assert model(x)[0].dtype == dtype
    loss32, grads32 = _loss_and_grads(model, model, x, seed=5, logits=logits)
    loss_lp, grads_lp = _loss_and_grads(model, model, x, seed=5, logits=logits, autocast_dtype=dtype)
    assert loss32.dtype == loss_lp.dtype == torch.float32
    u = _UNIT_ROUNDOFF[dtype]
    torch.testing.assert_close(loss_lp, loss32, rtol=u, atol=0)
    for name, expected in grads32.items():
        assert grads_lp[name].dtype == torch.float32
        error = relative_error(grads_lp[name], expected)
        assert error <= 32 * u, f"{name}: relative error {error:.2e} > 32 u = {32 * u:.2e}"


@requires_cuda
def test_cuda_training_step():
    model, x = VAE().cuda(), _mnist_like(8).cuda()
    recon, mu, logvar = model(x)
    loss = loss_function(recon, x, mu, logvar)
    loss.backward()
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    assert model.sample(4).device.type == "cuda"


def test_wrong_input_width_names_input_dim():
    with pytest.raises(ValueError, match=r"input_dim=784.*\(4, 100\)"):
        VAE()(torch.rand(4, 100))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_dim": 0}, "input_dim must be a positive integer"),
        ({"latent_dim": -1}, "latent_dim must be a positive integer"),
        ({"hidden_dim": 0}, "hidden_dims entry must be a positive integer"),
        ({"hidden_dims": (64, 0)}, "hidden_dims entry must be a positive integer"),
        ({"hidden_dims": ()}, "at least one hidden layer"),
        ({"latent_dim": 2.5}, "latent_dim must be a positive integer"),
    ],
)
def test_bad_dimensions_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(**kwargs)


# --- Gaussian and Laplace decoders with a learned scale (issue 10). The oracle is
# torch.distributions in float64 on the model's own outputs, independent of vae_fast's loss code.

_LIKELIHOOD_CASES = [(lik, scale) for lik in ("gaussian", "laplace") for scale in ("none", "shared", "feature")]


def _continuous_model(likelihood: str, learn_scale: str, seed: int = 0) -> VAE:
    """A float64 model whose learned log_scale (if any) is moved off its initial 0, so that a
    dropped or misplaced scale shows."""
    torch.manual_seed(seed)
    model = VAE(input_dim=6, hidden_dim=8, latent_dim=3, likelihood=likelihood, learn_scale=learn_scale).double()
    if model.log_scale is not None:
        with torch.no_grad():
            model.log_scale.copy_(torch.empty_like(model.log_scale).uniform_(-1.0, 0.7))
    return model


@pytest.mark.parametrize("likelihood, learn_scale", _LIKELIHOOD_CASES)
def test_continuous_decoder_outputs_the_mean_directly(likelihood, learn_scale):
    model = _continuous_model(likelihood, learn_scale)
    x = torch.randn(5, 6, dtype=torch.float64) * 3
    torch.manual_seed(1)
    recon, mu, logvar = model(x)
    torch.manual_seed(1)
    output, mu2, logvar2 = model.forward_output(x)
    torch.testing.assert_close(recon, output, rtol=0, atol=0)  # no sigmoid: the mean is any real
    assert recon.shape == (5, 6) and mu.shape == logvar.shape == (5, 3)
    torch.testing.assert_close(model.reconstruct(x), model.decoder(mu), rtol=0, atol=0)
    assert bool((model.sample(64) < 0).any())  # an untrained linear output layer: negative means too


@pytest.mark.parametrize("likelihood, learn_scale", _LIKELIHOOD_CASES + [("bernoulli", "none")])
def test_log_scale_is_a_parameter_of_the_documented_shape(likelihood, learn_scale):
    model = VAE(input_dim=6, hidden_dim=8, latent_dim=3, likelihood=likelihood, learn_scale=learn_scale)
    expected_shape = {"none": None, "shared": (), "feature": (6,)}[learn_scale]
    assert (model.likelihood, model.learn_scale) == (likelihood, learn_scale)
    if expected_shape is None:
        assert model.log_scale is None and "log_scale" not in model.state_dict()
    else:
        assert isinstance(model.log_scale, torch.nn.Parameter) and model.log_scale.shape == expected_shape
        assert bool((model.log_scale == 0).all())  # scale 1 at the start
        assert any(p is model.log_scale for p in model.parameters())  # an optimizer sees it
        assert "log_scale" in model.state_dict()
    assert model.loss_kwargs() == {"likelihood": likelihood, "logits": likelihood == "bernoulli", "log_scale": model.log_scale}


@pytest.mark.parametrize("likelihood, learn_scale", _LIKELIHOOD_CASES)
def test_loss_and_every_gradient_match_torch_distributions(likelihood, learn_scale):
    """model.loss(x) (the fused loss) against the negative ELBO from torch.distributions on the
    same forward pass (same seed, so the same z), and every parameter gradient, log_scale's
    included. float64: agreement to ~1e-12 is expected; 1e-9 leaves room for summation order."""
    model = _continuous_model(likelihood, learn_scale)
    x = torch.randn(7, 6, dtype=torch.float64) * 2 + 0.5
    for reduction, beta in (("sum", 1.0), ("mean", 0.3)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = model.loss(x, beta=beta, reduction=reduction)
        loss.backward()
        ours = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        per_sample = likelihood_oracle.negative_elbo(model, x, *model.forward_output(x), beta=beta)
        expected = per_sample.sum() if reduction == "sum" else per_sample.mean()
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
        for name, p in model.named_parameters():
            assert p.grad.abs().max() > 0, f"{name}: a zero gradient would make the check vacuous"
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.manual_seed(3)
        per_sample = model.loss(x, reduction="none")
        torch.manual_seed(3)
        expected = likelihood_oracle.negative_elbo(model, x, *model.forward_output(x))
    assert per_sample.shape == (7,)
    torch.testing.assert_close(per_sample, expected, rtol=1e-9, atol=0)


def test_bernoulli_loss_is_the_logits_path_of_the_fused_loss():
    torch.manual_seed(0)
    model, x = VAE(input_dim=64, hidden_dim=32, latent_dim=4), torch.rand(8, 64)
    torch.manual_seed(2)
    loss = model.loss(x, beta=0.5)
    torch.manual_seed(2)
    logits, mu, logvar = model.forward_logits(x)
    torch.testing.assert_close(loss, vae_fast.vae_loss(logits, x, mu, logvar, logits=True, beta=0.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x \(the target\) must lie in \[0, 1\]"):
        model.loss(x * 2 - 0.5)


def test_continuous_models_have_no_logits():
    model = VAE(input_dim=6, hidden_dim=8, latent_dim=3, likelihood="gaussian")
    for call in (lambda: model.forward_logits(torch.zeros(2, 6)), lambda: model.decode_logits(torch.zeros(2, 3))):
        with pytest.raises(ValueError, match="'gaussian', which has no logits.*forward_output"):
            call()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"likelihood": "normal"}, r"likelihood must be one of \('bernoulli', 'gaussian', 'laplace'.*\), got 'normal'"),
        ({"likelihood": "gaussian", "learn_scale": "element"}, r"learn_scale must be one of \('none', 'shared', 'feature'\), got 'element'"),
        ({"learn_scale": "shared"}, "learn_scale='shared' needs a 'gaussian' or 'laplace' likelihood"),
    ],
)
def test_bad_likelihood_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(input_dim=6, hidden_dim=8, latent_dim=3, **kwargs)


@pytest.mark.parametrize("likelihood, learn_scale", [("bernoulli", "none"), ("gaussian", "feature"), ("laplace", "shared")])
def test_checkpoint_rebuilds_the_model_with_its_learned_scale(tmp_path, likelihood, learn_scale):
    torch.manual_seed(0)
    model = VAE(input_dim=6, hidden_dims=(8, 5), latent_dim=2, likelihood=likelihood, learn_scale=learn_scale)
    loaded = checkpoint_round_trip(model, tmp_path)
    assert type(loaded) is VAE and loaded.config() == model.config()
    assert loaded.config() == {"model": "mlp", "input_dim": 6, "latent_dim": 2, "hidden_dims": [8, 5],
                               "likelihood": likelihood, "learn_scale": learn_scale}
    for (name, theirs), ours in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    x = torch.rand(4, 6)
    torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)


def test_a_checkpoint_from_before_likelihoods_loads_as_a_bernoulli_mlp():
    from vae_fast.checkpoints import CheckpointError, model_config, model_from_checkpoint

    torch.manual_seed(0)
    model = VAE(input_dim=6, hidden_dims=(8,), latent_dim=2)
    old = {"model_config": {"input_dim": 6, "latent_dim": 2, "hidden_dims": [8]}, "model": model.state_dict()}
    assert model_config(old) == model.config()
    loaded = model_from_checkpoint(old)
    assert (loaded.likelihood, loaded.learn_scale, loaded.log_scale) == ("bernoulli", "none", None)
    # A learned scale whose configuration says there is none does not load silently.
    gaussian = VAE(input_dim=6, hidden_dims=(8,), latent_dim=2, likelihood="gaussian", learn_scale="shared")
    mismatched = {"model_config": {**gaussian.config(), "learn_scale": "none"}, "model": gaussian.state_dict()}
    with pytest.raises(CheckpointError, match="log_scale"):
        model_from_checkpoint(mismatched)
    with pytest.raises(CheckpointError, match="unknown model kind 'rnn'"):
        model_from_checkpoint({"model_config": {**model.config(), "model": "rnn"}, "model": model.state_dict()})


@requires_cuda
@pytest.mark.parametrize("likelihood, learn_scale", [("gaussian", "feature"), ("laplace", "shared")])
def test_cuda_continuous_training_step(likelihood, learn_scale):
    torch.manual_seed(0)
    model = VAE(likelihood=likelihood, learn_scale=learn_scale).cuda()
    loss = model.loss(torch.randn(8, 784, device="cuda"))
    loss.backward()
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    assert model.log_scale.grad is not None and bool(torch.isfinite(model.log_scale.grad).all())
