"""A training run whose metrics.csv can be worked out by hand: the tests of `vae-fast train`'s
metrics (tests/test_training_metrics.py, tests/test_distributed.py) compare every column with it.

`fix_model` edits a checkpoint of a run trained at a learning rate of 1e-30 so that what each step
sees no longer depends on the posterior noise nor on the weights changing:
- the encoder heads' weights are zeroed, so mu and logvar are their biases for every input (the
  same KL for every sample);
- the decoder's first weight is zeroed, so the decoder ignores z (the same output for every sample);
- Adam at lr 1e-30 moves no weight by more than ~1e-30 a step: every weight of order 0.1 stays
  bitwise where it is, and the zeroed ones stay far below what float32 sums next to the biases.
The run restarts at epoch 0 with no history, so every row of the resumed run's metrics.csv comes
from these fixed weights. `expected_rows` gives those rows from the weights, in float64, with
torch.distributions (tests/likelihood_oracle.py) and the KL weight as the README defines it
(`--beta` ramped linearly over `--kl-warmup` epochs), none of vae_fast's training code.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

import likelihood_oracle
from vae_fast.checkpoints import load_checkpoint, model_from_checkpoint

LEARNING_RATE = 1e-30
# mu and logvar of every sample: a KL of 1.62 nats, large enough that a metric which drops or
# misweights it is off by far more than float32's rounding.
MU = (0.5, -1.5)
LOGVAR = (-1.0, 0.75)
# metrics.csv's columns, in order (scale only for a Gaussian or Laplace decoder)
COLUMNS = ["epoch", "beta", "train_loss", "train_kl", "train_recon", "test_loss", "test_recon", "test_kl", "seconds"]


def fix_model(checkpoint_path: Path) -> dict:
    """Rewrites the checkpoint (of a run at lr LEARNING_RATE, latent_dim 2) as described above, a
    learned log_scale set to values spread over [-0.5, 0.5]; returns its weights."""
    checkpoint = load_checkpoint(checkpoint_path)
    assert [group["lr"] for group in checkpoint["optimizer"]["param_groups"]] == [LEARNING_RATE]
    weights = checkpoint["model"]
    with torch.no_grad():
        weights["encoder_heads.weight"].zero_()
        weights["encoder_heads.bias"].copy_(torch.tensor(MU + LOGVAR))
        weights["decoder.0.weight"].zero_()
        if "log_scale" in weights:
            weights["log_scale"].copy_(torch.linspace(-0.5, 0.5, weights["log_scale"].numel()).reshape(weights["log_scale"].shape))
    checkpoint.update(epoch=0, step=0, partial_epoch=None, history=[])
    torch.save(checkpoint, checkpoint_path)
    return {name: tensor.clone() for name, tensor in weights.items()}


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv parsed: one dict per row, every value a float (epoch an int)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{key: int(value) if key == "epoch" else float(value) for key, value in row.items()} for row in rows]


def _step_sizes(samples: int, batch_size: int) -> list[int]:
    """The sizes of an epoch's steps: full batches, then what is left."""
    return [batch_size] * (samples // batch_size) + ([samples % batch_size] if samples % batch_size else [])


def _kl_weight(beta: float, warmup_epochs: float, step: int, steps_per_epoch: int) -> float:
    """The KL weight of global step `step` (from 0), as the README defines --kl-warmup: beta ramped
    linearly over the first warmup_epochs * steps_per_epoch steps, reaching it at the last of them."""
    if warmup_epochs == 0:
        return beta
    return beta * min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))


@torch.no_grad()
def _recon_and_kl(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(x|z) and KL(q(z|x) || N(0, I)) per sample of x, in the float64 model's precision."""
    x = x.double().reshape(len(x), -1)
    mu, logvar = model.encode(x)
    output = model.decode_output(mu)  # the decoder ignores z: any z gives this output
    return -likelihood_oracle.log_px_given_output(model, x, output), likelihood_oracle.kl_to_prior(mu, logvar)


def expected_rows(checkpoint: dict, weights: dict, train_x: torch.Tensor, test_x: torch.Tensor, *, epochs: int,
                  batch_size: int, beta: float, kl_warmup: float) -> list[dict]:
    """metrics.csv's rows (but seconds) for `epochs` epochs of the model `fix_model` made, over
    train_x in global batches of batch_size, held out on test_x."""
    model = model_from_checkpoint({**checkpoint, "model": weights}).double()
    train_recon, train_kl = _recon_and_kl(model, train_x)
    test_recon, test_kl = _recon_and_kl(model, test_x)
    kl = train_kl[0].item()
    assert torch.allclose(train_kl, torch.full_like(train_kl, kl), rtol=1e-12) and kl > 1, "the KL is not fixed"
    sizes = _step_sizes(len(train_x), batch_size)
    rows = []
    for epoch in range(epochs):
        betas = [_kl_weight(beta, kl_warmup, epoch * len(sizes) + step, len(sizes)) for step in range(len(sizes))]
        weighted_kl = sum(b * n for b, n in zip(betas, sizes)) * kl
        row = {
            "epoch": epoch + 1, "beta": betas[-1],
            "train_loss": (train_recon.sum().item() + weighted_kl) / len(train_x), "train_kl": kl,
            "train_recon": train_recon.mean().item(),
            "test_loss": test_recon.mean().item() + beta * test_kl.mean().item(), "test_recon": test_recon.mean().item(),
            "test_kl": test_kl.mean().item(),
        }
        if model.likelihood != "bernoulli":
            log_scale = torch.zeros(1, dtype=torch.float64) if model.log_scale is None else model.log_scale.detach()
            row["scale"] = log_scale.exp().mean().item()
        rows.append(row)
    return rows


def assert_rows_match(actual: list[dict], expected: list[dict], *, rtol: float = 1e-5) -> None:
    """Every column but seconds within rtol (float32 training against the float64 oracle); seconds
    positive and finite."""
    assert len(actual) == len(expected), (len(actual), len(expected))
    for got, want in zip(actual, expected):
        assert list(got) == COLUMNS + (["scale"] if "scale" in want else []), list(got)
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=rtol), f"epoch {want['epoch']} {key}: {got[key]!r}, expected {value!r}"
        assert 0 < got["seconds"] < math.inf, got["seconds"]
