"""`vae_fast.VAE`: the PyTorch examples' VAE (pytorch/examples, vae/main.py) as a drop-in that trains
faster, with optional extra hidden layers.

Drop-in contract: `recon, mu, logvar = model(x)` with x of shape (B, 1, 28, 28) or (B, 784), recon
holding probabilities, and `vae_fast.loss_function(recon, x, mu, logvar)` as the loss. What makes it
faster, all exact: the fused reparameterization kernel, one GEMM for both encoder heads, in-place
ReLUs, and `forward_logits` for code that can take the decoder's logits (the fused loss's
`logits=True` path skips the sigmoid's backward and needs no log(0) clamping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import reference
from .functional import reparameterize as fused_reparameterize

__all__ = ["VAE"]


def _check_positive_dim(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"VAE: {name} must be a positive integer, got {value!r}")
    return value


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers through `dims`, a ReLU after each but the last (whose output is a pre-activation)."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        if index:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Bernoulli-decoder VAE with a diagonal Gaussian posterior and an N(0, I) prior.

    Args:
        input_dim: features per sample D (784 for MNIST; inputs may be images whose per-sample
            element count is D).
        hidden_dim: width of the single hidden layer of encoder and decoder (the example's 400).
        latent_dim: L, the size of z.
        hidden_dims: several hidden layers instead, encoder widths in order (the decoder mirrors
            them); overrides `hidden_dim`.
        fused: draw z with the fused `vae_fast.reparameterize` kernel (True) or the pure-torch
            reference (False); both are exact, the reference is for comparison and debugging.
    Raises:
        ValueError when a dimension is not a positive integer or `hidden_dims` is empty.

    With no arguments it is the examples' 784-400-20-400-784 network. Like the example (and the
    paper), `forward` samples z in eval mode too; `reconstruct` gives the mean reconstruction.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dim: int = 400,
        latent_dim: int = 20,
        *,
        hidden_dims: Sequence[int] | None = None,
        fused: bool = True,
    ):
        super().__init__()
        if hidden_dims is None:
            hidden_dims = (hidden_dim,)
        hidden_dims = tuple(hidden_dims)
        if not hidden_dims:
            raise ValueError("VAE: hidden_dims must name at least one hidden layer width, got ()")
        self.input_dim = _check_positive_dim("input_dim", input_dim)
        self.latent_dim = _check_positive_dim("latent_dim", latent_dim)
        self.hidden_dims = tuple(_check_positive_dim("hidden_dims entry", h) for h in hidden_dims)
        self.fused = bool(fused)
        self.encoder = _mlp((self.input_dim, *self.hidden_dims))
        # mu and logvar from one [H, 2L] GEMM instead of the example's two [H, L] ones.
        self.encoder_heads = nn.Linear(self.hidden_dims[-1], 2 * self.latent_dim)
        self.decoder = _mlp((self.latent_dim, *reversed(self.hidden_dims), self.input_dim))

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild this architecture (stored in checkpoints)."""
        return {"input_dim": self.input_dim, "latent_dim": self.latent_dim, "hidden_dims": list(self.hidden_dims)}

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        per_sample = math.prod(x.shape[1:]) if x.dim() > 1 else x.numel()
        if per_sample != self.input_dim:
            raise ValueError(
                f"VAE: expected input_dim={self.input_dim} features per sample, got input of shape "
                f"{tuple(x.shape)} ({per_sample} per sample)"
            )
        return x.reshape(-1, self.input_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, D] or [B, *image] with D elements per sample -> (mu, logvar), each [B, L]."""
        h = torch.relu_(self.encoder(self._flatten(x)))
        return self.encoder_heads(h).chunk(2, dim=1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I) from torch's global generator."""
        if self.fused:
            return fused_reparameterize(mu, logvar)
        return reference.reparameterize(mu, logvar)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, L] -> Bernoulli logits [B, D]."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, L] -> Bernoulli means (probabilities) [B, D], as the example's `decode`."""
        return torch.sigmoid(self.decode_logits(z))

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like `forward` but returns the decoder's logits: pair it with
        `vae_fast.vae_loss(logits, x, mu, logvar, logits=True)`, the fastest training path."""
        mu, logvar = self.encode(x)
        return self.decode_logits(self.reparameterize(mu, logvar)), mu, logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, D] or [B, *image] -> (recon probabilities [B, D], mu [B, L], logvar [B, L]).

        z is sampled in eval mode too, as in the example. Raises ValueError for a wrong input width.
        """
        logits, mu, logvar = self.forward_logits(x)
        # Plain probabilities, as in the example: the loss's gradient must reach the parameters
        # through recon (and its sigmoid), so that autograd.grad(loss, recon), recon.retain_grad()
        # and in-place edits of recon behave as they do there. The logits path is forward_logits.
        return torch.sigmoid(logits), mu, logvar

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic reconstruction decode(mu(x)), probabilities [B, D]."""
        mu, _ = self.encode(x)
        return self.decode(mu)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws z ~ N(0, I) decoded to probabilities [n, D], on the model's device and dtype."""
        weight = self.encoder_heads.weight
        z = torch.randn(n, self.latent_dim, generator=generator, device=weight.device, dtype=weight.dtype)
        return self.decode(z)
