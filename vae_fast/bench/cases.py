"""What `vae-fast bench` measures: one Case per (op, pass, batch, latent size, dtype, device), holding
a zero-argument callable per implementation: "fused" (vae_fast), "eager" (the baselines of
`vae_fast.baselines`) and "compiled" (`torch.compile` of that same eager code).

Each case is measured in two modes (MODES), every implementation reading the same inputs in the
same order:
- "warm": one input set, the same every call, as a training step sees them (the decoder has just
  written `recon`): whatever fits in the caches is found there.
- "cold": input sets that rotate and together are several times the last-level cache, so a large
  size is not flattered by finding its inputs still cached from the previous call.
Backward passes run as a training step's do: each call sets the inputs' `.grad` to None, then
`backward()` leaves the gradients there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

import vae_fast
from vae_fast.baselines import (
    eager_loss_gaussian,
    eager_loss_laplace,
    eager_loss_logits,
    eager_loss_probs,
    eager_reparameterize,
)

FEATURES = 784  # MNIST, as in the PyTorch examples' VAE
IMPLEMENTATIONS = ("fused", "eager", "compiled")
MODES = ("warm", "cold")


@dataclass(frozen=True)
class LossOp:
    """A loss case's likelihood and the eager code it is measured against. Gaussian and Laplace run
    with one shared learned log_scale (the common sigma-VAE set-up), which gets a gradient too."""

    likelihood: str
    logits: bool
    eager: Callable

    @property
    def learned_scale(self) -> bool:
        return self.likelihood != "bernoulli"


LOSS_OPS = {
    "loss_probs": LossOp("bernoulli", False, eager_loss_probs),
    "loss_logits": LossOp("bernoulli", True, eager_loss_logits),
    "loss_gaussian": LossOp("gaussian", False, eager_loss_gaussian),
    "loss_laplace": LossOp("laplace", False, eager_loss_laplace),
}
# Enough sets to cover small sizes' rotation without spending minutes creating them.
MAX_INPUT_SETS = 1024


class Unavailable(Exception):
    """A case that cannot run in this build or on this device; the message says why."""


@dataclass
class Case:
    op: str  # "reparameterize", "loss_probs", "loss_logits" or "train_step"
    pass_: str  # "fwd", "fwd+bwd" or "step"
    batch: int
    latent: int
    dtype: torch.dtype
    device: torch.device
    ideal_bytes: int | None  # None where a bandwidth figure would mean nothing (matmul-bound)
    input_sets: int
    # mode ("warm", "cold") -> implementation -> zero-argument call
    modes: dict[str, dict[str, Callable[[], object]]] = field(default_factory=dict)
    checksum: float | None = None  # of the inputs, see input_checksum
    rotation_bytes: int | None = None  # what the input sets were sized to exceed

    @property
    def label(self) -> str:
        return f"{self.op} {self.pass_} B={self.batch} L={self.latent} {dtype_name(self.dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def input_set_count(set_bytes: int, rotation_bytes: int) -> int:
    return max(2, min(MAX_INPUT_SETS, -(-rotation_bytes // set_bytes)))


INPUT_SEED = 1234


def input_generator(device: torch.device) -> torch.Generator:
    """The source of a case's inputs: seeded, so that another process (another torch build timing
    the baselines, `vae-fast bench --baseline-python`) builds the very same input sets."""
    return torch.Generator(device=device).manual_seed(INPUT_SEED)


def input_checksum(case_sets: list[tuple]) -> float:
    """A float64 sum over every input tensor of a case, to check two processes built the same ones."""
    return float(sum(float(t.detach().double().sum()) for tensors in case_sets for t in tensors))


def rotating(call: Callable, input_sets: list[tuple]) -> Callable[[], object]:
    """A callable that runs `call` on the next input set each time, cycling."""
    sets = itertools.cycle(input_sets)
    return lambda: call(*next(sets))


def repeating(call: Callable, inputs: tuple) -> Callable[[], object]:
    """A callable that runs `call` on the same inputs every time."""
    return lambda: call(*inputs)


def in_both_modes(calls: dict[str, Callable], input_sets: list[tuple]) -> dict[str, dict[str, Callable[[], object]]]:
    """Each implementation's call on the first input set alone ("warm") and on all of them in turn ("cold")."""
    return {
        "warm": {name: repeating(call, input_sets[0]) for name, call in calls.items()},
        "cold": {name: rotating(call, input_sets) for name, call in calls.items()},
    }


def forward_backward(forward: Callable, grad_output_arg: bool = False) -> Callable:
    """forward, then backward as a training step runs it: the differentiated inputs' `.grad` set to
    None first (zero_grad), the gradients left in `.grad`. With grad_output_arg, the last argument
    is the output's gradient rather than an input of `forward`."""

    def call(*args):
        inputs, grad_output = (args[:-1], args[-1]) if grad_output_arg else (args, None)
        for t in inputs:
            t.grad = None
        forward(*inputs).backward(grad_output)

    return call


def compiled(fn: Callable) -> Callable:
    # A fresh dynamo state per case: static shapes for each size (the compiler's best case), and
    # dozens of sizes never reach the recompile limit, past which dynamo would silently run eager.
    torch._dynamo.reset()
    return torch.compile(fn)


def loss_ideal_bytes(batch: int, latent: int, itemsize: int, *, backward: bool, features: int = FEATURES) -> int:
    """Read recon, x, mu, logvar once; with backward also write grad_recon, grad_mu, grad_logvar."""
    reads = (2 * batch * features + 2 * batch * latent) * itemsize
    writes = (batch * features + 2 * batch * latent) * itemsize if backward else 0
    return reads + writes


def reparameterize_ideal_bytes(batch: int, latent: int, itemsize: int, *, backward: bool) -> int:
    """Forward reads mu, logvar and writes z; backward reads grad_z, z, mu and writes grad_logvar
    (grad_mu is grad_z itself, no copy)."""
    return (7 if backward else 3) * batch * latent * itemsize


def loss_case(
    op: str, batch: int, latent: int, *, backward: bool, dtype: torch.dtype, device: torch.device, rotation_bytes: int
) -> Case:
    spec = LOSS_OPS[op]
    gen = input_generator(device)

    if spec.learned_scale:
        def fused(recon, x, mu, logvar, log_scale):
            return vae_fast.vae_loss(recon, x, mu, logvar, likelihood=spec.likelihood, log_scale=log_scale)
    else:
        def fused(recon, x, mu, logvar):
            return vae_fast.vae_loss(recon, x, mu, logvar, logits=spec.logits)

    def make_set():
        if spec.learned_scale:
            recon = torch.randn(batch, FEATURES, dtype=dtype, device=device, generator=gen)
            x = recon + 0.5 * torch.randn(batch, FEATURES, dtype=dtype, device=device, generator=gen)
        elif spec.logits:
            recon = torch.randn(batch, FEATURES, dtype=dtype, device=device, generator=gen)
        else:
            # Strictly inside (0, 1): BCE's logs stay finite, and no implementation takes a clamp path.
            recon = torch.rand(batch, FEATURES, dtype=dtype, device=device, generator=gen).clamp_(0.01, 0.99)
        if not spec.learned_scale:
            x = torch.rand(batch, FEATURES, dtype=dtype, device=device, generator=gen)
        mu = torch.randn(batch, latent, dtype=dtype, device=device, generator=gen)
        logvar = 0.5 * torch.randn(batch, latent, dtype=dtype, device=device, generator=gen)
        differentiated = [recon, mu, logvar]
        tensors = [recon, x, mu, logvar]
        if spec.learned_scale:
            log_scale = torch.tensor(-0.5, dtype=dtype, device=device)
            differentiated.append(log_scale)
            tensors.append(log_scale)
        for t in differentiated:
            t.requires_grad_(backward)
        return tuple(tensors)

    itemsize = torch.empty((), dtype=dtype).element_size()
    set_bytes = (2 * batch * FEATURES + 2 * batch * latent) * itemsize
    input_sets = [make_set() for _ in range(input_set_count(set_bytes, rotation_bytes))]

    implementations = {"fused": fused, "eager": spec.eager, "compiled": compiled(spec.eager)}
    if backward:
        implementations = {name: forward_backward(fn) for name, fn in implementations.items()}

    return Case(
        op=op,
        pass_="fwd+bwd" if backward else "fwd",
        batch=batch,
        latent=latent,
        dtype=dtype,
        device=device,
        ideal_bytes=loss_ideal_bytes(batch, latent, itemsize, backward=backward),
        input_sets=len(input_sets),
        modes=in_both_modes(implementations, input_sets),
        checksum=input_checksum(input_sets),
        rotation_bytes=rotation_bytes,
    )


def reparameterize_case(
    batch: int, latent: int, *, backward: bool, dtype: torch.dtype, device: torch.device, rotation_bytes: int
) -> Case:
    gen = input_generator(device)

    def make_set():
        mu = torch.randn(batch, latent, dtype=dtype, device=device, requires_grad=backward, generator=gen)
        logvar = (0.5 * torch.randn(batch, latent, dtype=dtype, device=device, generator=gen)).requires_grad_(backward)
        grad_z = torch.randn(batch, latent, dtype=dtype, device=device, generator=gen)
        return (mu, logvar, grad_z) if backward else (mu, logvar)

    itemsize = torch.empty((), dtype=dtype).element_size()
    set_bytes = (3 if backward else 2) * batch * latent * itemsize
    input_sets = [make_set() for _ in range(input_set_count(set_bytes, rotation_bytes))]

    implementations = {
        "fused": vae_fast.reparameterize,
        "eager": eager_reparameterize,
        "compiled": compiled(eager_reparameterize),
    }
    if backward:
        implementations = {name: forward_backward(fn, grad_output_arg=True) for name, fn in implementations.items()}

    return Case(
        op="reparameterize",
        pass_="fwd+bwd" if backward else "fwd",
        batch=batch,
        latent=latent,
        dtype=dtype,
        device=device,
        ideal_bytes=reparameterize_ideal_bytes(batch, latent, itemsize, backward=backward),
        input_sets=len(input_sets),
        checksum=input_checksum(input_sets),
        rotation_bytes=rotation_bytes,
        modes=in_both_modes(implementations, input_sets),
    )


def op_case(
    op: str, pass_: str, batch: int, latent: int, *, dtype: torch.dtype, device: torch.device, rotation_bytes: int
) -> Case:
    """The case for an op name of this module ("reparameterize", "loss_probs", "loss_logits")."""
    backward = {"fwd": False, "fwd+bwd": True}[pass_]
    if op == "reparameterize":
        return reparameterize_case(batch, latent, backward=backward, dtype=dtype, device=device, rotation_bytes=rotation_bytes)
    return loss_case(op, batch, latent, backward=backward, dtype=dtype, device=device, rotation_bytes=rotation_bytes)
