"""The TrainStep benchmark's contenders (vae_fast.bench.training) start where the comparison says:
every contender's model holds the example's weights (vae_fast's MLP VAE with both heads stacked in
one layer, its conv VAE under the same parameter names), so the same input gives the same
posterior and the same decoder output in each."""

import pytest
import torch

from vae_fast.bench.training import example_model, train_step_contenders, vae_fast_model


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_vae_fast_model_holds_the_examples_weights(kind):
    torch.manual_seed(0)
    example = example_model(kind)
    ours = vae_fast_model(kind, example)
    x, z = torch.rand(5, 784), torch.randn(5, 20)
    for a, b in zip(ours.encode(x), example.encode(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.decode(z).reshape(5, -1), example.decode(z).reshape(5, -1), rtol=1e-5, atol=1e-6)


def test_every_contender_starts_from_the_same_weights_and_steps():
    torch.manual_seed(0)
    contenders = train_step_contenders("mlp", torch.device("cpu"))
    x = torch.rand(16, 784)
    mu = [model.encode(x)[0] for model, _ in contenders.values()]
    assert all(torch.equal(m, mu[0]) or torch.allclose(m, mu[0], rtol=1e-5, atol=1e-6) for m in mu)
    for name, (model, step) in contenders.items():
        if "compile" not in name:  # compiling takes ~20 s on 2 cores; the benchmark's own run covers it
            assert torch.isfinite(step(x)), name
    assert not torch.equal(contenders["eager (the example's loop)"][0].encode(x)[0], mu[0])  # a step was taken
