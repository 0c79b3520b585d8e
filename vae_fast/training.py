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

Speed: one step (`vae_fast.TrainStep`) is forward, loss, backward and the fused Adam with no host
synchronisation; the loop reads the steps' losses once per epoch (and at a Ctrl-C), so a NaN loss
is reported at the end of the epoch it appeared in, naming its step. On CUDA (one process) the
whole step can be replayed from a CUDA graph (TrainStep's graph mode, --cuda-graph). Optional:
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .checkpoints import model_config
from .count_data import check_count_dataset
from .data import Dataset, dequantize_levels, load_dataset
from .evaluation import negative_elbo
from .functional import vae_loss
from .model import COUNT_LIKELIHOODS, LEARN_SCALES, LIKELIHOODS, VAE
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


class _TestSignal:
    """Test hook (tests/test_crash_safety.py, tests/test_training.py): VAE_FAST_TEST_SIGNAL_AFTER_STEP="N:SIGKILL"
    (or N:SIGINT, any signal name) makes the process send itself that signal right after its N-th
    optimizer step, counted from the start of this process, so that a test kills or interrupts
    `vae-fast train` mid-epoch at a known step rather than after a guessed sleep. Read once per run;
    unset, it costs one comparison per step."""

    ENV = "VAE_FAST_TEST_SIGNAL_AFTER_STEP"

    def __init__(self):
        value = os.environ.get(self.ENV)
        step, name = value.split(":") if value else ("0", None)
        self._after = int(step)  # 0: never (steps count from 1)
        self._signal = signal.Signals[name] if name else None
        self._steps_run = 0

    def after_step(self) -> None:
        self._steps_run += 1
        if self._steps_run == self._after:
            os.kill(os.getpid(), self._signal)


@dataclass
class TrainConfig:
    """Arguments of `vae-fast train` (see its --help)."""

    dataset: str = "digits"
    data_dir: str | None = None
    data_file: str | None = None
    layer: str | None = None  # the .h5ad layer holding the counts (--dataset counts)
    dequantize: bool = False
    model: str = "mlp"
    likelihood: str = "bernoulli"
    learn_scale: str = "none"
    dispersion: str | None = None  # nb/zinb: "gene" (default) or "gene-cell"
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
        if self.likelihood in COUNT_LIKELIHOODS:
            check_count_dataset(data, f"--likelihood {self.likelihood}")
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
        output, mu, logvar, likelihood_kwargs = self.model.forward_loss_inputs(x)
        if isinstance(beta, torch.Tensor):
            # A KL weight read on the device when the step runs (replayed from a CUDA graph, or
            # compiled): the fused loss takes beta as a number fixed when it is called or captured,
            # so it gives the reconstruction term and the weighted KL is added here.
            kl = _kl_sum(mu, logvar)  # the metric's formula, differentiated here
            recon = vae_loss(output, x, mu, logvar, beta=0.0, **likelihood_kwargs)
            return recon + beta * kl, kl.detach()
        loss = vae_loss(output, x, mu, logvar, beta=beta, **likelihood_kwargs)
        return loss, _kl_sum(mu.detach(), logvar.detach())


def build_model(config: TrainConfig, data: Dataset) -> VAE:
    """The model `config` names for this data: VAE over its features, or ConvVAE over its images
    (grey images (H, W) as one channel, (1, H, W))."""
    scale = {"likelihood": config.likelihood, "learn_scale": config.learn_scale}
    if config.likelihood in COUNT_LIKELIHOODS and config.model == "mlp":  # ConvVAE rejects count likelihoods
        scale.update(dispersion=config.dispersion, library_size=data.median_library_size)
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
    mean over features when there is one per feature, 1 for a fixed unit scale; None for bernoulli
    and the count likelihoods (whose spread is their dispersion, not a scale)."""
    if model.likelihood not in ("gaussian", "laplace"):
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
    read), by `vae_fast.TrainStep`: eager, or with --cuda-graph the whole step replayed from a CUDA
    graph. Compiled or captured, beta goes in as a device tensor filled in place before each step
    (a number would recompile, or be fixed at capture)."""
    autocast = autocast_context(device, torch.bfloat16 if config.bf16 else None)

    def loss_and_stats(objective: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, beta = batch
        with autocast():
            loss, kl = objective(x, beta)
        # scaled by the number of processes, so that DDP's gradient average equals one process's
        # summed-loss gradient
        return loss * world if world != 1 else loss, torch.stack((loss.detach(), kl)).float()

    train_step = TrainStep(objective, optimizer, loss_and_stats, cuda_graph=config.cuda_graph, compile=config.compile)
    beta_tensor = torch.zeros((), device=device) if config.cuda_graph or config.compile else None

    def step(batch: torch.Tensor, beta: float) -> torch.Tensor:
        if beta_tensor is not None:
            beta_tensor.fill_(beta)  # a kernel with the value as its argument: no host-to-device copy, no sync
        return train_step((batch, beta if beta_tensor is None else beta_tensor))[1]

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


@dataclass
class _Run:
    """What every step of the loop reads and nothing changes once training starts: the settings,
    the data on the device, the model, its optimizer and step, and this process's place among the
    ranks (rank 0 writes the files)."""

    config: TrainConfig
    data: Dataset
    rank: int
    world: int
    device: torch.device
    model: VAE
    optimizer: torch.optim.Adam
    step_batch: Callable[[torch.Tensor, float], torch.Tensor]  # see _step_function
    train_x: torch.Tensor  # shaped as the model takes them: [N, C, H, W] for ConvVAE
    test_x: torch.Tensor
    sampler: DistributedSampler
    local_batch: int  # this rank's share of --batch-size
    steps_per_epoch: int

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME


@dataclass
class _Progress:
    """Where training stands: set from the checkpoint on --resume, then each finished epoch adds its
    metrics row to `history` and becomes the last good checkpoint."""

    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0  # whole epochs done when this process started
    # Steps already done in epoch start_epoch + 1, and that epoch's running sums and seconds, when
    # resuming a checkpoint that Ctrl-C saved in the middle of an epoch.
    start_step: int = 0
    partial_epoch: dict | None = None
    # (path, position) of the newest checkpoint known to be good, named when training diverges.
    last_good: tuple[Path, str] | None = None


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
    The progress bar is shown on rank 0 when `config.progress` is set and stderr is a terminal.
    Raises ValueError (bad argument), DataError, CheckpointError (missing or mismatched --resume),
    TrainingDiverged (a NaN/inf training loss, or an epoch ending with NaN/inf weights or
    held-out loss; the last good checkpoint is kept, never overwritten by a bad one) and
    TrainingInterrupted.
    """
    config.validate()
    rank, world, device = _distributed_setup(config.device)
    _check_process_count(config, world)
    data = dataset or load_dataset(config.dataset, data_dir=config.data_dir, data_file=config.data_file, seed=config.seed,
                                   dequantize=config.dequantize, layer=config.layer)
    config.check_data(data)
    if rank == 0:
        Path(config.out).mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(config.resume, map_location=device) if config.resume else None
    config = _settle_cuda_graph(config, checkpoint)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config, data).to(device)
    optimizer = make_optimizer(model.parameters(), config.lr, capturable=config.cuda_graph)
    torch.manual_seed(config.seed + rank)  # but each rank draws its own posterior noise
    progress = _Progress()
    if checkpoint is not None:
        config, progress = _resume(checkpoint, config, model, optimizer, data, rank, world, device)
    run = _prepare_run(config, data, model, optimizer, rank, world, device)
    _train_epochs(run, progress)
    if rank == 0 and config.images and progress.history:
        from .plots import save_training_images

        save_training_images(model, run.test_x, data.test_y, data.image_shape, progress.history, run.out_dir,
                             seed=config.seed, feature_names=data.feature_names)
    return progress.history


def _check_process_count(config: TrainConfig, world: int) -> None:
    if config.cuda_graph and world > 1:
        raise ValueError(f"--cuda-graph runs in one process; this run has {world} (torchrun): drop --cuda-graph")
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the number of processes ({world})")


def _settle_cuda_graph(config: TrainConfig, checkpoint: dict | None) -> TrainConfig:
    """--cuda-graph left unset (None): off unless asked for, since the graph path has not yet run on
    a GPU (its tests are written and wait for one); a resumed run goes on as its checkpoint was
    trained (eagerly if it predates the setting). Recorded in the checkpoints' train_config."""
    if config.cuda_graph is not None:
        return config
    return replace(config, cuda_graph=bool(checkpoint and checkpoint["train_config"].get("cuda_graph", False)))


def _resume(checkpoint: dict, config: TrainConfig, model: VAE, optimizer: torch.optim.Adam, data: Dataset, rank: int,
            world: int, device: torch.device) -> tuple[TrainConfig, _Progress]:
    """Loads the checkpoint's weights, Adam state and this rank's RNG states; returns the config as
    the run goes on (the checkpoint's learning rate) and where training stands."""
    _check_resumable(checkpoint, config, model, data)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    # The learning rate is the checkpoint's (its Adam param_groups), whatever --lr says, as
    # documented. Record that rate in the checkpoints this run writes: train_config used to
    # keep the ignored --lr, so a resume with another --lr left a checkpoint naming a rate
    # it was never trained at (issue 13).
    config = replace(config, lr=optimizer.param_groups[0]["lr"])
    progress = _Progress(history=checkpoint["history"], start_epoch=checkpoint["epoch"], start_step=checkpoint.get("step", 0),
                         partial_epoch=checkpoint.get("partial_epoch"))
    if progress.start_step:
        _check_mid_epoch_resume(checkpoint, config, world)
    # Nothing is in --out yet: the file resumed from is the last good one, if it is good (one
    # written before the checks existed may not be).
    if progress.history and _is_good(checkpoint["model"], progress.history[-1]["test_loss"]):
        progress.last_good = (Path(config.resume), _position(progress.start_epoch, progress.start_step))
    if len(checkpoint["rng_states"]) == world:
        torch.set_rng_state(checkpoint["rng_states"][rank].cpu())
        if device.type == "cuda" and checkpoint.get("cuda_rng_states"):
            torch.cuda.set_rng_state(checkpoint["cuda_rng_states"][rank].cpu(), device)
    return config, progress


def _check_mid_epoch_resume(checkpoint: dict, config: TrainConfig, world: int) -> None:
    """A step index means the same batches only with the same global batch split the same way."""
    epoch = checkpoint["epoch"]
    saved_batch, saved_world = checkpoint["train_config"]["batch_size"], len(checkpoint["rng_states"])
    if (saved_batch, saved_world) != (config.batch_size, world):
        raise CheckpointError(
            f"checkpoint {config.resume} was saved in the middle of epoch {epoch + 1} with --batch-size "
            f"{saved_batch} on {saved_world} process(es); resume it with the same (this run: --batch-size "
            f"{config.batch_size} on {world})")
    if epoch >= config.epochs:
        raise ValueError(f"--epochs {config.epochs}: checkpoint {config.resume} is already in epoch {epoch + 1}")


def _prepare_run(config: TrainConfig, data: Dataset, model: VAE, optimizer: torch.optim.Adam, rank: int, world: int,
                 device: torch.device) -> _Run:
    """The step function (DistributedDataParallel around the objective under torchrun), the data
    on the device shaped for the model once rather than per batch, and this rank's sampler."""
    objective = NegativeElbo(model)
    if world > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    step_batch = _step_function(objective, optimizer, config, world, device)
    input_shape = _input_shape(model)
    train_x = data.train_x.to(device).reshape(-1, *input_shape)
    test_x = data.test_x.to(device).reshape(-1, *input_shape)
    sampler = DistributedSampler(range(len(train_x)), num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    local_batch = config.batch_size // world
    return _Run(config, data, rank, world, device, model, optimizer, step_batch, train_x, test_x, sampler, local_batch,
                steps_per_epoch=math.ceil(len(sampler) / local_batch))


def _train_epochs(run: _Run, progress: _Progress) -> None:
    """The epochs left: each one's steps, then its held-out evaluation, checkpoint and report. A
    Ctrl-C stops at a step boundary with the state reached saved (TrainingInterrupted)."""
    test_signal = _TestSignal()
    with _StopOnSigint() as sigint:
        for epoch in range(progress.start_epoch, run.config.epochs):
            totals, stop = _train_epoch(run, progress, epoch, sigint, test_signal)
            held_out = _evaluate(run)
            stop = _agree_after_epoch(run, progress, epoch, held_out, stop or sigint.requested)
            _end_epoch(run, progress, _metrics_row(run, epoch, totals, held_out))
            if stop:
                raise _interrupted(run, epoch + 1)
        # A Ctrl-C during the last epoch's checkpoint: training is complete and saved (this process
        # wrote the checkpoint of the last epoch); stop before the images.
        if sigint.requested and progress.start_epoch < run.config.epochs:
            raise _interrupted(run, run.config.epochs)


@dataclass
class _EpochTotals:
    """One epoch's sums over the steps of every rank, and the time it took: its metrics row is made
    of them, and a checkpoint saved in the middle of the epoch carries them (partial_epoch)."""

    started: float  # time.perf_counter() when this process took the epoch up
    loss_sum: float = 0.0
    recon_sum: float = 0.0
    kl_sum: float = 0.0
    seen: int = 0
    seconds_before: float = 0.0  # spent on the epoch by the process that saved it mid-epoch
    beta: float = 0.0  # the KL weight of the last step added

    @classmethod
    def resumed(cls, started: float, partial_epoch: dict) -> "_EpochTotals":
        sums = {k: partial_epoch[k] for k in ("loss_sum", "recon_sum", "kl_sum", "seen")}
        return cls(started, **sums, seconds_before=partial_epoch["seconds"])

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def partial_epoch(self) -> dict:
        """The checkpoint's record of an epoch stopped in the middle."""
        return {"loss_sum": self.loss_sum, "recon_sum": self.recon_sum, "kl_sum": self.kl_sum, "seen": self.seen,
                "seconds": self.seconds()}


class _PendingSteps:
    """The steps not yet read: each one's [loss, KL] (a device tensor), KL weight and batch size.
    The loop reads them once per epoch (and at a Ctrl-C), in one host synchronisation."""

    def __init__(self, first_step: int):
        self.first_step = first_step  # the epoch's step index of the first one
        self.stats: list[torch.Tensor] = []
        self.betas: list[float] = []
        self.sizes: list[int] = []

    def add(self, stats: torch.Tensor, beta: float, size: int) -> None:
        self.stats.append(stats)
        self.betas.append(beta)
        self.sizes.append(size)

    def mean_loss(self) -> float:
        """This process's mean loss over these steps (a host synchronisation)."""
        return float(torch.stack(self.stats)[:, 0].sum()) / sum(self.sizes)


class _EpochBar:
    """The epoch's progress bar with its running loss, on rank 0 and only on a terminal: in a log
    (a file, a pipe) every bar would leave a "0%|          | 0/12" line between the epoch lines.
    tqdm's disable=None is that rule: off unless the bar's stream (sys.stderr) is a TTY."""

    def __init__(self, run: _Run, epoch: int, batches: tuple[torch.Tensor, ...], first_step: int):
        shown = run.rank == 0 and run.config.progress
        self._bar = tqdm(batches[first_step:], initial=first_step, total=len(batches),
                         desc=f"epoch {epoch + 1}/{run.config.epochs}", disable=None if shown else True, leave=False)
        self._show_loss_at = time.perf_counter()

    def __iter__(self):
        return iter(self._bar)

    def show_loss(self, steps: _PendingSteps) -> None:
        """Reading the running loss costs a host synchronisation: twice a second at most."""
        if self._bar.disable or time.perf_counter() < self._show_loss_at:
            return
        self._show_loss_at = time.perf_counter() + 0.5
        # this process's steps since the epoch (or the resumed run) began
        self._bar.set_postfix(loss=f"{steps.mean_loss():.3f}", refresh=False)

    def close(self) -> None:
        self._bar.close()


def _train_epoch(run: _Run, progress: _Progress, epoch: int, sigint: _StopOnSigint,
                 test_signal: _TestSignal) -> tuple[_EpochTotals, bool]:
    """The epoch's steps (from the one resumed at); returns its totals and whether to stop after
    it. A Ctrl-C before its last step saves that point and raises TrainingInterrupted; a non-finite
    loss raises TrainingDiverged (both collectives: every rank stops at the same step)."""
    config = run.config
    started = time.perf_counter()
    run.sampler.set_epoch(epoch)
    batches = torch.tensor(list(run.sampler), device=run.device).split(run.local_batch)
    first_step = progress.start_step if epoch == progress.start_epoch else 0
    totals = _EpochTotals.resumed(started, progress.partial_epoch) if first_step else _EpochTotals(started)
    steps = _PendingSteps(first_step)
    run.model.train()
    stop = False
    bar = _EpochBar(run, epoch, batches, first_step)
    for step, indices in enumerate(bar, start=first_step):
        beta = kl_weight(config.beta, config.kl_warmup, epoch * run.steps_per_epoch + step, run.steps_per_epoch)
        batch = run.train_x.index_select(0, indices)
        if run.data.dequantized:
            batch = dequantize_levels(batch, run.data.levels)
        # Read before the step, so that a Ctrl-C during it is acted on after the next one,
        # as the test hook's step counts (tests/test_crash_safety.py) expect.
        requested = sigint.requested
        steps.add(run.step_batch(batch, beta), beta, len(indices))
        bar.show_loss(steps)
        test_signal.after_step()
        stop = _stop_agreed(run, requested)
        if stop and step + 1 < len(batches):
            # After an epoch's last step the epoch is finished instead, and saved as usual.
            bar.close()
            _save_mid_epoch(run, progress, epoch, step + 1, steps, totals)
    bar.close()
    _tally(run, progress, epoch, steps, totals)
    return totals, stop


def _stop_agreed(run: _Run, requested: bool) -> bool:
    """Whether to stop after this step: a Ctrl-C seen by any rank stops every rank at the same step."""
    if run.world == 1:
        return requested
    flag = torch.tensor([float(requested)], device=run.device)
    dist.all_reduce(flag)
    return bool(flag.item())


def _tally(run: _Run, progress: _Progress, epoch: int, steps: _PendingSteps, totals: _EpochTotals) -> None:
    """Add the steps' [loss, KL], read here in one go, to the epoch's totals, in step order as they
    were added one by one before; a non-finite loss raises TrainingDiverged naming its step (a
    collective: every rank calls it and sees the same)."""
    if not steps.stats:
        return
    stats = torch.stack(steps.stats)
    if run.world > 1:
        dist.all_reduce(stats)  # every rank sees the same numbers, and so stops together on NaN
    for step, ((loss, kl), beta, n) in enumerate(zip(stats.tolist(), steps.betas, steps.sizes), start=steps.first_step):
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at epoch {epoch + 1}, step {step + 1}; "
                                   f"training stopped ({_kept(progress.last_good)}); try a lower --lr")
        totals.loss_sum += loss
        totals.kl_sum += kl
        totals.recon_sum += loss - beta * kl
        totals.seen += n * run.world
        totals.beta = beta


def _save_mid_epoch(run: _Run, progress: _Progress, epoch: int, steps_done: int, steps: _PendingSteps,
                    totals: _EpochTotals) -> NoReturn:
    """Ctrl-C in the middle of an epoch: save this exact point (weights, Adam, RNG, the epoch's
    running sums), which --resume continues bit for bit, and raise TrainingInterrupted."""
    _tally(run, progress, epoch, steps, totals)
    if not _all_finite(run.model.state_dict().values()):  # the same on every rank
        raise TrainingDiverged(f"interrupted at epoch {epoch + 1}, step {steps_done}, with weights that are not "
                               f"finite; nothing saved ({_kept(progress.last_good)}); try a lower --lr")
    _save(run, progress.history, epoch, steps_done, totals.partial_epoch())
    raise _interrupted(run, epoch, steps_done)


def _evaluate(run: _Run) -> dict:
    """The held-out negative ELBO at the full KL weight: {"loss", "recon", "kl"} per sample."""
    run.model.eval()
    return negative_elbo(run.model, run.test_x, beta=run.config.beta)


def _agree_after_epoch(run: _Run, progress: _Progress, epoch: int, held_out: dict, requested: bool) -> bool:
    """Whether any rank was asked to stop; raises TrainingDiverged when any rank's weights or
    held-out loss are not finite. The epoch's last update is seen by no loss check: a checkpoint is
    written only if the weights it holds are finite and give a finite held-out loss."""
    weights_finite = _all_finite(run.model.state_dict().values())
    # [bad, stop]: summed over ranks, so that every rank stops together and none waits.
    flags = torch.tensor([float(not (weights_finite and math.isfinite(held_out["loss"]))), float(requested)],
                         device=run.device)
    if run.world > 1:
        dist.all_reduce(flags)
    bad, stop_requests = flags.tolist()
    if bad:
        what = f"the held-out loss is {held_out['loss']}" if weights_finite else "the weights are not finite"
        raise TrainingDiverged(f"after epoch {epoch + 1} {what}; training stopped ({_kept(progress.last_good)}); "
                               "try a lower --lr")
    return bool(stop_requests)


def _metrics_row(run: _Run, epoch: int, totals: _EpochTotals, held_out: dict) -> dict:
    """The epoch's line of metrics.csv: training means per sample, held-out ones, seconds, and the
    decoder's scale when it has one."""
    seen = totals.seen
    row = {
        "epoch": epoch + 1, "beta": totals.beta, "train_loss": totals.loss_sum / seen, "train_kl": totals.kl_sum / seen,
        "train_recon": totals.recon_sum / seen,
        "test_loss": held_out["loss"], "test_recon": held_out["recon"], "test_kl": held_out["kl"],
        "seconds": totals.seconds(),
    }
    scale = decoder_scale(run.model)
    if scale is not None:  # sigma (gaussian) or b (laplace): people want to see it move
        row["scale"] = scale
    return row


def _end_epoch(run: _Run, progress: _Progress, row: dict) -> None:
    """Record the finished epoch: its row in the history, the checkpoint, the metrics files and the
    epoch's line on stdout; it becomes the last good checkpoint."""
    progress.history.append(row)
    epochs_done = row["epoch"]
    _save(run, progress.history, epochs_done)
    if run.rank == 0:
        _write_metrics(run.out_dir, progress.history)
        if run.config.progress:
            print(_epoch_line(row, run.config.epochs))
    progress.last_good = (run.checkpoint_path, _position(epochs_done, 0))


def _epoch_line(row: dict, epochs: int) -> str:
    scale = "" if "scale" not in row else f", scale {row['scale']:.4g}"
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.3f}, held-out loss {row['test_loss']:.3f} "
            f"(recon {row['test_recon']:.3f}, KL {row['test_kl']:.3f}{scale}) [{row['seconds']:.2f}s]")


def _save(run: _Run, history: list[dict], epochs_done: int, step: int = 0, partial_epoch: dict | None = None) -> None:
    """Checkpoint after `epochs_done` whole epochs and `step` steps of the next (a collective: every
    rank calls it; rank 0 writes). What load_checkpoint and --resume read: keep the format."""
    rng_states = [torch.get_rng_state()]
    cuda_rng_states = [torch.cuda.get_rng_state(run.device)] if run.device.type == "cuda" else []
    if run.world > 1:
        gathered: list = [None] * run.world
        dist.all_gather_object(gathered, (rng_states[0], cuda_rng_states))
        rng_states = [g[0] for g in gathered]
        cuda_rng_states = [s for g in gathered for s in g[1]]
    if run.rank != 0:
        return
    data = run.data
    save_checkpoint(run.checkpoint_path, {
        "model_config": run.model.config(), "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "epoch": epochs_done, "step": step, "partial_epoch": partial_epoch, "history": history,
        "rng_states": rng_states, "cuda_rng_states": cuda_rng_states,
        "dataset": {"name": data.name, "image_shape": list(data.image_shape), "continuous": data.continuous,
                    "feature_names": None if data.feature_names is None else list(data.feature_names)},
        "train_config": {k: v for k, v in asdict(run.config).items() if k not in ("progress", "images")},
    })


def _interrupted(run: _Run, epochs_done: int, step: int = 0) -> TrainingInterrupted:
    path = run.checkpoint_path
    return TrainingInterrupted(f"interrupted; {path} holds the state reached ({_position(epochs_done, step)}): "
                               f"continue with --resume {path}", path)
