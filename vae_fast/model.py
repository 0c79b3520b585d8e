"""`vae_fast.VAE`: the PyTorch examples' VAE (pytorch/examples, vae/main.py) as a drop-in that trains
faster, with optional extra hidden layers and a Gaussian or Laplace decoder for continuous data.

Drop-in contract: `recon, mu, logvar = model(x)` with x of shape (B, 1, 28, 28) or (B, 784), recon
holding probabilities, and `vae_fast.loss_function(recon, x, mu, logvar)` as the loss. What makes it
faster, all exact: the fused reparameterization kernel, one GEMM for both encoder heads, in-place
ReLUs, and `forward_logits` for code that can take the decoder's logits (the fused loss's
`logits=True` path skips the sigmoid's backward and needs no log(0) clamping).

`LikelihoodVAE` is what `VAE` and `vae_fast.ConvVAE` share: the decoder's likelihood, its learned
scale, sampling of z, and the one-line loss. A subclass supplies `encode`, `decode_output` and the
per-sample shape of its output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import reference
from .functional import reparameterize as fused_reparameterize
from .functional import vae_loss

__all__ = ["VAE", "LikelihoodVAE", "LIKELIHOODS", "LEARN_SCALES"]

LIKELIHOODS = reference.LIKELIHOODS
LEARN_SCALES = ("none", "shared", "feature")


def _check_positive_dim(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers through `dims`, a ReLU after each but the last (whose output is a pre-activation)."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        if index:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


class LikelihoodVAE(nn.Module):
    """What every vae_fast model shares: a diagonal Gaussian posterior q(z|x) = N(mu, exp(logvar)),
    an N(0, I) prior, and a decoder likelihood p(x|z) that the fused `vae_fast.vae_loss` reads.

    Subclasses call `_init_likelihood` in their constructor and define `latent_dim`, `input_dim`
    (elements per sample), `encode(x) -> (mu, logvar)`, `decode_output(z)` and `encoder_heads`
    (the Linear layer giving [mu, logvar]; its weight tells the model's device and dtype).

    Attributes:
        likelihood: "bernoulli" (decode_output gives logits), "gaussian" (the mean) or "laplace"
            (the location).
        learn_scale: "none" (a fixed unit scale for gaussian/laplace; always so for bernoulli),
            "shared" (one learned log-scale) or "feature" (one per element of a sample).
        log_scale: the learned log of the decoder's standard deviation (gaussian) or scale b
            (laplace): an nn.Parameter of shape () ("shared") or the output's per-sample shape
            ("feature"), initialised to 0 (scale 1); None when learn_scale is "none".
        fused: whether z is drawn by the fused `vae_fast.reparameterize` kernel (else the reference).
    """

    likelihood: str
    learn_scale: str
    latent_dim: int

    def _init_likelihood(self, owner: str, likelihood: str, learn_scale: str, per_sample_shape: tuple[int, ...], fused: bool) -> None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"{owner}: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if learn_scale not in LEARN_SCALES:
            raise ValueError(f"{owner}: learn_scale must be one of {LEARN_SCALES}, got {learn_scale!r}")
        if likelihood == "bernoulli" and learn_scale != "none":
            raise ValueError(f"{owner}: learn_scale={learn_scale!r} needs a 'gaussian' or 'laplace' likelihood; "
                             "the Bernoulli likelihood has no scale to learn (use learn_scale='none')")
        self.likelihood, self.learn_scale, self.fused = likelihood, learn_scale, bool(fused)
        shape = {"none": None, "shared": (), "feature": per_sample_shape}[learn_scale]
        # A parameter, so it is in state_dict (checkpoints), parameters() (optimizers) and follows
        # .to()/.double() with the rest; log-parameterised so that any real value is a valid scale.
        self.log_scale = None if shape is None else nn.Parameter(torch.zeros(shape))

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I) from torch's global generator."""
        if self.fused:
            return fused_reparameterize(mu, logvar)
        return reference.reparameterize(mu, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, L] -> the mean of p(x|z): probabilities for bernoulli, the decoder's output (any
        real) for gaussian and laplace (whose mean is their location)."""
        output = self.decode_output(z)
        return torch.sigmoid(output) if self.likelihood == "bernoulli" else output

    def forward_output(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decode_output(z), mu, logvar) for one z ~ q(z|x): what `vae_fast.vae_loss(...,
        **model.loss_kwargs())` reads (Bernoulli logits, or the Gaussian mean / Laplace location)."""
        mu, logvar = self.encode(x)
        return self.decode_output(self.reparameterize(mu, logvar)), mu, logvar

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(recon, mu, logvar): recon = decode(z) for one z ~ q(z|x) (sampled in eval mode too, as
        in the PyTorch example): probabilities for bernoulli, the mean otherwise."""
        output, mu, logvar = self.forward_output(x)
        if self.likelihood == "bernoulli":
            # Plain probabilities, as in the example: the loss's gradient must reach the parameters
            # through recon (and its sigmoid), so that autograd.grad(loss, recon), recon.retain_grad()
            # and in-place edits of recon behave as they do there. The logits path is forward_output.
            return torch.sigmoid(output), mu, logvar
        return output, mu, logvar

    def loss_kwargs(self) -> dict:
        """The likelihood arguments of `vae_fast.vae_loss` (and of
        `vae_fast.reference.reconstruction_loss`) for this model's decode_output:
        dict(likelihood=..., logits=..., log_scale=...)."""
        return {"likelihood": self.likelihood, "logits": self.likelihood == "bernoulli", "log_scale": self.log_scale}

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, reduction: str = "sum") -> torch.Tensor:
        """The negative ELBO of the batch x in nats (one z per sample), by the fused loss:
        `vae_loss(*self.forward_output(x), x, ..., beta=beta, reduction=reduction, **loss_kwargs())`.

        Raises what `vae_fast.vae_loss` raises, e.g. ValueError for Bernoulli targets outside [0, 1].
        """
        output, mu, logvar = self.forward_output(x)
        return vae_loss(output, x, mu, logvar, beta=beta, reduction=reduction, **self.loss_kwargs())

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic reconstruction decode(mu(x))."""
        mu, _ = self.encode(x)
        return self.decode(mu)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws z ~ N(0, I) decoded to the means of p(x|z), on the model's device and dtype."""
        weight = self.encoder_heads.weight
        z = torch.randn(n, self.latent_dim, generator=generator, device=weight.device, dtype=weight.dtype)
        return self.decode(z)


class VAE(LikelihoodVAE):
    """MLP VAE with a diagonal Gaussian posterior, an N(0, I) prior and a Bernoulli, Gaussian or
    Laplace decoder.

    Args:
        input_dim: features per sample D (784 for MNIST; inputs may be images whose per-sample
            element count is D).
        hidden_dim: width of the single hidden layer of encoder and decoder (the example's 400).
        latent_dim: L, the size of z.
        hidden_dims: several hidden layers instead, encoder widths in order (the decoder mirrors
            them); overrides `hidden_dim`.
        fused: draw z with the fused `vae_fast.reparameterize` kernel (True) or the pure-torch
            reference (False); both are exact, the reference is for comparison and debugging.
        likelihood: "bernoulli" (the default and the example's: the decoder gives logits, `forward`
            probabilities), "gaussian" or "laplace" (the decoder's last layer gives the mean /
            location directly, any real number).
        learn_scale: "none" (unit scale), "shared" (one learned log_scale, shape ()) or "feature"
            (one per feature, shape [D]); gaussian and laplace only.
    Raises:
        ValueError when a dimension is not a positive integer, `hidden_dims` is empty, the
        likelihood or learn_scale is unknown, or a scale is to be learned for a Bernoulli decoder.

    With no arguments it is the examples' 784-400-20-400-784 network. `forward(x)` takes x of shape
    [B, D] or [B, *image] with D elements per sample and returns (recon [B, D], mu [B, L],
    logvar [B, L]), ValueError for another width; like the example (and the paper) it samples z in
    eval mode too; `reconstruct` gives the mean reconstruction.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dim: int = 400,
        latent_dim: int = 20,
        *,
        hidden_dims: Sequence[int] | None = None,
        fused: bool = True,
        likelihood: str = "bernoulli",
        learn_scale: str = "none",
    ):
        super().__init__()
        if hidden_dims is None:
            hidden_dims = (hidden_dim,)
        hidden_dims = tuple(hidden_dims)
        if not hidden_dims:
            raise ValueError("VAE: hidden_dims must name at least one hidden layer width, got ()")
        self.input_dim = _check_positive_dim("VAE", "input_dim", input_dim)
        self.latent_dim = _check_positive_dim("VAE", "latent_dim", latent_dim)
        self.hidden_dims = tuple(_check_positive_dim("VAE", "hidden_dims entry", h) for h in hidden_dims)
        self._init_likelihood("VAE", likelihood, learn_scale, (self.input_dim,), fused)
        self.encoder = _mlp((self.input_dim, *self.hidden_dims))
        # mu and logvar from one [H, 2L] GEMM instead of the example's two [H, L] ones.
        self.encoder_heads = nn.Linear(self.hidden_dims[-1], 2 * self.latent_dim)
        self.decoder = _mlp((self.latent_dim, *reversed(self.hidden_dims), self.input_dim))

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild this architecture (stored in checkpoints;
        `vae_fast.checkpoints.model_from_checkpoint` reads them)."""
        return {"model": "mlp", "input_dim": self.input_dim, "latent_dim": self.latent_dim, "hidden_dims": list(self.hidden_dims),
                "likelihood": self.likelihood, "learn_scale": self.learn_scale}

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

    def decode_output(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, L] -> [B, D]: Bernoulli logits, or the Gaussian mean / Laplace location."""
        return self.decoder(z)

    def _require_bernoulli(self, method: str) -> None:
        if self.likelihood != "bernoulli":
            raise ValueError(f"VAE.{method}: this model's decoder is {self.likelihood!r}, which has no logits; "
                             "use forward_output / decode_output with vae_loss(..., **model.loss_kwargs())")

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, L] -> Bernoulli logits [B, D] (Bernoulli models only; else ValueError)."""
        self._require_bernoulli("decode_logits")
        return self.decode_output(z)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like `forward` but returns the decoder's logits: pair it with
        `vae_fast.vae_loss(logits, x, mu, logvar, logits=True)`, the fastest training path.
        Bernoulli models only (ValueError otherwise): `forward_output` serves every likelihood."""
        self._require_bernoulli("forward_logits")
        return self.forward_output(x)
