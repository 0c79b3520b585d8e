"""The `vae-fast train` loop: Adam on the negative ELBO through the fused loss, per-epoch metrics
(CSV and JSON), checkpoints that resume bit for bit, and images at the end.

Models: the MLP `vae_fast.VAE` or the convolutional `vae_fast.ConvVAE`, each with a Bernoulli,
Gaussian or Laplace decoder, the last two with a fixed unit scale or a learned one (shared, or one
per feature). The objective is `vae_loss(*model.forward_output(x), **model.loss_kwargs())`: for a
Bernoulli decoder that is the logits path (no sigmoid backward), the fastest. Dequantized data sets
(`--dequantize`) get fresh uniform noise for every training batch, drawn from torch's generator,
whose state the checkpoints carry, so that a resumed run draws the same noise.

Crash safety: checkpoints and metrics are written atomically (checkpoints.atomic_write), so a kill
at any point leaves the previous complete file; Ctrl-C (SIGINT) finishes the current step, saves
a checkpoint of that exact point (mid-epoch included) and raises TrainingInterrupted.

Speed: one step (`train_step.TrainStep`) is forward, loss, backward and the fused Adam with no host
synchronisation; the loop reads the steps' losses once per epoch (and at a Ctrl-C), so a NaN loss
is reported at the end of the epoch it appeared in, naming its step. On CUDA (one process) the
whole step can be replayed from a CUDA graph (`captured_step.CapturedStep`, --cuda-graph). Optional:
torch.compile of the objective (--compile) and bfloat16 autocast (--bf16); settings that change
the arithmetic are recorded in the checkpoint and a resumed run keeps them.

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
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .checkpoints import model_config
from .data import Dataset, dequantize_levels, load_dataset
from .evaluation import negative_elbo
from .functional import vae_loss
from .model import LEARN_SCALES, LIKELIHOODS, VAE
from .train_step import TrainStep, autocast_context, make_optimizer

__all__ = ["TrainConfig", "TrainingDiverged", "TrainingInterrupted", "NegativeElbo", "train", "kl_weight", "build_model",
           "decoder_scale", "MODELS"]

CHECKPOINT_NAME = "checkpoint.pt"
MODELS = ("mlp", "conv")


class TrainingDiverged(RuntimeError):
    """The training loss, the held-out loss or the weights became NaN or infinite; the message
    names the last good checkpoint, or says that none was written."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped training at a step boundary after the state reached was saved;
    `checkpoint` is the file to --resume from, and resuming finishes the run exactly as if it had
    not stopped. A KeyboardInterrupt, so that code which lets Ctrl-C through lets this through."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


class _StopOnSigint:
    """While active, the first SIGINT only sets `requested`; the loop acts on it at the next step
    boundary (save, then TrainingInterrupted). Python's default KeyboardInterrupt would land
    anywhere, e.g. between backward() and the optimizer step, and lose the epoch's work. The handler
    hands SIGINT back to the previous one as it runs, so a second Ctrl-C interrupts at once for a
    user who will not wait (checkpoints on disk stay whole: they are written atomically). Installed
    only in the main thread (Python allows handlers nowhere else) and only where SIGINT is handled by
    Python and not ignored (`nohup`, `cmd &` in a script): those setups are left as they are."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopOnSigint":
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (None, signal.SIG_IGN):
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# Test hook, used by tests/test_crash_safety.py only: VAE_FAST_TEST_SIGNAL_AFTER_STEP="N:SIGKILL"
# (or N:SIGINT, any signal name) makes the process send itself that signal right after its N-th
# optimizer step, counted from the start of this process, so that a test kills or interrupts
# `vae-fast train` mid-epoch at a known step rather than after a guessed sleep. Read once per run;
# unset, it costs one comparison per step.
_TEST_SIGNAL_ENV = "VAE_FAST_TEST_SIGNAL_AFTER_STEP"


def _test_signal_after_step() -> tuple[int, signal.Signals] | None:
    value = os.environ.get(_TEST_SIGNAL_ENV)
    if not value:
        return None
    step, name = value.split(":")
    return int(step), signal.Signals[name]


@dataclass
class TrainConfig:
    """Arguments of `vae-fast train` (see its --help)."""

    dataset: str = "digits"
    data_dir: str | None = None
    data_file: str | None = None
    dequantize: bool = False
    model: str = "mlp"
    likelihood: str = "bernoulli"
    learn_scale: str = "none"
    channels: tuple[int, ...] = (32, 64)
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
    compile: bool = False
    bf16: bool = False
    cuda_graph: bool | None = None  # None: the checkpoint's on resume, else off
    progress: bool = True
    images: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the first bad argument."""
        for name in ("epochs", "batch_size", "latent_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.hidden_dims or any(h <= 0 for h in self.hidden_dims):
            raise ValueError(f"--hidden-dims must be positive integers, got {list(self.hidden_dims)}")
        # isfinite too: an infinite --beta made the first loss inf ("try a lower --lr"), an infinite
        # --kl-warmup a KL weight of 0 for ever
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be positive and finite, got {self.lr}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ValueError(f"--beta must be >= 0 and finite, got {self.beta}")
        if not (self.kl_warmup >= 0 and math.isfinite(self.kl_warmup)):
            raise ValueError(f"--kl-warmup must be >= 0 and finite (epochs), got {self.kl_warmup}")
        for name, value, choices in (("model", self.model, MODELS), ("likelihood", self.likelihood, LIKELIHOODS),
                                     ("learn-scale", self.learn_scale, LEARN_SCALES)):
            if value not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"--channels must be positive integers, got {list(self.channels)}")
        if self.likelihood == "bernoulli" and self.learn_scale != "none":
            raise ValueError(f"--learn-scale {self.learn_scale} needs --likelihood gaussian or laplace: "
                             "the Bernoulli likelihood has no scale to learn")
        if self.cuda_graph and torch.device(self.device).type != "cuda":
            raise ValueError(f"--cuda-graph replays the training step from a CUDA graph: it needs --device cuda, "
                             f"got --device {self.device}")
        if self.cuda_graph and self.compile:
            raise ValueError("--cuda-graph and --compile: choose one (the graph already replays the whole step)")
        if self.likelihood == "bernoulli" and self.dequantize:
            raise ValueError("--dequantize serves --likelihood gaussian or laplace (a density on continuous values); "
                             "a Bernoulli decoder reads the grey levels themselves")

    def check_data(self, data: Dataset) -> None:
        """Raises ValueError when the data set does not suit the model or the likelihood."""
        if self.likelihood == "bernoulli":
            low = min(float(data.train_x.min()), float(data.test_x.min()))
            high = max(float(data.train_x.max()), float(data.test_x.max()))
            if low < 0 or high > 1:
                raise ValueError(f"--likelihood bernoulli needs data in [0, 1], but data set {data.name} holds values in "
                                 f"[{low:.3g}, {high:.3g}]; use --likelihood gaussian or laplace for real-valued data")
        if self.model == "conv" and not data.is_image:
            raise ValueError(f"--model conv needs image data, but data set {data.name} has samples of shape "
                             f"{tuple(data.image_shape)} (tabular); use --model mlp")


def _kl_sum(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over the batch, for the metrics: 0.5 * sum(mu^2 + expm1(logvar)
    - logvar), the reference's formula in fewer ops (six instead of ten, a few percent of a small CPU
    step); expm1 keeps the precision of near-prior dimensions. float32 (float64 for float64)."""
    dtype = torch.float64 if mu.dtype == torch.float64 else torch.float32
    mu, logvar = mu.to(dtype), logvar.to(dtype)
    return (torch.expm1(logvar) - logvar).add_(mu.square()).sum().mul_(0.5)


class NegativeElbo(nn.Module):
    """The training objective as a module, so that DistributedDataParallel wraps it (DDP only
    synchronises gradients of what runs through its forward). Returns the summed loss of the batch
    and, detached, its summed KL term."""

    def __init__(self, model: VAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output, mu, logvar = self.model.forward_output(x)
        if isinstance(beta, torch.Tensor):
            # A KL weight read on the device when the step runs (replayed from a CUDA graph, or
            # compiled): the fused loss takes beta as a number fixed when it is called or captured,
            # so it gives the reconstruction term and the weighted KL is added here.
            kl = _kl_sum(mu, logvar)  # the metric's formula, differentiated here
            recon = vae_loss(output, x, mu, logvar, beta=0.0, **self.model.loss_kwargs())
            return recon + beta * kl, kl.detach()
        loss = vae_loss(output, x, mu, logvar, beta=beta, **self.model.loss_kwargs())
        return loss, _kl_sum(mu.detach(), logvar.detach())


def build_model(config: TrainConfig, data: Dataset) -> VAE:
    """The model `config` names for this data: VAE over its features, or ConvVAE over its images
    (grey images (H, W) as one channel, (1, H, W))."""
    scale = {"likelihood": config.likelihood, "learn_scale": config.learn_scale}
    if config.model == "conv":
        from .conv_model import ConvVAE

        image_shape = tuple(data.image_shape) if len(data.image_shape) == 3 else (1, *data.image_shape)
        return ConvVAE(image_shape=image_shape, latent_dim=config.latent_dim, channels=tuple(config.channels), **scale)
    return VAE(data.input_dim, latent_dim=config.latent_dim, hidden_dims=config.hidden_dims, **scale)


def _input_shape(model: VAE) -> tuple[int, ...]:
    """What one sample looks like to the model: (C, H, W) for ConvVAE, (D,) for VAE."""
    image_shape = getattr(model, "image_shape", None)
    return tuple(image_shape) if image_shape is not None else (model.input_dim,)


def decoder_scale(model: VAE) -> float | None:
    """The decoder's scale (sigma for gaussian, b for laplace) as one number: exp(log_scale), its
    mean over features when there is one per feature, 1 for a fixed unit scale; None for bernoulli."""
    if model.likelihood == "bernoulli":
        return None
    if model.log_scale is None:
        return 1.0
    return float(torch.exp(model.log_scale.detach().double()).mean())


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
    wanted = {"dataset": data.name, "dequantize": data.dequantized, **model.config()}
    found = {"dataset": checkpoint["dataset"]["name"], "dequantize": checkpoint["train_config"].get("dequantize", False),
             **model_config(checkpoint)}
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


def _position(epochs_done: int, step: int) -> str:
    """Where a checkpoint stands: "epoch 3" after three whole epochs, "epoch 4, after step 10"
    when Ctrl-C saved it in the middle of the fourth."""
    return f"epoch {epochs_done}" if step == 0 else f"epoch {epochs_done + 1}, after step {step}"


def _kept(last_good: tuple[Path, str] | None) -> str:
    if last_good is None:
        return "no good checkpoint was written"
    path, position = last_good
    return f"the last good checkpoint is {path} ({position})"


def _step_function(objective: nn.Module, optimizer: torch.optim.Adam, config: TrainConfig, world: int, device: torch.device):
    """step(batch, beta) -> the batch's [loss, KL] (a float32 device tensor of its own, not yet
    read): the eager `TrainStep`, or with --cuda-graph the whole step replayed from a CUDA graph,
    beta going in as a device tensor filled in place before each replay."""
    autocast = torch.bfloat16 if config.bf16 else None
    if not config.cuda_graph:
        return TrainStep(objective, optimizer, world=world, autocast=autocast, compile=config.compile)
    from .captured_step import CapturedStep

    autocast_scope = autocast_context(device, autocast)

    def loss_and_stats(x: torch.Tensor, beta: torch.Tensor):
        with autocast_scope():
            loss, kl = objective(x, beta)
        return loss, torch.stack((loss.detach(), kl)).float()

    captured = CapturedStep(loss_and_stats, optimizer)
    beta_tensor = torch.zeros((), device=device)

    def step(batch: torch.Tensor, beta: float) -> torch.Tensor:
        beta_tensor.fill_(beta)  # a kernel with the value as its argument: no host-to-device copy, no sync
        (stats,) = captured(batch, beta_tensor)
        return stats.clone()  # the next replay overwrites the graph's own

    return step


def _write_metrics(out_dir: Path, history: list[dict]) -> None:
    # Atomic like the checkpoint: a kill while they are written leaves the previous epoch's files,
    # not truncated ones (a resume with nothing left to train would not rewrite them).
    with atomic_write(out_dir / "metrics.json", "w") as f:
        f.write(json.dumps(history, indent=2))
    with atomic_write(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def train(config: TrainConfig, dataset: Dataset | None = None) -> list[dict]:
    """Train a VAE as `config` says; returns the per-epoch metrics (also in out/metrics.{csv,json}).

    Writes out/checkpoint.pt after every epoch that ends with finite weights and a finite held-out
    loss and, at the end, the PNG images of `plots`. On --resume the optimizer (learning rate
    included) and RNG states come from the checkpoint, so the run continues exactly as if it had not
    stopped. Checkpoints and metrics files are written atomically: a process killed at any point
    (SIGKILL, power loss) leaves the previous complete checkpoint, from which --resume finishes the
    run with the same final weights as an uninterrupted one.
    A SIGINT (Ctrl-C) in the main thread stops at the next step boundary: the state reached is
    saved (a checkpoint in the middle of an epoch if need be, which resumes exactly too) and
    TrainingInterrupted is raised; the images are not written.
    Raises ValueError (bad argument), DataError, CheckpointError (missing or mismatched --resume),
    TrainingDiverged (a NaN/inf training loss, or an epoch ending with NaN/inf weights or
    held-out loss; the last good checkpoint is kept, never overwritten by a bad one) and
    TrainingInterrupted.
    """
    config.validate()
    rank, world, device = _distributed_setup(config.device)
    if config.cuda_graph and world > 1:
        raise ValueError(f"--cuda-graph runs in one process; this run has {world} (torchrun): drop --cuda-graph")
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the number of processes ({world})")
    data = dataset or load_dataset(config.dataset, data_dir=config.data_dir, data_file=config.data_file, seed=config.seed,
                                   dequantize=config.dequantize)
    config.check_data(data)
    out_dir = Path(config.out)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    checkpoint = load_checkpoint(config.resume, map_location=device) if config.resume else None
    if config.cuda_graph is None:
        # Off unless asked for: the graph path has not yet run on a GPU (its tests are written and
        # wait for one); a resumed run goes on as its checkpoint was trained (eagerly if it
        # predates the setting). Recorded in the checkpoints' train_config.
        config = replace(config, cuda_graph=bool(checkpoint and checkpoint["train_config"].get("cuda_graph", False)))
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config, data).to(device)
    optimizer = make_optimizer(model.parameters(), config.lr, capturable=config.cuda_graph)
    torch.manual_seed(config.seed + rank)  # but each rank draws its own posterior noise
    history: list[dict] = []
    start_epoch = 0
    # Steps already done in epoch start_epoch + 1, and that epoch's running sums, when resuming a
    # checkpoint that Ctrl-C saved in the middle of an epoch.
    start_step, partial_epoch = 0, None
    # (path, position) of the newest checkpoint known to be good, named when training diverges.
    last_good: tuple[Path, str] | None = None
    if checkpoint is not None:
        _check_resumable(checkpoint, config, model, data)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        # The learning rate is the checkpoint's (its Adam param_groups), whatever --lr says, as
        # documented. Record that rate in the checkpoints this run writes: train_config used to
        # keep the ignored --lr, so a resume with another --lr left a checkpoint naming a rate
        # it was never trained at (issue 13).
        config = replace(config, lr=optimizer.param_groups[0]["lr"])
        start_epoch, history = checkpoint["epoch"], checkpoint["history"]
        start_step, partial_epoch = checkpoint.get("step", 0), checkpoint.get("partial_epoch")
        if start_step:
            # A step index means the same batches only with the same global batch split the same way.
            saved_batch, saved_world = checkpoint["train_config"]["batch_size"], len(checkpoint["rng_states"])
            if (saved_batch, saved_world) != (config.batch_size, world):
                raise CheckpointError(
                    f"checkpoint {config.resume} was saved in the middle of epoch {start_epoch + 1} with --batch-size "
                    f"{saved_batch} on {saved_world} process(es); resume it with the same (this run: --batch-size "
                    f"{config.batch_size} on {world})")
            if start_epoch >= config.epochs:
                raise ValueError(f"--epochs {config.epochs}: checkpoint {config.resume} is already in epoch {start_epoch + 1}")
        # Nothing is in --out yet: the file resumed from is the last good one, if it is good (one
        # written before the checks existed may not be).
        if history and _is_good(checkpoint["model"], history[-1]["test_loss"]):
            last_good = (Path(config.resume), _position(start_epoch, start_step))
        if len(checkpoint["rng_states"]) == world:
            torch.set_rng_state(checkpoint["rng_states"][rank].cpu())
            if device.type == "cuda" and checkpoint.get("cuda_rng_states"):
                torch.cuda.set_rng_state(checkpoint["cuda_rng_states"][rank].cpu(), device)

    objective = NegativeElbo(model)
    if world > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    step_batch = _step_function(objective, optimizer, config, world, device)
    # Shaped as the model takes them once here, not per batch: [N, C, H, W] for ConvVAE.
    input_shape = _input_shape(model)
    train_x = data.train_x.to(device).reshape(-1, *input_shape)
    test_x = data.test_x.to(device).reshape(-1, *input_shape)
    sampler = DistributedSampler(range(len(train_x)), num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    local_batch = config.batch_size // world
    steps_per_epoch = math.ceil(len(sampler) / local_batch)

    def save(epochs_done: int, step: int = 0, partial: dict | None = None) -> None:
        """Checkpoint after `epochs_done` whole epochs and `step` steps of the next (a collective:
        every rank calls it; rank 0 writes)."""
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
                "epoch": epochs_done, "step": step, "partial_epoch": partial, "history": history,
                "rng_states": rng_states, "cuda_rng_states": cuda_rng_states,
                "dataset": {"name": data.name, "image_shape": list(data.image_shape), "continuous": data.continuous,
                            "feature_names": None if data.feature_names is None else list(data.feature_names)},
                "train_config": {k: v for k, v in asdict(config).items() if k not in ("progress", "images")},
            })

    def interrupted(epochs_done: int, step: int = 0) -> TrainingInterrupted:
        return TrainingInterrupted(f"interrupted; {checkpoint_path} holds the state reached ({_position(epochs_done, step)}): "
                                   f"continue with --resume {checkpoint_path}", checkpoint_path)

    def tally(epoch: int, first_step: int, rows: list, betas: list, sizes: list, sums: dict) -> None:
        """Add the steps' [loss, KL] (device tensors, read here in one go) to the epoch's running
        sums, in step order as they were added one by one before; a non-finite loss raises
        TrainingDiverged naming its step (a collective: every rank calls it and sees the same)."""
        if not rows:
            return
        stats = torch.stack(rows)
        if world > 1:
            dist.all_reduce(stats)  # every rank sees the same numbers, and so stops together on NaN
        for step, ((loss, kl), beta, n) in enumerate(zip(stats.tolist(), betas, sizes), start=first_step):
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss} at epoch {epoch + 1}, step {step + 1}; "
                                       f"training stopped ({_kept(last_good)}); try a lower --lr")
            sums["loss_sum"] += loss
            sums["kl_sum"] += kl
            sums["recon_sum"] += loss - beta * kl
            sums["seen"] += n * world

    def stop_agreed(requested: bool) -> bool:
        """Whether to stop after this step: a Ctrl-C seen by any rank stops every rank at the same step."""
        if world == 1:
            return requested
        flag = torch.tensor([float(requested)], device=device)
        dist.all_reduce(flag)
        return bool(flag.item())

    test_signal = _test_signal_after_step()
    steps_run = 0  # in this process, for the test hook
    with _StopOnSigint() as sigint:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), device=device)
            batches = order.split(local_batch)
            first_step = start_step if epoch == start_epoch else 0
            if first_step:
                sums = {k: partial_epoch[k] for k in ("loss_sum", "recon_sum", "kl_sum", "seen")}
                seconds = partial_epoch["seconds"]
            else:
                sums = {"loss_sum": 0.0, "recon_sum": 0.0, "kl_sum": 0.0, "seen": 0}
                seconds = 0.0
            rows: list[torch.Tensor] = []
            betas: list[float] = []
            sizes: list[int] = []
            model.train()
            stop = False
            show_loss_at = started  # the bar's running loss costs a host sync: twice a second at most
            bar = tqdm(batches[first_step:], initial=first_step, total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=rank != 0 or not config.progress, leave=False)
            for step, indices in enumerate(bar, start=first_step):
                beta = kl_weight(config.beta, config.kl_warmup, epoch * steps_per_epoch + step, steps_per_epoch)
                batch = train_x.index_select(0, indices)
                if data.dequantized:
                    batch = dequantize_levels(batch, data.levels)
                # Read before the step, so that a Ctrl-C during it is acted on after the next one,
                # as the test hook's step counts (tests/test_crash_safety.py) expect.
                requested = sigint.requested
                rows.append(step_batch(batch, beta))
                betas.append(beta)
                sizes.append(len(indices))
                if not bar.disable and time.perf_counter() >= show_loss_at:
                    show_loss_at = time.perf_counter() + 0.5
                    # this process's steps since the epoch (or the resumed run) began
                    bar.set_postfix(loss=f"{float(torch.stack(rows)[:, 0].sum()) / sum(sizes):.3f}", refresh=False)
                steps_run += 1
                if test_signal and steps_run == test_signal[0]:
                    os.kill(os.getpid(), test_signal[1])
                stop = stop_agreed(requested)
                if stop and step + 1 < len(batches):
                    # Ctrl-C: save this exact point (weights, Adam, RNG, the epoch's running sums),
                    # which --resume continues bit for bit. After an epoch's last step the epoch
                    # is finished below instead, and saved as usual.
                    bar.close()
                    tally(epoch, first_step, rows, betas, sizes, sums)
                    if not _all_finite(model.state_dict().values()):  # the same on every rank
                        raise TrainingDiverged(f"interrupted at epoch {epoch + 1}, step {step + 1}, with weights that are not "
                                               f"finite; nothing saved ({_kept(last_good)}); try a lower --lr")
                    save(epoch, step + 1, {**sums, "seconds": seconds + time.perf_counter() - started})
                    raise interrupted(epoch, step + 1)
            bar.close()
            tally(epoch, first_step, rows, betas, sizes, sums)
            loss_sum, recon_sum, kl_sum, seen = sums["loss_sum"], sums["recon_sum"], sums["kl_sum"], sums["seen"]

            model.eval()
            held_out = negative_elbo(model, test_x, beta=config.beta)
            # The last step's update is seen by no loss check above: a checkpoint is written only if
            # the weights it holds are finite and give a finite held-out loss.
            weights_finite = _all_finite(model.state_dict().values())
            # [bad, stop]: summed over ranks, so that every rank stops together and none waits.
            flags = torch.tensor([float(not (weights_finite and math.isfinite(held_out["loss"]))),
                                  float(stop or sigint.requested)], device=device)
            if world > 1:
                dist.all_reduce(flags)
            bad, stop_requests = flags.tolist()
            if bad:
                what = f"the held-out loss is {held_out['loss']}" if weights_finite else "the weights are not finite"
                raise TrainingDiverged(f"after epoch {epoch + 1} {what}; training stopped ({_kept(last_good)}); "
                                       "try a lower --lr")
            row = {
                "epoch": epoch + 1, "beta": beta, "train_loss": loss_sum / seen, "train_kl": kl_sum / seen,
                "train_recon": recon_sum / seen,
                "test_loss": held_out["loss"], "test_recon": held_out["recon"], "test_kl": held_out["kl"],
                "seconds": seconds + time.perf_counter() - started,
            }
            scale = decoder_scale(model)
            if scale is not None:  # sigma (gaussian) or b (laplace): people want to see it move
                row["scale"] = scale
            history.append(row)
            save(epoch + 1)
            if rank == 0:
                _write_metrics(out_dir, history)
                if config.progress:
                    shown_scale = "" if scale is None else f", scale {scale:.4g}"
                    print(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.3f}, held-out loss "
                          f"{row['test_loss']:.3f} (recon {row['test_recon']:.3f}, KL {row['test_kl']:.3f}{shown_scale}) "
                          f"[{row['seconds']:.2f}s]")
            last_good = (checkpoint_path, _position(epoch + 1, 0))
            if stop_requests:
                raise interrupted(epoch + 1)
        # A Ctrl-C during the last epoch's checkpoint: training is complete and saved (this process
        # wrote the checkpoint of the last epoch); stop before the images.
        if sigint.requested and start_epoch < config.epochs:
            raise interrupted(config.epochs)

    if rank == 0 and config.images and history:
        from .plots import save_training_images

        save_training_images(model, test_x, data.test_y, data.image_shape, history, out_dir, seed=config.seed,
                             feature_names=data.feature_names)
    return history
