"""vae_fast.training: metrics files, images, exact resume, KL warm-up, and the errors of a bad
--resume, a mismatched checkpoint and a diverging loss. Tiny model and data throughout."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from vae_fast.checkpoints import CheckpointError, load_checkpoint, model_from_checkpoint
from vae_fast.data import Dataset
from vae_fast.training import TrainConfig, TrainingDiverged, TrainingInterrupted, kl_weight, train
from png_grid import read_grid


def _toy(name: str = "toy", *, nan: bool = False) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((80, 16), 0.3), generator=g)
    if nan:
        x[:, 0] = float("nan")
    y = torch.arange(80) % 4
    return Dataset(name, x[:64], y[:64], x[64:], y[64:], (4, 4))


def _config(tmp_path, **overrides) -> TrainConfig:
    base = TrainConfig(dataset="toy", epochs=2, batch_size=16, latent_dim=2, hidden_dims=(8,),
                       out=str(tmp_path / "run"), progress=False, images=False)
    return replace(base, **overrides)


def test_metrics_and_checkpoint_are_written(tmp_path):
    history = train(_config(tmp_path), _toy())
    out = tmp_path / "run"
    assert [row["epoch"] for row in history] == [1, 2]
    assert json.loads((out / "metrics.json").read_text()) == history
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "test_loss", "test_recon", "test_kl"} <= set(header)
    for row in history:
        assert row["test_loss"] == pytest.approx(row["test_recon"] + row["test_kl"])
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["model_config"]["latent_dim"] == 2


def test_resume_continues_exactly(tmp_path):
    straight = train(_config(tmp_path, out=str(tmp_path / "straight"), epochs=3), _toy())
    train(_config(tmp_path, out=str(tmp_path / "split"), epochs=1), _toy())
    resumed = train(_config(tmp_path, out=str(tmp_path / "split"), epochs=3, resume=str(tmp_path / "split" / "checkpoint.pt")), _toy())
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for (_, state_a), (_, state_b) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    drop_time = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert drop_time(resumed) == drop_time(straight)


def test_images_are_written(tmp_path):
    train(_config(tmp_path, epochs=1, images=True), _toy())
    out = tmp_path / "run"
    for name in ("latent", "loss_curves"):  # plots, not grids: only that they are PNGs
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # The grids, read back from the PNGs: tile counts and layout, and the reconstructions' top
    # row holds the held-out inputs (binary 4x4 images here), the bottom row decode(mu(x)).
    shapes = {"reconstructions": (2, 8), "samples": (8, 8), "interpolation": (1, 10), "manifold": (15, 15)}
    tiles = {name: read_grid(out / f"{name}.png", (4, 4)) for name in shapes}
    for name, shape in shapes.items():
        assert tiles[name].shape == (*shape, 4, 4), name
    model = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt")).eval()
    x = _toy().test_x[:8]
    with torch.no_grad():
        recon = torch.sigmoid(model.decode_logits(model.encode(x)[0]))
    np.testing.assert_allclose(tiles["reconstructions"][0], x.reshape(8, 4, 4).numpy(), atol=2 / 255)
    np.testing.assert_allclose(tiles["reconstructions"][1], recon.reshape(8, 4, 4).numpy(), atol=2 / 255)
    train(_config(tmp_path, epochs=1, images=True, latent_dim=3, out=str(tmp_path / "pca")), _toy())
    assert (tmp_path / "pca" / "latent.png").exists() and not (tmp_path / "pca" / "manifold.png").exists()


def test_kl_warmup_ramps_beta_linearly():
    assert kl_weight(2.0, 0, step=0, steps_per_epoch=10) == 2.0
    assert kl_weight(2.0, 2, step=9, steps_per_epoch=10) == pytest.approx(1.0)
    assert kl_weight(2.0, 2, step=50, steps_per_epoch=10) == 2.0


def test_resume_of_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(_config(tmp_path, resume=str(tmp_path / "nope.pt")), _toy())


def test_resume_of_a_corrupt_file(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        train(_config(tmp_path, resume=str(tmp_path / "bad.pt")), _toy())


def test_resume_from_another_configuration(tmp_path):
    train(_config(tmp_path, epochs=1), _toy())
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"another configuration: latent_dim=2 \(this run: 3\)"):
        train(_config(tmp_path, latent_dim=3, resume=checkpoint), _toy())
    with pytest.raises(CheckpointError, match=r"dataset=toy \(this run: other\)"):
        train(_config(tmp_path, resume=checkpoint), _toy("other"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train(_config(tmp_path, epochs=1), _toy())
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 1.*last good checkpoint is .*checkpoint.pt \(epoch 1\)"):
        train(_config(tmp_path, epochs=3, resume=str(checkpoint)), _toy(nan=True))
    assert load_checkpoint(checkpoint)["epoch"] == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": 0}, "--epochs must be positive"),
        ({"batch_size": -1}, "--batch-size must be positive"),
        ({"latent_dim": 0}, "--latent-dim must be positive"),
        ({"hidden_dims": (8, 0)}, "--hidden-dims must be positive"),
        ({"lr": 0.0}, "--lr must be positive"),
        ({"beta": -1.0}, "--beta must be >= 0"),
        ({"kl_warmup": -2.0}, "--kl-warmup must be >= 0"),
    ],
)
def test_bad_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(_config(tmp_path, **overrides), _toy())


# --- Exact resume in the middle of a KL warm-up, and the learning rate on --resume (issue 13).
# The toy set: 64 training rows in batches of 16, 4 steps per epoch; a warm-up of 2.5 epochs
# ramps the KL weight over the first 10 steps, so it is still ramping in epochs 1 to 3.
WARMUP = {"epochs": 4, "beta": 2.0, "kl_warmup": 2.5, "lr": 1e-2}


def _same_run(a: dict, b: dict) -> None:
    """Two checkpoints of the same training: identical weights, Adam state and history."""
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for key, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][key][k]) for k in state), key
    drop_time = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert drop_time(a["history"]) == drop_time(b["history"])


def test_resume_in_the_middle_of_the_kl_warmup_continues_exactly(tmp_path, monkeypatch):
    straight = train(_config(tmp_path, out=str(tmp_path / "straight"), **WARMUP), _toy())
    # The warm-up really is in progress across the resume points: the KL weight of each epoch's
    # last step is beta * min(1, steps so far / 10).
    assert [row["beta"] for row in straight] == pytest.approx([0.8, 1.6, 2.0, 2.0])
    reference = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    # At an epoch boundary (after epoch 1, KL weight 0.8 of 2).
    split = _config(tmp_path, out=str(tmp_path / "split"), **WARMUP)
    train(replace(split, epochs=1), _toy())
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["train_config"]["kl_warmup"] == 2.5
    train(replace(split, resume=str(tmp_path / "split" / "checkpoint.pt")), _toy())
    _same_run(load_checkpoint(tmp_path / "split" / "checkpoint.pt"), reference)
    # In the middle of an epoch: Ctrl-C (the test hook's SIGINT after step 6, seen at step 7)
    # saves epoch 2 after its 3rd step, KL weight 1.4 of 2, and the resumed run finishes exactly.
    mid = _config(tmp_path, out=str(tmp_path / "mid"), **WARMUP)
    monkeypatch.setenv("VAE_FAST_TEST_SIGNAL_AFTER_STEP", "6:SIGINT")
    with pytest.raises(TrainingInterrupted):
        train(mid, _toy())
    monkeypatch.delenv("VAE_FAST_TEST_SIGNAL_AFTER_STEP")
    saved = load_checkpoint(tmp_path / "mid" / "checkpoint.pt")
    assert (saved["epoch"], saved["step"]) == (1, 3)
    assert kl_weight(2.0, 2.5, step=1 * 4 + 3 - 1, steps_per_epoch=4) == pytest.approx(1.4)
    train(replace(mid, resume=str(tmp_path / "mid" / "checkpoint.pt")), _toy())
    _same_run(load_checkpoint(tmp_path / "mid" / "checkpoint.pt"), reference)


def test_resume_takes_the_learning_rate_from_the_checkpoint(tmp_path):
    """--lr on --resume is ignored (documented: "taken from the checkpoint on --resume"): a resume
    with another --lr trains exactly as the uninterrupted run at the original one, and the
    checkpoint records the rate actually used."""
    train(_config(tmp_path, out=str(tmp_path / "straight"), epochs=3, lr=1e-2), _toy())
    train(_config(tmp_path, out=str(tmp_path / "split"), epochs=1, lr=1e-2), _toy())
    train(_config(tmp_path, out=str(tmp_path / "split"), epochs=3, lr=0.5, resume=str(tmp_path / "split" / "checkpoint.pt")), _toy())
    reference, resumed = load_checkpoint(tmp_path / "straight" / "checkpoint.pt"), load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert [group["lr"] for group in resumed["optimizer"]["param_groups"]] == [1e-2]
    _same_run(resumed, reference)
    assert resumed["train_config"]["lr"] == 1e-2
    # Control: the rate stored in the checkpoint is what the resumed run uses. The same epoch-1
    # checkpoint with its Adam rate edited to 0.5 resumes (at --lr 1e-2) to other weights.
    train(_config(tmp_path, out=str(tmp_path / "edited"), epochs=1, lr=1e-2), _toy())
    edited = load_checkpoint(tmp_path / "edited" / "checkpoint.pt")
    edited["optimizer"]["param_groups"][0]["lr"] = 0.5
    torch.save(edited, tmp_path / "edited" / "checkpoint.pt")
    train(_config(tmp_path, out=str(tmp_path / "edited"), epochs=3, lr=1e-2, resume=str(tmp_path / "edited" / "checkpoint.pt")), _toy())
    result = load_checkpoint(tmp_path / "edited" / "checkpoint.pt")
    assert result["train_config"]["lr"] == 0.5
    assert not torch.equal(result["model"]["decoder.0.weight"], reference["model"]["decoder.0.weight"])
