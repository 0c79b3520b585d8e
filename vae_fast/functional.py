"""The public functions: argument checks, then the fused kernels where the compiled extension
serves the device, else the pure-torch reference (`vae_fast.reference`)."""

from __future__ import annotations

import math
import numbers

import torch

from . import _extension, ops, reference  # noqa: F401  (ops registers autograd and fake kernels)

__all__ = ["reparameterize", "vae_loss", "loss_function"]

REDUCTIONS = ("sum", "mean", "none")


def _require_float_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {value.dtype}")


def _common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mixed float dtypes (e.g. a bf16 decoder output against float32 data) are promoted once here;
    the kernels take a single dtype."""
    dtype = tensors[0].dtype
    if all(t.dtype == dtype for t in tensors):  # the common case costs no promotion lookups
        return tensors
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def _check_same_device(fn: str, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    first = tensors[0].device
    for name, t in zip(names, tensors):
        if t.device != first:
            raise ValueError(f"{fn}: {name} is on {t.device} but {names[0]} is on {first}")


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample z = mu + exp(0.5 * logvar) * eps with eps ~ N(0, I), drawn inside the fused kernel.

    Args:
        mu, logvar: floating tensors of one shape (any shape, typically [B, L]) on one device.
        generator: optional torch.Generator of that device; by default torch's global generator, so
            `torch.manual_seed` reproduces the draw.
    Returns:
        z, shape and dtype of mu. Gradients: dz/dmu = 1, dz/dlogvar = 0.5 * (z - mu).
    Raises:
        TypeError for a non-tensor or non-floating input, ValueError for mismatched shapes or devices.
    """
    for name, value in (("mu", mu), ("logvar", logvar)):
        _require_float_tensor("reparameterize", name, value)
    if mu.shape != logvar.shape:
        raise ValueError(f"reparameterize: mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    _check_same_device("reparameterize", ("mu", "logvar"), (mu, logvar))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"reparameterize: generator must be a torch.Generator or None, got {type(generator).__name__}")
    mu, logvar = _common_dtype(mu, logvar)
    if not _extension.serves(mu.device):
        return reference.reparameterize(mu, logvar, generator=generator)
    return torch.ops.vae_fast.reparameterize(mu, logvar, generator)


_LOSS_ARGS = ("recon", "x", "mu", "logvar")


def _check_loss_args(recon, x, mu, logvar, beta, reduction) -> float:
    for name, value in zip(_LOSS_ARGS, (recon, x, mu, logvar)):
        _require_float_tensor("vae_loss", name, value)
    if recon.dim() == 0:
        raise ValueError("vae_loss: recon must have a batch dimension, got a 0-d tensor")
    batch = recon.shape[0]
    for name, value in (("x", x), ("mu", mu), ("logvar", logvar)):
        if value.dim() == 0 or value.shape[0] != batch:
            raise ValueError(
                f"vae_loss: {name} must have batch size {batch} (recon.shape[0]), got shape {tuple(value.shape)}"
            )
    per_sample = math.prod(recon.shape[1:])
    x_per_sample = math.prod(x.shape[1:])
    if per_sample != x_per_sample:
        raise ValueError(
            f"vae_loss: recon has {per_sample} elements per sample but x has {x_per_sample} "
            f"(shapes {tuple(recon.shape)} and {tuple(x.shape)})"
        )
    if mu.shape != logvar.shape:
        raise ValueError(f"vae_loss: mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    _check_same_device("vae_loss", _LOSS_ARGS, (recon, x, mu, logvar))
    if isinstance(beta, torch.Tensor) and beta.numel() == 1:
        beta = beta.item()
    # type() first: the common float/int case skips the slower abstract-class check
    if type(beta) not in (float, int) and (isinstance(beta, bool) or not isinstance(beta, numbers.Real)):
        raise TypeError(f"vae_loss: beta must be a real number, got {type(beta).__name__}")
    if not beta >= 0:  # also rejects NaN
        raise ValueError(f"vae_loss: beta must be a non-negative number, got {beta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"vae_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return float(beta)


def vae_loss(
    recon: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    logits: bool = False,
    beta: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """The negative ELBO of a Bernoulli-decoder VAE, in one fused pass.

    per-sample loss = sum_features BCE(recon, x) + beta * sum_latents KL_j,
    KL_j = -0.5 * (1 + logvar - mu^2 - exp(logvar)).

    Args:
        recon: [B, ...] decoder output: probabilities in [0, 1], or logits when `logits=True`
            (the numerically safer choice: no log(0) clamping, exact gradients when saturated).
        x: [B, ...] targets in [0, 1], any shape with recon's number of elements per sample
            (e.g. images [B, 1, 28, 28] against recon [B, 784]).
        mu, logvar: [B, L] posterior mean and log-variance.
        beta: weight of the KL term, >= 0 (beta-VAE).
        reduction: "sum" over the batch (the PyTorch examples' convention), "mean" over the batch,
            or "none" for the [B] per-sample losses.
    Returns:
        The loss, float32 for float32/float16/bfloat16 inputs and float64 for float64 inputs.
    Raises:
        TypeError for non-tensors or non-floating dtypes; ValueError for mismatched shapes, batch
        sizes or devices, an unknown reduction, a negative beta, and (on CPU) probabilities or
        targets outside [0, 1]. NaN inputs give a NaN loss; a logvar whose exp overflows gives +inf.
    """
    beta = _check_loss_args(recon, x, mu, logvar, beta, reduction)
    recon, x, mu, logvar = _common_dtype(recon, x, mu, logvar)
    if not _extension.serves(recon.device):
        return reference.vae_loss(recon, x, mu, logvar, logits=logits, beta=beta, reduction=reduction)
    if torch.is_grad_enabled():
        grad_mask = [t.requires_grad for t in (recon, x, mu, logvar)]
    else:
        grad_mask = [False] * 4
    return torch.ops.vae_fast.vae_loss(recon, x, mu, logvar, bool(logits), beta, reduction, grad_mask)[0]


def loss_function(recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Drop-in for the PyTorch examples' VAE `loss_function`: summed BCE of probabilities + KL."""
    return vae_loss(recon_x, x, mu, logvar)
