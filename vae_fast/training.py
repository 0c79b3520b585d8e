"""The `vae-fast train` loop: Adam on the negative ELBO through the model's logits fast path,
per-epoch metrics (CSV and JSON), checkpoints that resume bit for bit, and images at the end.

Distributed: launched by `torchrun --nproc_per_node=N -m vae_fast train ...` (WORLD_SIZE > 1 in the
environment) it runs DistributedDataParallel over nccl on GPUs or gloo on CPUs. `batch_size` is the
global batch: each rank takes batch_size / N of it through a DistributedSampler, and each rank's
summed loss is scaled by N so DDP's gradient average equals one process's summed-loss gradient.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import reference
from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .data import Dataset, load_dataset
from .evaluation import negative_elbo
from .functional import vae_loss
from .model import VAE

__all__ = ["TrainConfig", "TrainingDiverged", "NegativeElbo", "train", "kl_weight"]

CHECKPOINT_NAME = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The training loss, the held-out loss or the weights became NaN or infinite; the message
    names the last good checkpoint, or says that none was written."""


@dataclass
class TrainConfig:
    """Arguments of `vae-fast train` (see its --help)."""

    dataset: str = "digits"
    data_dir: str | None = None
    data_file: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    latent_dim: int = 20
    hidden_dims: tuple[int, ...] = (400,)
    beta: float = 1.0
    kl_warmup: float = 0.0
    device: str = "cpu"
    seed: int = 0
    out: str = "runs/vae"
    resume: str | None = None
    progress: bool = True
    images: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the first bad argument."""
        for name in ("epochs", "batch_size", "latent_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.hidden_dims or any(h <= 0 for h in self.hidden_dims):
            raise ValueError(f"--hidden-dims must be positive integers, got {list(self.hidden_dims)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not self.beta >= 0:
            raise ValueError(f"--beta must be >= 0, got {self.beta}")
        if not self.kl_warmup >= 0:
            raise ValueError(f"--kl-warmup must be >= 0 epochs, got {self.kl_warmup}")


class NegativeElbo(nn.Module):
    """The training objective as a module, so that DistributedDataParallel wraps it (DDP only
    synchronises gradients of what runs through its forward). Returns the summed loss of the batch
    and, detached, its summed KL term."""

    def __init__(self, model: VAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits, mu, logvar = self.model.forward_logits(x)
        loss = vae_loss(logits, x, mu, logvar, logits=True, beta=beta)
        return loss, reference.kl_divergence(mu.detach(), logvar.detach()).sum()


def kl_weight(beta: float, kl_warmup_epochs: float, step: int, steps_per_epoch: int) -> float:
    """beta, ramped linearly from ~0 over the first `kl_warmup_epochs` epochs (KL annealing)."""
    if kl_warmup_epochs <= 0:
        return beta
    return beta * min(1.0, (step + 1) / (kl_warmup_epochs * steps_per_epoch))


def _distributed_setup(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a single process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return dist.get_rank(), world, torch.device("cuda", local)
    return dist.get_rank(), world, torch.device(device)


def _check_resumable(checkpoint: dict, config: TrainConfig, model: VAE, data: Dataset) -> None:
    wanted = {"dataset": data.name, **model.config()}
    found = {"dataset": checkpoint["dataset"]["name"], **checkpoint["model_config"]}
    differences = [f"{k}={found[k]} (this run: {wanted[k]})" for k in wanted if found.get(k) != wanted[k]]
    if differences:
        raise CheckpointError(f"checkpoint {config.resume} is from another configuration: " + ", ".join(differences))


def _all_finite(tensors) -> bool:
    """Whether every floating tensor holds only finite values (one host sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _is_good(state: dict, test_loss: float) -> bool:
    """A checkpoint worth keeping: finite weights and a finite held-out loss. Checked after the
    epoch's last update, which the per-step loss check never sees."""
    return math.isfinite(test_loss) and _all_finite(state.values())


def _kept(last_good: tuple[Path, int] | None) -> str:
    if last_good is None:
        return "no good checkpoint was written"
    path, epoch = last_good
    return f"the last good checkpoint is {path} (epoch {epoch})"


def _write_metrics(out_dir: Path, history: list[dict]) -> None:
    (out_dir / "metrics.json").write_text(json.dumps(history, indent=2))
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def train(config: TrainConfig, dataset: Dataset | None = None) -> list[dict]:
    """Train a VAE as `config` says; returns the per-epoch metrics (also in out/metrics.{csv,json}).

    Writes out/checkpoint.pt after every epoch that ends with finite weights and a finite held-out
    loss and, at the end, the PNG images of `plots`. On --resume the optimizer (learning rate
    included) and RNG states come from the checkpoint, so the run continues exactly as if it had not
    stopped.
    Raises ValueError (bad argument), DataError, CheckpointError (missing or mismatched --resume)
    and TrainingDiverged (a NaN/inf training loss, or an epoch ending with NaN/inf weights or
    held-out loss; the last good checkpoint is kept, never overwritten by a bad one).
    """
    config.validate()
    rank, world, device = _distributed_setup(config.device)
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the number of processes ({world})")
    data = dataset or load_dataset(config.dataset, data_dir=config.data_dir, data_file=config.data_file, seed=config.seed)
    out_dir = Path(config.out)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = VAE(data.input_dim, latent_dim=config.latent_dim, hidden_dims=config.hidden_dims).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    torch.manual_seed(config.seed + rank)  # but each rank draws its own posterior noise
    history: list[dict] = []
    start_epoch = 0
    # (path, epoch) of the newest checkpoint known to be good, named when training diverges.
    last_good: tuple[Path, int] | None = None
    if config.resume:
        checkpoint = load_checkpoint(config.resume, map_location=device)
        _check_resumable(checkpoint, config, model, data)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, history = checkpoint["epoch"], checkpoint["history"]
        # Nothing is in --out yet: the file resumed from is the last good one, if it is good (one
        # written before the checks existed may not be).
        if history and _is_good(checkpoint["model"], history[-1]["test_loss"]):
            last_good = (Path(config.resume), start_epoch)
        if len(checkpoint["rng_states"]) == world:
            torch.set_rng_state(checkpoint["rng_states"][rank].cpu())
            if device.type == "cuda" and checkpoint.get("cuda_rng_states"):
                torch.cuda.set_rng_state(checkpoint["cuda_rng_states"][rank].cpu(), device)

    objective = NegativeElbo(model)
    if world > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    train_x, test_x = data.train_x.to(device), data.test_x.to(device)
    sampler = DistributedSampler(range(len(train_x)), num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    local_batch = config.batch_size // world
    steps_per_epoch = math.ceil(len(sampler) / local_batch)

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        model.train()
        loss_sum = recon_sum = kl_sum = 0.0
        seen = 0
        bar = tqdm(order.split(local_batch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=rank != 0 or not config.progress, leave=False)
        for step, indices in enumerate(bar):
            beta = kl_weight(config.beta, config.kl_warmup, epoch * steps_per_epoch + step, steps_per_epoch)
            loss, kl = objective(train_x[indices], beta)
            stats = torch.stack([loss.detach().float(), kl.float(), torch.tensor(float(len(indices)), device=device)])
            if world > 1:
                dist.all_reduce(stats)  # every rank sees the same numbers, and so stops together on NaN
            batch_loss, batch_kl, batch_n = stats.tolist()
            if not math.isfinite(batch_loss):
                raise TrainingDiverged(f"loss became {batch_loss} at epoch {epoch + 1}, step {step + 1}; "
                                       f"training stopped ({_kept(last_good)}); try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            (loss * world).backward()
            optimizer.step()
            loss_sum, kl_sum, seen = loss_sum + batch_loss, kl_sum + batch_kl, seen + int(batch_n)
            recon_sum += batch_loss - beta * batch_kl
            # refresh=False: shown at the bar's next refresh, with the right step count
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
        bar.close()

        model.eval()
        held_out = negative_elbo(model, test_x, beta=config.beta)
        # The last step's update is seen by no loss check above: a checkpoint is written only if
        # the weights it holds are finite and give a finite held-out loss.
        weights_finite = _all_finite(model.state_dict().values())
        good = torch.tensor(float(weights_finite and math.isfinite(held_out["loss"])), device=device)
        if world > 1:
            dist.all_reduce(good, op=dist.ReduceOp.MIN)  # every rank stops together, none waits
        if not good.item():
            what = f"the held-out loss is {held_out['loss']}" if weights_finite else "the weights are not finite"
            raise TrainingDiverged(f"after epoch {epoch + 1} {what}; training stopped ({_kept(last_good)}); "
                                   "try a lower --lr")
        row = {
            "epoch": epoch + 1, "beta": beta, "train_loss": loss_sum / seen, "train_kl": kl_sum / seen,
            "train_recon": recon_sum / seen,
            "test_loss": held_out["loss"], "test_recon": held_out["recon"], "test_kl": held_out["kl"],
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        rng_states = [torch.get_rng_state()]
        cuda_rng_states = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, (rng_states[0], cuda_rng_states))
            rng_states = [g[0] for g in gathered]
            cuda_rng_states = [s for g in gathered for s in g[1]]
        if rank == 0:
            save_checkpoint(checkpoint_path, {
                "model_config": model.config(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1, "history": history, "rng_states": rng_states, "cuda_rng_states": cuda_rng_states,
                "dataset": {"name": data.name, "image_shape": list(data.image_shape)},
                "train_config": {k: v for k, v in asdict(config).items() if k not in ("progress", "images")},
            })
            _write_metrics(out_dir, history)
            if config.progress:
                print(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.3f}, held-out loss "
                      f"{row['test_loss']:.3f} (recon {row['test_recon']:.3f}, KL {row['test_kl']:.3f}) [{row['seconds']:.2f}s]")
        last_good = (checkpoint_path, epoch + 1)

    if rank == 0 and config.images and history:
        from .plots import save_training_images

        save_training_images(model, test_x, data.test_y, data.image_shape, history, out_dir, seed=config.seed)
    return history
