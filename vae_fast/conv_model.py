"""`vae_fast.ConvVAE`: a convolutional VAE for images, shaped like the widely copied PyTorch-VAE
VanillaVAE (strided convolutions down, a linear bottleneck, transposed convolutions up), with the
same contract and the same fused ops as `vae_fast.VAE`.

    model = ConvVAE(image_shape=(1, 28, 28), latent_dim=16, channels=(32, 64), likelihood="gaussian",
                    learn_scale="shared")
    loss = model.loss(x)                       # x: [B, 1, 28, 28] or [B, 784]; the fused negative ELBO
    recon, mu, logvar = model(x)               # recon: [B, 1, 28, 28]

No batch normalisation, unlike VanillaVAE: in training mode it makes each sample's q(z|x) and
p(x|z) depend on the rest of its batch, so the per-sample negative ELBO the loss computes would not
be the one of any single model, and at evaluation the running statistics give yet another model
than the one trained. IWAE makes this worse: its K decoder passes of one input form a batch of
near-copies. Without it, every number (training loss, held-out ELBO, IWAE) is of one fixed model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .model import LikelihoodVAE, _check_positive_dim

__all__ = ["ConvVAE"]

# Each stride-2 layer halves the height and width (rounding down): k=4, s=2, p=1 maps n to n // 2,
# and the transposed layer maps m back to 2 m + output_padding, so output_padding = n % 2 restores
# any n >= 2 exactly (odd sizes included, e.g. 28 -> 14 -> 7 -> 3 -> 7 -> 14 -> 28).
_KERNEL, _STRIDE, _PADDING = 4, 2, 1


def _halvings(size: int, layers: int) -> list[int]:
    """[size, size // 2, ...]: the spatial size before each stride-2 layer and after the last."""
    sizes = [size]
    for _ in range(layers):
        sizes.append(sizes[-1] // 2)
    return sizes


class ConvVAE(LikelihoodVAE):
    """Convolutional VAE with a diagonal Gaussian posterior, an N(0, I) prior and a Bernoulli,
    Gaussian or Laplace decoder.

    Encoder: per entry c of `channels`, Conv2d(k=4, stride 2, padding 1) to c channels and a
    LeakyReLU; then one Linear layer gives [mu, logvar] (one GEMM for both heads). Decoder: Linear
    and LeakyReLU back to the last feature map, then transposed convolutions mirroring the encoder,
    the last one to C channels with no activation: Bernoulli logits, or the Gaussian mean / Laplace
    location (any real). Odd sizes are restored exactly (output_padding), so any image works whose
    height and width stay >= 1 after len(channels) halvings.

    Args:
        image_shape: (C, H, W) of one image.
        latent_dim: L, the size of z.
        channels: encoder widths in order, one stride-2 layer each (the decoder mirrors them).
        likelihood: "bernoulli" (decode_output gives logits, `forward` probabilities), "gaussian"
            or "laplace" (the decoder gives the mean / location).
        learn_scale: "none" (unit scale), "shared" (one learned log_scale, shape ()) or "feature"
            (one per pixel and channel, shape (C, H, W)); gaussian and laplace only.
        fused: draw z with the fused `vae_fast.reparameterize` kernel (True) or the pure-torch
            reference (False).
    Raises:
        ValueError when image_shape is not three positive integers, the image is too small for
        that many stride-2 layers, channels is empty or not positive integers, latent_dim is not a
        positive integer, the likelihood or learn_scale is unknown, or a scale is to be learned for
        a Bernoulli decoder.

    Inputs x: [B, C, H, W], [B, C*H*W] (rows of flattened images, as `vae_fast.data` holds them),
    or [B, H, W] when C == 1. Outputs: `forward(x) -> (recon [B, C, H, W], mu [B, L], logvar [B, L])`.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int = 20,
        channels: Sequence[int] = (32, 64),
        *,
        likelihood: str = "bernoulli",
        learn_scale: str = "none",
        fused: bool = True,
    ):
        super().__init__()
        image_shape, channels = tuple(image_shape), tuple(channels)
        if len(image_shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in image_shape):
            raise ValueError(f"ConvVAE: image_shape must be (C, H, W), three positive integers, got {image_shape!r}")
        if not channels:
            raise ValueError("ConvVAE: channels must name at least one convolutional layer width, got ()")
        self.channels = tuple(_check_positive_dim("ConvVAE", "channels entry", c) for c in channels)
        self.latent_dim = _check_positive_dim("ConvVAE", "latent_dim", latent_dim)
        self.image_shape = image_shape
        self.input_dim = math.prod(image_shape)
        colours, height, width = image_shape
        heights, widths = _halvings(height, len(channels)), _halvings(width, len(channels))
        if heights[-1] == 0 or widths[-1] == 0:
            raise ValueError(
                f"ConvVAE: image_shape {image_shape} is too small for channels {self.channels}: each of the "
                f"{len(channels)} stride-2 layers halves the image (height {' -> '.join(map(str, heights))}, "
                f"width {' -> '.join(map(str, widths))}) and a size may not reach 0; use fewer channels entries"
            )
        self._init_likelihood("ConvVAE", likelihood, learn_scale, image_shape, fused)

        widths_in = (colours, *self.channels)
        encoder: list[nn.Module] = []
        for fan_in, fan_out in zip(widths_in[:-1], widths_in[1:]):
            encoder += [nn.Conv2d(fan_in, fan_out, _KERNEL, _STRIDE, _PADDING), nn.LeakyReLU(inplace=True)]
        self.encoder = nn.Sequential(*encoder)
        self._bottleneck = (self.channels[-1], heights[-1], widths[-1])
        features = math.prod(self._bottleneck)
        # mu and logvar from one [features, 2L] GEMM, as in VAE.
        self.encoder_heads = nn.Linear(features, 2 * self.latent_dim)
        self.decoder_input = nn.Sequential(nn.Linear(self.latent_dim, features), nn.LeakyReLU(inplace=True))
        decoder: list[nn.Module] = []
        for layer in reversed(range(len(self.channels))):
            output_padding = (heights[layer] % 2, widths[layer] % 2)
            decoder.append(nn.ConvTranspose2d(widths_in[layer + 1], widths_in[layer], _KERNEL, _STRIDE, _PADDING, output_padding))
            if layer:  # the last layer's output is the likelihood's parameter: no activation
                decoder.append(nn.LeakyReLU(inplace=True))
        self.decoder = nn.Sequential(*decoder)

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild this architecture (stored in checkpoints;
        `vae_fast.checkpoints.model_from_checkpoint` reads them)."""
        return {"model": "conv", "image_shape": list(self.image_shape), "latent_dim": self.latent_dim,
                "channels": list(self.channels), "likelihood": self.likelihood, "learn_scale": self.learn_scale}

    def _as_images(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W], [B, C*H*W] or (C == 1) [B, H, W] -> [B, C, H, W]. Other shapes are refused,
        not reshaped: a channels-last [B, H, W, C] batch has the right size but would be scrambled."""
        shape = tuple(x.shape)
        if shape[1:] == self.image_shape:
            return x
        if (len(shape) == 2 and shape[1] == self.input_dim) or (self.image_shape[0] == 1 and shape[1:] == self.image_shape[1:]):
            return x.reshape(shape[0], *self.image_shape)
        c, h, w = self.image_shape
        also_grey = f", or [B, {h}, {w}]" if c == 1 else ""
        raise ValueError(f"ConvVAE: expected images of shape [B, {c}, {h}, {w}] (image_shape={self.image_shape}) or rows "
                         f"[B, {self.input_dim}]{also_grey}, got input of shape {shape}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] or [B, C*H*W] -> (mu, logvar), each [B, L]."""
        h = self.encoder(self._as_images(x))
        return self.encoder_heads(h.flatten(1)).chunk(2, dim=1)

    def decode_output(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, L] -> [B, C, H, W]: Bernoulli logits, or the Gaussian mean / Laplace location."""
        h = self.decoder_input(z).reshape(z.shape[0], *self._bottleneck)
        return self.decoder(h)
