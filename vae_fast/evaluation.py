"""Held-out metrics of a trained VAE or ConvVAE, for every likelihood (bernoulli, gaussian,
laplace, with the model's learned scale; poisson, nb, zinb for counts): the negative ELBO (one posterior sample per input) and
the importance-weighted estimate of log p(x) of Burda et al. (2016),

    log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K,   z_k ~ q(z|x),

which tightens towards log p(x) as K grows. log p(x|z) is the full density in nats, constants
included (`vae_fast.reference.reconstruction_loss` with the model's `decode_loss_inputs`), so numbers
compare across likelihoods; for continuous data they are densities and may be positive. Both run
in batches under no_grad; log-weights are reduced in float64 so large K stays stable.
"""

from __future__ import annotations

import math

import torch

from . import reference
from .functional import reparameterize, vae_loss
from .model import LikelihoodVAE

__all__ = ["negative_elbo", "log_importance_weights", "iwae_log_likelihood", "evaluate_checkpoint"]

_LOG_2PI = math.log(2 * math.pi)
# Bound on the decoder's widest activation per chunk (samples x batch x its elements per sample), so
# memory stays ~100 MB whatever K is: for an MLP that is the output, for ConvVAE a feature map
# several times larger than the image.
_CHUNK_ELEMENTS = 1 << 24


def _widest_decoder_activation(model: LikelihoodVAE) -> int:
    """The most elements per sample that any layer of the decoder outputs (the output included),
    found by decoding one z with forward hooks on every leaf module: exact for any architecture."""
    weight = model.encoder_heads.weight
    sizes = [model.input_dim]
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(lambda module, args, out: sizes.append(out.numel() if isinstance(out, torch.Tensor) else 0))
             for m in leaves]
    try:
        model.decode_output(torch.zeros(1, model.latent_dim, device=weight.device, dtype=weight.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return max(sizes)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def negative_elbo(model: LikelihoodVAE, x: torch.Tensor, *, beta: float = 1.0, batch_size: int = 1000, seed: int | None = 0) -> dict:
    """Per-sample averages over x [N, ...] (N samples in any shape the model takes) of the loss
    (recon + beta * KL), recon (-log p(x|z), one z ~ q(z|x) each) and KL, in nats.

    `seed` fixes the posterior draws (None: torch's global generator), so epoch-to-epoch numbers
    compare like with like and training's RNG stream is left alone.
    """
    generator = _generator(seed, x.device)
    recon_sum = kl_sum = 0.0
    for batch in x.split(batch_size):
        mu, logvar = model.encode(batch)
        output, kwargs = model.decode_loss_inputs(reparameterize(mu, logvar, generator=generator), batch)
        kl = reference.kl_divergence(mu, logvar).sum().item()
        recon_sum += vae_loss(output, batch, mu, logvar, beta=0.0, **kwargs).item()
        kl_sum += kl
    n = len(x)
    return {"loss": (recon_sum + beta * kl_sum) / n, "recon": recon_sum / n, "kl": kl_sum / n}


@torch.no_grad()
def log_importance_weights(model: LikelihoodVAE, x: torch.Tensor, samples: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(x|z_k) + log p(z_k) - log q(z_k|x) for z_k ~ q(z|x): float64 [samples, B] for x of
    B samples (any shape the model takes). eps is drawn as torch.randn([samples, B, L]) in chunks."""
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    batch = x.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * _widest_decoder_activation(model)))
    target = x.reshape(batch, -1)
    pieces = []
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + std * eps
        targets = target.expand(k, -1, -1).reshape(k * batch, -1)
        output, kwargs = model.decode_loss_inputs(z.reshape(-1, model.latent_dim), targets)  # [k * B, ...]
        nll = reference.reconstruction_loss(output, targets, **kwargs)
        log_px_z = -nll.reshape(k, batch)
        log_pz = -0.5 * (z.pow(2) + _LOG_2PI).sum(-1)
        # log q(z|x) with z = mu + std * eps: the Gaussian density in terms of eps, exactly.
        log_qz = -0.5 * (eps.pow(2) + logvar + _LOG_2PI).sum(-1)
        pieces.append(log_px_z.double() + log_pz.double() - log_qz.double())
    return torch.cat(pieces)


@torch.no_grad()
def iwae_log_likelihood(model: LikelihoodVAE, x: torch.Tensor, *, samples: int = 1000, batch_size: int = 100, seed: int | None = 0) -> float:
    """The importance-sampled estimate of the mean log p(x) over x [N, ...], in nats (higher is better).

    Raises ValueError for samples < 1.
    """
    if samples < 1:
        raise ValueError(f"iwae_log_likelihood: samples must be >= 1, got {samples}")
    generator = _generator(seed, x.device)
    total = 0.0
    for batch in x.split(batch_size):
        log_w = log_importance_weights(model, batch, samples, generator=generator)
        total += (torch.logsumexp(log_w, dim=0) - math.log(samples)).sum().item()
    return total / len(x)


def evaluate_checkpoint(checkpoint_path, *, samples: int = 1000, dataset: str | None = None, data_dir=None,
                        data_file=None, layer: str | None = None, device: str = "cpu", batch_size: int = 100) -> dict:
    """`vae-fast eval`: held-out negative ELBO and IWAE log-likelihood of a checkpoint's model (VAE
    or ConvVAE, any likelihood).

    The held-out set is the checkpoint's own (same data set and seed, dequantized as in training
    when it was; a count file's layer too) unless `dataset` or `data_file` names another; another
    set is taken as it is, from `layer` of a .h5ad.
    Raises CheckpointError for a bad checkpoint and DataError for data the model cannot take.
    """
    from .checkpoints import load_checkpoint, model_config, model_from_checkpoint
    from .data import DataError, load_dataset

    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, checkpoint_path).to(device).eval()
    trained = checkpoint["train_config"]
    name = dataset or trained["dataset"]
    # The density of dequantized training data is compared only with dequantized held-out data.
    dequantize = name == trained["dataset"] and bool(trained.get("dequantize", False))
    if layer is None and name == trained["dataset"] and data_file is None:
        layer = trained.get("layer")  # the checkpoint's own count file, read as it was in training
    data = load_dataset(name, data_dir=data_dir or trained.get("data_dir"), data_file=data_file or trained.get("data_file"),
                        seed=trained["seed"], dequantize=dequantize, layer=layer)
    if data.input_dim != model.input_dim:
        raise DataError(f"checkpoint {checkpoint_path} models input_dim={model.input_dim} features but data set {data.name} has {data.input_dim}")
    x = data.test_x.to(device)
    elbo = negative_elbo(model, x)
    config = model_config(checkpoint)
    return {
        "checkpoint": str(checkpoint_path), "dataset": data.name, "held_out_samples": len(x),
        "model": config["model"], "likelihood": config["likelihood"],
        "negative_elbo": elbo["loss"], "recon": elbo["recon"], "kl": elbo["kl"],
        "iwae_samples": samples, "iwae_log_likelihood": iwae_log_likelihood(model, x, samples=samples, batch_size=batch_size),
    }
