"""PNG images of a trained VAE (matplotlib's Agg backend: no display needed): reconstructions beside
inputs, prior samples, the latent space coloured by label, a latent interpolation strip, and loss
curves. Images are [N, D] tensors of probabilities reshaped to `image_shape` for display.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .model import VAE  # noqa: E402

__all__ = ["image_grid", "save_image_grid", "save_reconstructions", "save_latent_plot", "save_manifold",
           "save_interpolation", "write_samples",
           "save_loss_curves", "save_training_images"]


def image_grid(images: torch.Tensor, image_shape: tuple[int, ...], ncols: int) -> np.ndarray:
    """[N, D] -> one [rows * H + gaps, ncols * W + gaps] array, one pixel of padding between tiles."""
    h, w = image_shape[-2:] if len(image_shape) >= 2 else (1, image_shape[0])
    tiles = images.detach().float().cpu().reshape(-1, h, w).numpy()
    rows = math.ceil(len(tiles) / ncols)
    grid = np.ones((rows * (h + 1) + 1, ncols * (w + 1) + 1), dtype=np.float32)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, ncols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = tile
    return grid


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_image_grid(images: torch.Tensor, image_shape: tuple[int, ...], path: str | Path, *, ncols: int = 8, title: str = "") -> Path:
    """Tile [N, D] images in [0, 1] into one grey-scale PNG."""
    grid = image_grid(images, image_shape, ncols)
    rows = math.ceil(len(images) / ncols)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.6 * ncols), 0.6 * rows + 0.5))  # ~0.6 inch per tile
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    return _save(fig, Path(path))


@torch.no_grad()
def save_reconstructions(model: VAE, x: torch.Tensor, image_shape, path, *, n: int = 8) -> Path:
    """The first n inputs in the top row, their mean reconstructions in the row below."""
    x = x[:n]
    both = torch.cat([x, model.reconstruct(x).to(x.dtype)])
    return save_image_grid(both, image_shape, path, ncols=len(x), title="inputs (top), reconstructions (bottom)")


@torch.no_grad()
def save_latent_plot(model: VAE, x: torch.Tensor, labels: torch.Tensor | None, path) -> Path:
    """Posterior means of x, coloured by label: the two latent axes when L = 2, else a PCA projection."""
    mu = model.encode(x)[0].float().cpu()
    if mu.shape[1] > 2:
        centred = mu - mu.mean(0)
        _, _, v = torch.pca_lowrank(centred, q=2, center=False)
        points, axes = centred @ v[:, :2], ("PC 1", "PC 2")
    elif mu.shape[1] == 2:
        points, axes = mu, ("z1", "z2")
    else:
        points, axes = torch.cat([mu, torch.zeros_like(mu)], 1), ("z1", "")
    fig, ax = plt.subplots(figsize=(6, 5))
    colours = None if labels is None else labels.cpu().numpy()
    scatter = ax.scatter(points[:, 0], points[:, 1], c=colours, cmap="tab10", s=6)
    if labels is not None:
        fig.colorbar(scatter, ax=ax, label="label")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title("latent means" + (" (PCA projection)" if mu.shape[1] > 2 else ""))
    return _save(fig, Path(path))


@torch.no_grad()
def save_manifold(model: VAE, image_shape, path, *, n: int = 15) -> Path:
    """For L = 2: decoded images over a grid of z at evenly spaced prior quantiles."""
    quantiles = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    axis = torch.distributions.Normal(0.0, 1.0).icdf(quantiles).float()
    z = torch.cartesian_prod(axis.flip(0), axis)[:, [1, 0]]  # rows top to bottom = z2 high to low
    weight = model.encoder_heads.weight
    images = model.decode(z.to(device=weight.device, dtype=weight.dtype))
    return save_image_grid(images, image_shape, path, ncols=n, title="decoded latent grid (z1 across, z2 down)")


@torch.no_grad()
def save_interpolation(model: VAE, x_start: torch.Tensor, x_end: torch.Tensor, image_shape, path, *, steps: int = 10) -> Path:
    """Decoded points on the line between the posterior means of two inputs (shape [D] each)."""
    mu = model.encode(torch.stack([x_start, x_end]))[0]
    t = torch.linspace(0, 1, steps, device=mu.device, dtype=mu.dtype)[:, None]
    images = model.decode((1 - t) * mu[0] + t * mu[1])
    return save_image_grid(images, image_shape, path, ncols=steps, title="latent interpolation")


def save_loss_curves(history: list[dict], path) -> Path:
    """Train and held-out loss per epoch, with the held-out reconstruction and KL terms."""
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("train_loss", "-o"), ("test_loss", "-s"), ("test_recon", "--"), ("test_kl", ":")):
        ax.plot(epochs, [row[key] for row in history], style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per sample")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def save_training_images(model: VAE, test_x: torch.Tensor, test_y, image_shape, history: list[dict], out_dir, *, seed: int = 0) -> list[Path]:
    """Every image `vae-fast train` writes into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    was_training = model.training
    model.eval()
    weight = model.encoder_heads.weight
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    paths = [
        save_reconstructions(model, test_x, image_shape, out_dir / "reconstructions.png"),
        save_image_grid(model.sample(64, generator=generator), image_shape, out_dir / "samples.png", title="samples from the prior"),
        save_latent_plot(model, test_x[:2000], None if test_y is None else test_y[:2000], out_dir / "latent.png"),
        save_interpolation(model, test_x[0], test_x[1], image_shape, out_dir / "interpolation.png"),
        save_loss_curves(history, out_dir / "loss_curves.png"),
    ]
    if model.latent_dim == 2:
        paths.append(save_manifold(model, image_shape, out_dir / "manifold.png"))
    model.train(was_training)
    return paths


@torch.no_grad()
def write_samples(checkpoint_path, out, *, n: int = 64, seed: int = 0, device: str = "cpu") -> Path:
    """`vae-fast sample`: n prior samples of a checkpoint's model as one PNG grid at `out`.

    Raises CheckpointError for a missing, unreadable or inconsistent checkpoint; ValueError for n < 1.
    """
    from .checkpoints import load_checkpoint, model_from_checkpoint

    if n < 1:
        raise ValueError(f"--n must be positive, got {n}")
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, checkpoint_path).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    images = model.sample(n, generator=generator)
    image_shape = tuple(checkpoint["dataset"]["image_shape"])
    return save_image_grid(images, image_shape, out, ncols=math.ceil(math.sqrt(n)), title=f"{n} samples from the prior")
