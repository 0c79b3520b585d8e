"""The whole-training-step case: one step of the PyTorch examples' VAE training loop (zero_grad,
forward, loss, backward, Adam step), with the example's own model and loss ("eager"), with that same
code under `torch.compile` ("compiled"), and with `vae_fast.VAE` and `vae_fast.loss_function`
("fused"). Each implementation trains its own model, initialized from the same seed. A step reads a
new batch each time, so this case has the "cold" mode only.
"""

from __future__ import annotations

import torch

import vae_fast
from vae_fast.baselines import ExampleVAE, example_loss_function

from .cases import Case, Unavailable, compiled, input_set_count, rotating

LATENT = 20  # the example's architecture: 784-400-20-400-784
LEARNING_RATE = 1e-3  # the example's Adam


def _train_step(model_loss, optimizer):
    def step(data):
        optimizer.zero_grad()
        model_loss(data).backward()
        optimizer.step()

    return step


def _model_loss(model, loss_function):
    def model_loss(data):
        recon, mu, logvar = model(data)
        return loss_function(recon, data, mu, logvar)

    return model_loss


def _fast_vae_class():
    cls = getattr(vae_fast, "VAE", None)
    if cls is None:
        raise Unavailable("vae_fast.VAE is not in this build yet (vae_fast/model.py); row skipped")
    return cls


def _fast_model_loss(model, *, logits: bool):
    if not logits:
        return _model_loss(model, vae_fast.loss_function)

    def model_loss(data):
        recon_logits, mu, logvar = model.forward_logits(data)
        return vae_fast.vae_loss(recon_logits, data, mu, logvar, logits=True)

    return model_loss


def training_step_case(batch: int, *, logits: bool, device: torch.device, rotation_bytes: int) -> Case:
    """op "train_step": vae_fast.VAE as a drop-in (probabilities, `vae_fast.loss_function`);
    op "train_step_logits": its fastest path (`forward_logits` and the fused loss on logits).
    The eager and compiled baselines are the example's code either way.
    Raises Unavailable when vae_fast.VAE is missing."""
    fast_vae = _fast_vae_class()
    models = {}
    for name, cls in (("fused", fast_vae), ("eager", ExampleVAE), ("compiled", ExampleVAE)):
        torch.manual_seed(0)
        models[name] = cls().to(device)
    model_losses = {
        "fused": _fast_model_loss(models["fused"], logits=logits),
        "eager": _model_loss(models["eager"], example_loss_function),
        "compiled": compiled(_model_loss(models["compiled"], example_loss_function)),
    }
    # MNIST-shaped batches, as the example's DataLoader yields them.
    set_bytes = batch * 784 * 4
    input_sets = [(torch.rand(batch, 1, 28, 28, device=device),) for _ in range(input_set_count(set_bytes, rotation_bytes))]
    runs = {
        name: rotating(_train_step(model_loss, torch.optim.Adam(models[name].parameters(), lr=LEARNING_RATE)), input_sets)
        for name, model_loss in model_losses.items()
    }
    return Case(
        op="train_step_logits" if logits else "train_step",
        pass_="step",
        batch=batch,
        latent=LATENT,
        dtype=torch.float32,
        device=device,
        ideal_bytes=None,
        input_sets=len(input_sets),
        modes={"cold": runs},
    )
