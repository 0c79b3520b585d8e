"""PNG images of a trained VAE or ConvVAE (matplotlib's Agg backend: no display needed).

Image data: reconstructions beside inputs, prior samples, a latent interpolation strip and, for
L = 2, the decoded latent grid. Images are [N, D] (or [N, 1, H, W]) tensors reshaped to
`image_shape` and shown in grey on [0, 1]: a Gaussian or Laplace decoder's means can leave [0, 1],
and are clipped to it for display (the grids' titles say so).
Tabular data (`image_shape` (D,)): held-out reconstructions against the truth, one scatter plot per
feature with its R^2, and prior samples as a samples x features heatmap.
Both: the latent space coloured by label, and the loss curves (with the decoder's learned scale).
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
           "save_interpolation", "write_samples", "save_feature_reconstructions", "save_sample_heatmap",
           "r_squared", "save_loss_curves", "save_training_images"]

# Said in the title of every grid of a Gaussian or Laplace model's means.
_CLIPPED = " (means clipped to [0, 1] for display)"


def _clip_note(model) -> str:
    return "" if model.likelihood == "bernoulli" else _CLIPPED


def _is_tabular(image_shape) -> bool:
    return len(image_shape) < 2


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
    recon = model.reconstruct(x).to(x.dtype).reshape(x.shape)
    both = torch.cat([x, recon])
    title = "inputs (top), reconstructions (bottom)" + _clip_note(model)
    return save_image_grid(both, image_shape, path, ncols=len(x), title=title)


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
    colouring = {} if labels is None else {"c": labels.cpu().numpy(), "cmap": "tab10"}
    scatter = ax.scatter(points[:, 0], points[:, 1], s=6, **colouring)
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
    return save_image_grid(images, image_shape, path, ncols=n, title="decoded latent grid (z1 across, z2 down)" + _clip_note(model))


@torch.no_grad()
def save_interpolation(model: VAE, x_start: torch.Tensor, x_end: torch.Tensor, image_shape, path, *, steps: int = 10) -> Path:
    """Decoded points on the line between the posterior means of two inputs (shape [D] each)."""
    mu = model.encode(torch.stack([x_start, x_end]))[0]
    t = torch.linspace(0, 1, steps, device=mu.device, dtype=mu.dtype)[:, None]
    images = model.decode((1 - t) * mu[0] + t * mu[1])
    return save_image_grid(images, image_shape, path, ncols=steps, title="latent interpolation" + _clip_note(model))


def save_loss_curves(history: list[dict], path) -> Path:
    """Train and held-out loss per epoch, with the held-out reconstruction and KL terms, and the
    decoder's scale (history's "scale", Gaussian sigma or Laplace b) on a log axis of its own."""
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("train_loss", "-o"), ("test_loss", "-s"), ("test_recon", "--"), ("test_kl", ":")):
        ax.plot(epochs, [row[key] for row in history], style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per sample")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if history and "scale" in history[0]:
        scale_ax = ax.twinx()
        (line,) = scale_ax.plot(epochs, [row["scale"] for row in history], "-^", color="tab:purple", markersize=3)
        scale_ax.set_yscale("log")
        scale_ax.set_ylabel("decoder scale (mean over features)")
        handles, labels = [*handles, line], [*labels, "decoder scale"]
    ax.legend(handles, labels)
    return _save(fig, Path(path))


def r_squared(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Per column of [N, D] arrays: 1 - sum (truth - prediction)^2 / sum (truth - mean truth)^2
    (NaN for a column constant in truth)."""
    residual = ((truth - prediction) ** 2).sum(0)
    total = ((truth - truth.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1 - residual / total, np.nan)


def _feature_names(count: int, names) -> list[str]:
    return list(names) if names is not None else [f"feature {i}" for i in range(count)]


@torch.no_grad()
def save_feature_reconstructions(model: VAE, x: torch.Tensor, path, *, feature_names=None) -> Path:
    """Tabular data: for each feature, the held-out values x [N, D] (across) against their
    reconstructions decode(mu(x)) (up), with the diagonal y = x where a perfect model puts every
    point, and the feature's R^2 in its title; one small scatter plot per feature."""
    truth = x.detach().double().cpu().numpy().reshape(len(x), -1)
    recon = model.reconstruct(x).detach().double().cpu().numpy().reshape(truth.shape)
    scores = r_squared(truth, recon)
    names = _feature_names(truth.shape[1], feature_names)
    ncols = min(5, truth.shape[1])
    nrows = math.ceil(truth.shape[1] / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.4 * nrows + 0.6), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= truth.shape[1]:
            ax.set_axis_off()
            continue
        t, r = truth[:, index], recon[:, index]
        ax.scatter(t, r, s=6, alpha=0.6)
        finite = np.concatenate([t, r])[np.isfinite(np.concatenate([t, r]))]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        ax.plot([low, high], [low, high], color="black", linewidth=0.8)
        ax.set_title(f"{names[index]}\nR^2 = {scores[index]:.2f}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"held-out reconstructions (y) against truth (x), per feature; mean R^2 = {np.nanmean(scores):.3f}",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def save_sample_heatmap(samples: torch.Tensor, path, *, feature_names=None, title: str = "") -> Path:
    """Tabular data: samples [N, D] as an N x D heatmap (rows samples, columns features), in the
    data's (standardized) units, with a colour bar and the feature names."""
    values = samples.detach().double().cpu().numpy().reshape(len(samples), -1)
    names = _feature_names(values.shape[1], feature_names)
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * values.shape[1] + 2), max(3.0, 0.08 * len(values) + 1.5)))
    shown = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="value")
    ax.set_xticks(range(values.shape[1]), names, rotation=90, fontsize=6)
    ax.set_ylabel("sample")
    ax.set_title(title)
    return _save(fig, Path(path))


def save_training_images(model: VAE, test_x: torch.Tensor, test_y, image_shape, history: list[dict], out_dir, *, seed: int = 0,
                         feature_names=None) -> list[Path]:
    """Every image `vae-fast train` writes into out_dir; returns their paths. Tabular data
    (image_shape (D,)) gets feature_reconstructions.png and a samples heatmap instead of grids."""
    out_dir = Path(out_dir)
    if not isinstance(test_x, torch.Tensor):  # a sparse held-out split (count_data.CountMatrix)
        test_x = test_x[:2000]  # the pictures use at most this many cells: only they are made dense
    was_training = model.training
    model.eval()
    weight = model.encoder_heads.weight
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    if _is_tabular(image_shape):
        paths = [
            save_feature_reconstructions(model, test_x, out_dir / "feature_reconstructions.png", feature_names=feature_names),
            save_sample_heatmap(model.sample(64, generator=generator), out_dir / "samples.png", feature_names=feature_names,
                                title="64 samples from the prior (decoded means)"),
            save_latent_plot(model, test_x[:2000], None if test_y is None else test_y[:2000], out_dir / "latent.png"),
            save_loss_curves(history, out_dir / "loss_curves.png"),
        ]
        model.train(was_training)
        return paths
    paths = [
        save_reconstructions(model, test_x, image_shape, out_dir / "reconstructions.png"),
        save_image_grid(model.sample(64, generator=generator), image_shape, out_dir / "samples.png",
                        title="samples from the prior" + _clip_note(model)),
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
    """`vae-fast sample`: n prior samples (decoded means) of a checkpoint's model at `out`: a PNG
    grid of images for image data, a samples x features heatmap PNG for tabular data, or, for an
    `out` ending in .npy, the values themselves as a float32 array [n, *sample shape].

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
    out = Path(out)
    if out.suffix == ".npy":
        np.save(out, images.float().cpu().numpy())
        return out
    if _is_tabular(image_shape):
        return save_sample_heatmap(images, out, feature_names=checkpoint["dataset"].get("feature_names"),
                                   title=f"{n} samples from the prior (decoded means)")
    return save_image_grid(images, image_shape, out, ncols=math.ceil(math.sqrt(n)),
                           title=f"{n} samples from the prior" + _clip_note(model))
