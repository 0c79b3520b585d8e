"""The whole-training-step case: one step of the PyTorch examples' VAE training loop (zero_grad,
forward, loss, backward, Adam step), with the example's own model and loss ("eager"), with that same
code under `torch.compile` ("compiled"), and with `vae_fast.VAE` and `vae_fast.loss_function`
("fused"). Each implementation trains its own model, initialized from the same seed. A step reads a
new batch each time, so this case has the "cold" mode only.
"""

from __future__ import annotations

import torch
from torch import nn

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


# --- The TrainStep contenders (benchmarks/bench_vae_training.py --suite train-step): what a user with
# a VAE of their own would try to speed up a whole training step, from the same weights.

CONV_CHANNELS = (32, 64)


class ExampleConvVAE(nn.Module):
    """The widely copied convolutional VAE for 28x28 digits (PyTorch-VAE's VanillaVAE without batch
    norm): Conv2d(k4, s2, p1) 1->32->64 with LeakyReLU, a Linear to [mu, logvar] (20 each), and
    back through Linear and ConvTranspose2d 64->32->1, sigmoid output. Its parameters carry
    `vae_fast.ConvVAE`'s names, so either loads the other's weights."""

    def __init__(self):
        super().__init__()
        wide, narrow = CONV_CHANNELS[1], CONV_CHANNELS[0]
        self.encoder = nn.Sequential(nn.Conv2d(1, narrow, 4, 2, 1), nn.LeakyReLU(inplace=True),
                                     nn.Conv2d(narrow, wide, 4, 2, 1), nn.LeakyReLU(inplace=True))
        self.encoder_heads = nn.Linear(wide * 7 * 7, 2 * LATENT)
        self.decoder_input = nn.Sequential(nn.Linear(LATENT, wide * 7 * 7), nn.LeakyReLU(inplace=True))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(wide, narrow, 4, 2, 1), nn.LeakyReLU(inplace=True),
                                     nn.ConvTranspose2d(narrow, 1, 4, 2, 1))

    def encode(self, x):
        mu, logvar = self.encoder_heads(self.encoder(x.view(-1, 1, 28, 28)).flatten(1)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        return torch.sigmoid(self.decoder(self.decoder_input(z).view(-1, CONV_CHANNELS[1], 7, 7)))

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decode(z), mu, logvar


def example_elbo(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The example's loss (summed BCE of probabilities + KL) for either example model."""
    recon, mu, logvar = model(x)
    return example_loss_function(recon.reshape(len(x), -1), x.reshape(len(x), -1), mu, logvar)


def fused_elbo(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """vae_fast's fastest loss: the model's logits and `vae_loss(logits=True)`."""
    logits, mu, logvar = model.forward_output(x)
    return vae_fast.vae_loss(logits, x.reshape(logits.shape), mu, logvar, logits=True)


def example_model(kind: str) -> nn.Module:
    """The example model of `kind` ("mlp" or "conv"), its weights drawn from torch's generator."""
    if kind == "mlp":
        return ExampleVAE()
    model = ExampleConvVAE()
    model.load_state_dict(vae_fast.ConvVAE((1, 28, 28), LATENT, channels=CONV_CHANNELS).state_dict())
    return model


def vae_fast_model(kind: str, example: nn.Module) -> nn.Module:
    """vae_fast's model of `kind` holding `example`'s weights."""
    if kind == "conv":
        model = vae_fast.ConvVAE((1, 28, 28), LATENT, channels=CONV_CHANNELS)
        model.load_state_dict(example.state_dict())
        return model
    model = vae_fast.VAE()
    with torch.no_grad():
        for ours, theirs in ((model.encoder[0], example.fc1), (model.decoder[0], example.fc3), (model.decoder[2], example.fc4)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        model.encoder_heads.weight.copy_(torch.cat([example.fc21.weight, example.fc22.weight]))
        model.encoder_heads.bias.copy_(torch.cat([example.fc21.bias, example.fc22.bias]))
    return model


def eager_step(model: nn.Module, loss_fn, *, lr: torch.Tensor | float = LEARNING_RATE, compile_optimizer: bool = False):
    """The example's loop: zero_grad, loss_fn(model, x).backward(), Adam (torch's default, foreach).
    compile_optimizer: Adam's step under torch.compile with a tensor lr, as PyTorch's tutorial
    "Compiling the optimizer" writes it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    optimizer_step = torch.compile(optimizer.step, fullgraph=False) if compile_optimizer else optimizer.step

    def step(x):
        optimizer.zero_grad()
        loss = loss_fn(model, x)
        loss.backward()
        optimizer_step()
        return loss.detach()

    return step


def train_step_contenders(kind: str, device: torch.device, *, torch_only: bool = False) -> dict:
    """name -> (model, step(x)) for `kind` ("mlp", "conv"), every model from the same weights; the
    first is the baseline. torch_only: the contenders that need nothing of vae_fast's extension
    (for another torch's process): TrainStep on the example's model and loss is pure Python."""
    torch._dynamo.reset()
    example = example_model(kind).to(device)

    def twin():
        model = example_model(kind).to(device)
        model.load_state_dict(example.state_dict())
        return model

    compiled, overhead = twin(), twin()
    lr = torch.tensor(LEARNING_RATE, device=device)
    contenders = {
        "eager (the example's loop)": (example, eager_step(example, example_elbo)),
        "torch.compile of model+loss": (compiled, eager_step(compiled, torch.compile(example_elbo))),
        "torch.compile reduce-overhead, step + compiled Adam (tensor lr)": (
            overhead, eager_step(overhead, torch.compile(example_elbo, mode="reduce-overhead"), lr=lr, compile_optimizer=True)),
    }
    users = twin()
    contenders["TrainStep, the example's model and loss, fused Adam"] = (
        users, vae_fast.TrainStep(users, torch.optim.Adam(users.parameters(), lr=LEARNING_RATE, fused=True), example_elbo,
                                  cuda_graph=False))
    if torch_only:
        return contenders
    fast = vae_fast_model(kind, example).to(device)
    contenders["TrainStep, vae_fast model + fused loss, fused Adam"] = (
        fast, vae_fast.TrainStep(fast, torch.optim.Adam(fast.parameters(), lr=LEARNING_RATE, fused=True), fused_elbo,
                                 cuda_graph=False))
    if device.type == "cuda":
        for name, model, loss_fn in (("the example's model and loss", twin(), example_elbo),
                                     ("vae_fast model + fused loss", vae_fast_model(kind, example).to(device), fused_elbo)):
            optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, capturable=True)
            contenders[f"TrainStep + CUDA graph, {name}"] = (model, vae_fast.TrainStep(model, optimizer, loss_fn, cuda_graph=True))
    return contenders
