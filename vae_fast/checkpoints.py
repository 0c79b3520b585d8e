"""Training checkpoints: one file with everything a run needs to resume exactly (model, optimizer,
RNG states, history) and to rebuild the model for `eval` and `sample`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import VAE

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "model_from_checkpoint", "FORMAT"]

FORMAT = "vae_fast.checkpoint/1"
_REQUIRED = ("format", "model_config", "model", "optimizer", "epoch", "dataset", "train_config", "rng_states", "history")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or made for another configuration."""


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Write atomically (temporary file, then rename): a crash mid-write keeps the previous checkpoint."""
    path = Path(path)
    partial = path.with_name(path.name + ".part")
    torch.save({"format": FORMAT, **checkpoint}, partial)
    os.replace(partial, path)


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


def model_from_checkpoint(checkpoint: dict, path: str | Path = "checkpoint") -> VAE:
    """The VAE the checkpoint describes, with its weights. Raises CheckpointError when they disagree."""
    config = checkpoint["model_config"]
    try:
        model = VAE(config["input_dim"], latent_dim=config["latent_dim"], hidden_dims=config["hidden_dims"])
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its model configuration {config}: {first_line}") from None
    return model
