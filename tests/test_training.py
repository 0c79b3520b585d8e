"""vae_fast.training: metrics files, images, exact resume, KL warm-up, and the errors of a bad
--resume, a mismatched checkpoint and a diverging loss. Tiny model and data throughout."""

import json
import math
from dataclasses import replace
from pathlib import Path

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


def _interrupted_after_step(config, step: int, monkeypatch) -> dict:
    """Trains until the test hook's SIGINT right after optimizer step `step` (seen at the next
    step boundary) and returns the checkpoint that Ctrl-C saved."""
    monkeypatch.setenv("VAE_FAST_TEST_SIGNAL_AFTER_STEP", f"{step}:SIGINT")
    with pytest.raises(TrainingInterrupted):
        train(config, _toy())
    monkeypatch.delenv("VAE_FAST_TEST_SIGNAL_AFTER_STEP")
    return load_checkpoint(Path(config.out) / "checkpoint.pt")


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
    saved = _interrupted_after_step(mid, 6, monkeypatch)
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


# --- Gaussian and Laplace decoders, learned scales, dequantization, the model kind (issue 10).


def _real(name: str = "real", *, shift: float = 0.0) -> Dataset:
    """Continuous rows of 6 features, standard-normal-ish, not in [0, 1]."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 6, generator=g) + shift
    return Dataset(name, x[:64], None, x[64:], None, (6,), continuous=True)


def _grey(name: str = "grey") -> Dataset:
    """16 grey levels per pixel (k / 15), 4x4 images, marked quantized."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 16, (80, 16), generator=g).float() / 15
    return Dataset(name, x[:64], None, x[64:], None, (4, 4), levels=16)


@pytest.mark.parametrize("likelihood, learn_scale", [("gaussian", "shared"), ("laplace", "feature"), ("gaussian", "none")])
def test_continuous_likelihoods_train_and_log_the_scale(tmp_path, likelihood, learn_scale):
    history = train(_config(tmp_path, likelihood=likelihood, learn_scale=learn_scale, lr=1e-2), _real())
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    config = checkpoint["model_config"]
    assert (config["likelihood"], config["learn_scale"]) == (likelihood, learn_scale)
    model = model_from_checkpoint(checkpoint)
    # The logged scale is exp(log_scale), averaged over features for a per-feature scale.
    expected = 1.0 if learn_scale == "none" else float(torch.exp(model.log_scale.detach().double()).mean())
    assert history[-1]["scale"] == pytest.approx(expected, rel=1e-12)
    if learn_scale != "none":
        assert history[-1]["scale"] != 1.0  # it was learned (initialised at exp(0) = 1)
        assert tuple(model.log_scale.shape) == {"shared": (), "feature": (6,)}[learn_scale]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "scale" in header
    assert history[-1]["test_loss"] == pytest.approx(history[-1]["test_recon"] + history[-1]["test_kl"])
    assert history[-1]["test_loss"] < history[0]["test_loss"] or len(history) == 1


def test_bernoulli_metrics_have_no_scale_column(tmp_path):
    history = train(_config(tmp_path, epochs=1), _toy())
    assert "scale" not in history[0]


def test_the_objective_is_the_negative_elbo_of_the_models_likelihood():
    """NegativeElbo's loss against torch.distributions in float64 on the same posterior draw."""
    from torch.distributions import Laplace, Normal

    from vae_fast import VAE
    from vae_fast.training import NegativeElbo

    torch.manual_seed(0)
    model = VAE(6, latent_dim=3, hidden_dims=(8,), likelihood="laplace", learn_scale="feature").double()
    with torch.no_grad():
        model.log_scale.copy_(torch.linspace(-1, 1, 6))
    x = _real().train_x[:10].double()
    torch.manual_seed(5)
    loss, kl = NegativeElbo(model)(x, 0.5)
    torch.manual_seed(5)
    location, mu, logvar = model.forward_output(x)
    nll = -Laplace(location, model.log_scale.exp()).log_prob(x).sum()
    expected_kl = torch.distributions.kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum()
    assert loss.item() == pytest.approx((nll + 0.5 * expected_kl).item(), rel=1e-10)
    assert kl.item() == pytest.approx(expected_kl.item(), rel=1e-10)


def test_resume_with_a_learned_scale_and_dequantization_continues_exactly(tmp_path):
    settings = {"likelihood": "gaussian", "learn_scale": "feature", "dequantize": True, "epochs": 3, "lr": 1e-2}
    train(_config(tmp_path, out=str(tmp_path / "straight"), **settings), _dequantized_grey())
    train(_config(tmp_path, out=str(tmp_path / "split"), **{**settings, "epochs": 1}), _dequantized_grey())
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert {k: split["train_config"][k] for k in ("likelihood", "learn_scale", "dequantize", "model")} == {
        "likelihood": "gaussian", "learn_scale": "feature", "dequantize": True, "model": "mlp"}
    assert "log_scale" in split["model"]
    train(_config(tmp_path, out=str(tmp_path / "split"), resume=str(tmp_path / "split" / "checkpoint.pt"), **settings),
          _dequantized_grey())
    _same_run(load_checkpoint(tmp_path / "split" / "checkpoint.pt"), load_checkpoint(tmp_path / "straight" / "checkpoint.pt"))


def _dequantized_grey() -> Dataset:
    from vae_fast.data import dequantize_levels

    data = _grey()
    data.test_x = dequantize_levels(data.test_x, 16, generator=torch.Generator().manual_seed(9))
    data.dequantized = True
    return data


def test_resume_refuses_another_likelihood_or_dequantization(tmp_path):
    train(_config(tmp_path, epochs=1, likelihood="gaussian", learn_scale="shared"), _real())
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"likelihood=gaussian \(this run: laplace\)"):
        train(_config(tmp_path, likelihood="laplace", learn_scale="shared", resume=checkpoint), _real())
    with pytest.raises(CheckpointError, match=r"learn_scale=shared \(this run: feature\)"):
        train(_config(tmp_path, likelihood="gaussian", learn_scale="feature", resume=checkpoint), _real())
    train(_config(tmp_path, out=str(tmp_path / "dq"), epochs=1, likelihood="gaussian", dequantize=True), _dequantized_grey())
    with pytest.raises(CheckpointError, match=r"dequantize=True \(this run: False\)"):
        train(_config(tmp_path, likelihood="gaussian", resume=str(tmp_path / "dq" / "checkpoint.pt")), _grey())


def test_dequantized_training_draws_fresh_noise_in_each_levels_bin(tmp_path, monkeypatch):
    """Every training batch is dequantized afresh: each value lies in its grey level's bin, and the
    same row gets other noise in another epoch; the held-out set is not touched by training."""
    import vae_fast.training as training

    seen = []
    original = training.dequantize_levels

    def recording(x, levels, **kwargs):
        out = original(x, levels, **kwargs)
        seen.append((x.clone(), out.clone()))
        return out

    monkeypatch.setattr(training, "dequantize_levels", recording)
    data = _dequantized_grey()
    held_out = data.test_x.clone()
    train(_config(tmp_path, likelihood="gaussian", dequantize=True, batch_size=64), data)  # one batch per epoch
    assert len(seen) == 2 and torch.equal(data.test_x, held_out)
    for grey, out in seen:
        k = torch.round(grey.double() * 15)
        assert bool((out.double() >= k / 16).all()) and bool((out.double() < (k + 1) / 16).all())
    # The same 64 rows in both epochs (in another order): sorted per row, the noise differs.
    (grey_1, out_1), (grey_2, out_2) = seen
    key = lambda rows: sorted(range(len(rows)), key=lambda i: rows[i].tolist())  # noqa: E731
    assert torch.equal(grey_1[key(grey_1)], grey_2[key(grey_2)])
    assert not torch.equal(out_1[key(grey_1)], out_2[key(grey_2)])


@pytest.mark.parametrize(
    "overrides, data, message",
    [
        ({}, _real, r"--likelihood bernoulli needs data in \[0, 1\], but data set real holds values in \[.*\]; use --likelihood gaussian"),
        ({"learn_scale": "shared"}, _toy, "--learn-scale shared needs --likelihood gaussian or laplace"),
        ({"dequantize": True}, _grey, "--dequantize serves --likelihood gaussian or laplace"),
        ({"model": "conv", "likelihood": "gaussian"}, _real, r"--model conv needs image data, but data set real has samples of shape \(6,\)"),
        ({"model": "transformer"}, _toy, "--model must be one of mlp, conv"),
        ({"likelihood": "cauchy"}, _toy, "--likelihood must be one of bernoulli, gaussian, laplace"),
        ({"likelihood": "gaussian", "learn_scale": "row"}, _toy, "--learn-scale must be one of none, shared, feature"),
        ({"channels": (8, 0)}, _toy, "--channels must be positive"),
    ],
)
def test_bad_model_likelihood_and_data_combinations(tmp_path, overrides, data, message):
    with pytest.raises(ValueError, match=message):
        train(_config(tmp_path, **overrides), data())
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # refused before training


def test_bernoulli_still_takes_grey_levels_in_the_unit_interval(tmp_path):
    history = train(_config(tmp_path, epochs=1), _grey())
    assert math.isfinite(history[0]["test_loss"])


def test_tabular_images_are_feature_scatter_plots(tmp_path):
    from matplotlib import image as mpimg

    data = _real()
    data.feature_names = tuple(f"f{i}" for i in range(6))
    train(_config(tmp_path, epochs=1, images=True, likelihood="gaussian", learn_scale="shared"), data)
    out = tmp_path / "run"
    for name in ("feature_reconstructions", "samples", "latent", "loss_curves"):
        picture = mpimg.imread(out / f"{name}.png")
        assert picture.shape[0] > 200 and picture.shape[1] > 200, name
        assert picture[..., :3].std() > 0.05, f"{name}.png is blank"
    # No image grids for data that is not an image.
    assert not (out / "reconstructions.png").exists() and not (out / "interpolation.png").exists()
    # 6 features, 5 scatter plots per row: 5 across and 2 down, so wider than tall.
    picture = mpimg.imread(out / "feature_reconstructions.png")
    assert picture.shape[1] > picture.shape[0]


def test_r_squared_matches_scikit_learn():
    from sklearn.metrics import r2_score

    from vae_fast.plots import r_squared

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(50, 4))
    prediction = truth + rng.normal(scale=[0.1, 0.5, 1.0, 3.0], size=(50, 4))
    np.testing.assert_allclose(r_squared(truth, prediction), r2_score(truth, prediction, multioutput="raw_values"), rtol=1e-12)
    constant = np.ones((5, 1))
    assert np.isnan(r_squared(constant, constant + 1)[0])


def test_gaussian_image_grids_show_the_means_clipped_to_the_unit_interval(tmp_path):
    """A Gaussian decoder's means can leave [0, 1]: the grid shows them clipped (the gray colormap
    with vmin 0, vmax 1), read back from the PNG against the model's means."""
    from vae_fast import VAE
    from vae_fast.plots import save_reconstructions

    torch.manual_seed(0)
    model = VAE(16, latent_dim=2, hidden_dims=(8,), likelihood="gaussian").eval()
    # Means near -1.5, 0.5 and 2.5, laid out so that no row or column of a tile is all white or all
    # black (read_grid finds the tiles by their non-white pixels).
    pattern = torch.tensor([-1.5, 0.5, 2.5, 0.2])
    with torch.no_grad():
        model.decoder[-1].bias.copy_(pattern[(torch.arange(4)[:, None] + torch.arange(4)).flatten() % 4])
        model.decoder[-1].weight.mul_(0.1)
    x = _grey().test_x[:8]
    with torch.no_grad():
        means = model.decode_output(model.encode(x)[0])
    assert bool((means < 0).any()) and bool((means > 1).any()) and bool(((means > 0) & (means < 1)).any())
    save_reconstructions(model, x, (4, 4), tmp_path / "reconstructions.png")
    tiles = read_grid(tmp_path / "reconstructions.png", (4, 4))
    assert tiles.shape == (2, 8, 4, 4)
    np.testing.assert_allclose(tiles[0], x.reshape(8, 4, 4).numpy(), atol=2 / 255)
    np.testing.assert_allclose(tiles[1], means.clamp(0, 1).reshape(8, 4, 4).numpy(), atol=2 / 255)


def test_gaussian_training_writes_the_image_grids(tmp_path):
    train(_config(tmp_path, epochs=1, images=True, likelihood="gaussian", learn_scale="shared"), _grey())
    out = tmp_path / "run"
    shapes = {"reconstructions": (2, 8), "samples": (8, 8), "interpolation": (1, 10), "manifold": (15, 15)}
    for name, shape in shapes.items():
        assert read_grid(out / f"{name}.png", (4, 4)).shape[:2] == shape, name
