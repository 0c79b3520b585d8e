"""Training checkpoints: one file with everything a run needs to resume exactly (model, optimizer,
RNG states, history) and to rebuild the model for `eval` and `sample`."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch

from .conv_model import ConvVAE
from .model import VAE

__all__ = ["CheckpointError", "atomic_write", "save_checkpoint", "load_checkpoint", "model_from_checkpoint", "model_config",
           "model_from_config", "FORMAT"]

FORMAT = "vae_fast.checkpoint/1"
_REQUIRED = ("format", "model_config", "model", "optimizer", "epoch", "dataset", "train_config", "rng_states", "history")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or made for another configuration."""


# Test hook, used by tests/test_crash_safety.py only: with VAE_FAST_TEST_KILL_IN_CHECKPOINT=N the
# N-th checkpoint this process writes sends the process SIGKILL once _TEST_KILL_AFTER_BYTES of its
# temporary file are written, so that a test can kill `vae-fast train` while a checkpoint is being
# written, deterministically. Unset, it costs one environment lookup per checkpoint.
_TEST_KILL_ENV = "VAE_FAST_TEST_KILL_IN_CHECKPOINT"
_TEST_KILL_AFTER_BYTES = 4096  # a few KiB: less than the smallest checkpoint (its RNG state alone is 5 KB)
_checkpoints_written = 0


class _KillPartWay:
    """The test hook's file wrapper: passes writes through until `limit` bytes are out, flushes them
    to the file and SIGKILLs this process, leaving a truncated temporary file behind."""

    def __init__(self, file, limit: int):
        self.file, self.room = file, limit

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) >= self.room:
            self.file.write(data[: self.room])
            self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a file to write that appears at `path` complete or not at all: a crash or kill at any
    point leaves either the previous file at `path` or the new one, never a truncated one.

    The data goes to `<path>.part` in the same folder (a rename is atomic only within one file
    system), is fsynced, and is then renamed over `path` with os.replace (atomic on POSIX and
    Windows); on POSIX the folder is fsynced too, so that a power failure cannot keep the rename
    and lose the data or the other way round. A `.part` left behind by a kill is overwritten by the
    next write and never read; one left by an exception is removed.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".part")
    try:
        with open(partial, mode, **open_kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Write atomically (see atomic_write): a crash or kill mid-write keeps the previous checkpoint."""
    global _checkpoints_written
    _checkpoints_written += 1
    kill_at = os.environ.get(_TEST_KILL_ENV)
    with atomic_write(path) as file:
        target = _KillPartWay(file, _TEST_KILL_AFTER_BYTES) if kill_at and int(kill_at) == _checkpoints_written else file
        torch.save({"format": FORMAT, **checkpoint}, target)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable across a power failure. POSIX only: Windows cannot open
    a folder for os.fsync."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`.

    Raises CheckpointError when the file is missing, is not a torch file, or lacks vae_fast's keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # Our checkpoints hold RNG byte tensors and plain containers only: the safe loader reads them.
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load raises many types (pickle, zip, runtime) for a bad file
        raise CheckpointError(f"checkpoint {path} could not be read ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT or any(k not in checkpoint for k in _REQUIRED):
        raise CheckpointError(f"{path} is not a vae_fast training checkpoint ({FORMAT})")
    return checkpoint


# A model_config written before issue 10 has no "model" key: it is the Bernoulli MLP, the only model then.
_OLD_MLP_DEFAULTS = {"model": "mlp", "likelihood": "bernoulli", "learn_scale": "none"}


def model_config(checkpoint: dict) -> dict:
    """The checkpoint's model configuration with every key today's models write: a configuration
    without "model" (from before the likelihood and conv options existed) is an MLP Bernoulli VAE.
    Compare this, not checkpoint["model_config"], with a `model.config()`."""
    config = dict(checkpoint["model_config"])
    if "model" not in config:
        config = {**_OLD_MLP_DEFAULTS, **config}
    return config


def model_from_config(config: dict) -> VAE | ConvVAE:
    """A freshly initialised model of the kind and architecture `config` (a `model.config()`) names.

    Raises KeyError for a missing entry and ValueError for an unknown "model" or a bad argument.
    """
    kind, likelihood = config["model"], {"likelihood": config["likelihood"], "learn_scale": config["learn_scale"]}
    if kind == "mlp":
        counts = {key: config[key] for key in ("dispersion", "library_size") if key in config}  # count models only
        return VAE(config["input_dim"], latent_dim=config["latent_dim"], hidden_dims=config["hidden_dims"], **likelihood, **counts)
    if kind == "conv":
        return ConvVAE(tuple(config["image_shape"]), config["latent_dim"], tuple(config["channels"]), **likelihood)
    raise ValueError(f"unknown model kind {kind!r} (expected 'mlp' or 'conv')")


def model_from_checkpoint(checkpoint: dict, path: str | Path = "checkpoint") -> VAE | ConvVAE:
    """The model (VAE, or ConvVAE) the checkpoint describes, with its weights, the learned log_scale
    included. Raises CheckpointError when they disagree or the configuration is unusable."""
    config = model_config(checkpoint)
    try:
        model = model_from_config(config)
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        # load_state_dict's first line only says that it failed; the second says which keys.
        reason = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its model configuration {config}: {reason}") from None
    return model
