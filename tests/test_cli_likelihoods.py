"""`vae-fast train | eval | sample` with Gaussian and Laplace decoders (issue 10): the MLP and the
convolutional model, learned scales, dequantized grey levels, tabular and real-valued npy data,
resume with the new flags, and the one-line errors of bad combinations. Tiny runs (1 epoch)."""

import json
import math

import numpy as np
import pytest
import torch

from vae_fast.checkpoints import load_checkpoint, model_from_checkpoint
from vae_fast.cli import main
from vae_fast.data import load_dataset
from png_grid import read_grid

TINY = ["--epochs", "1", "--latent-dim", "2", "--device", "cpu", "--quiet"]
PNG_ATOL = 2 / 255


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs shared by the tests that only read their outputs."""
    root = tmp_path_factory.mktemp("likelihoods")
    rows = np.random.default_rng(0).normal(2.0, 3.0, size=(60, 5))
    np.save(root / "rows.npy", rows)
    commands = {
        "gaussian-mlp": ["--likelihood", "gaussian", "--learn-scale", "shared", "--hidden-dims", "16"],
        "laplace-wine": ["--dataset", "wine", "--likelihood", "laplace", "--learn-scale", "feature", "--hidden-dims", "16"],
        "conv-dequantized": ["--model", "conv", "--channels", "4", "8", "--likelihood", "gaussian", "--learn-scale", "feature",
                             "--dequantize"],
        "gaussian-npy": ["--dataset", "npy", "--data-file", str(root / "rows.npy"), "--likelihood", "gaussian", "--hidden-dims", "8"],
    }
    for name, flags in commands.items():
        assert main(["train", "--out", str(root / name), *TINY, *flags]) == 0, name
    return root


def _model(run):
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    return checkpoint, model_from_checkpoint(checkpoint).eval()


def test_each_run_writes_its_model_metrics_and_pictures(runs):
    expected = {
        "gaussian-mlp": ("mlp", "gaussian", "shared", ["reconstructions", "samples", "interpolation", "manifold", "latent"]),
        "laplace-wine": ("mlp", "laplace", "feature", ["feature_reconstructions", "samples", "latent"]),
        "conv-dequantized": ("conv", "gaussian", "feature", ["reconstructions", "samples", "interpolation", "manifold"]),
        "gaussian-npy": ("mlp", "gaussian", "none", ["feature_reconstructions", "samples"]),
    }
    for name, (kind, likelihood, learn_scale, pictures) in expected.items():
        checkpoint, model = _model(runs / name)
        config = checkpoint["model_config"]
        assert (config["model"], config["likelihood"], config["learn_scale"]) == (kind, likelihood, learn_scale), name
        history = json.loads((runs / name / "metrics.json").read_text())
        scale = 1.0 if model.log_scale is None else float(model.log_scale.detach().double().exp().mean())
        assert history[-1]["scale"] == pytest.approx(scale, rel=1e-12), name
        for picture in (*pictures, "loss_curves"):
            assert (runs / name / f"{picture}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (name, picture)
    assert load_checkpoint(runs / "conv-dequantized" / "checkpoint.pt")["train_config"]["dequantize"] is True


@pytest.mark.parametrize("name", ["gaussian-mlp", "laplace-wine", "conv-dequantized", "gaussian-npy"])
def test_eval_gives_the_negative_elbo_and_iwae_of_every_likelihood(runs, capsys, name):
    assert main(["eval", str(runs / name / "checkpoint.pt"), "--samples", "16", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["negative_elbo"] == pytest.approx(result["recon"] + result["kl"])
    assert math.isfinite(result["iwae_log_likelihood"]) and result["iwae_samples"] == 16
    # The IWAE bound (K = 16) sits above the one-sample ELBO on average over the held-out set.
    assert result["iwae_log_likelihood"] > -result["negative_elbo"] - 0.5


def test_eval_scores_the_dequantized_held_out_set_of_the_run(runs, capsys):
    """eval reads the run's --dequantize from the checkpoint: its held-out loss is the one
    training logged for the last epoch (the same points, the same seed-0 draw)."""
    run = runs / "conv-dequantized"
    assert main(["eval", str(run / "checkpoint.pt"), "--samples", "2", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    logged = json.loads((run / "metrics.json").read_text())[-1]
    assert result["negative_elbo"] == pytest.approx(logged["test_loss"], rel=1e-6)


def test_gaussian_reconstructions_and_samples_are_the_models_means_clipped(runs, tmp_path, capsys):
    checkpoint, model = _model(runs / "gaussian-mlp")
    x = load_dataset("digits", seed=0).test_x[:8]
    with torch.no_grad():
        means = model.decode_output(model.encode(x)[0])
    tiles = read_grid(runs / "gaussian-mlp" / "reconstructions.png", (8, 8))
    np.testing.assert_allclose(tiles[0], x.reshape(8, 8, 8).numpy(), atol=PNG_ATOL)
    np.testing.assert_allclose(tiles[1], means.clamp(0, 1).reshape(8, 8, 8).numpy(), atol=PNG_ATOL)
    grid = tmp_path / "grid.png"
    assert main(["sample", str(runs / "gaussian-mlp" / "checkpoint.pt"), "--n", "9", "--out", str(grid), "--seed", "3",
                 "--device", "cpu"]) == 0
    z = torch.randn(9, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.decode_output(z).clamp(0, 1).reshape(9, 8, 8).numpy()
    np.testing.assert_allclose(read_grid(grid, (8, 8)).reshape(9, 8, 8), expected, atol=PNG_ATOL)


def test_sample_of_a_conv_model_as_an_array(runs, tmp_path, capsys):
    _, model = _model(runs / "conv-dequantized")
    out = tmp_path / "samples.npy"
    assert main(["sample", str(runs / "conv-dequantized" / "checkpoint.pt"), "--n", "5", "--out", str(out), "--seed", "1",
                 "--device", "cpu"]) == 0
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.decode_output(z)
    values = np.load(out)
    assert values.shape == (5, 1, 8, 8)
    np.testing.assert_allclose(values, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_sample_of_tabular_data_is_a_heatmap(runs, tmp_path):
    from matplotlib import image as mpimg

    out = tmp_path / "wine.png"
    assert main(["sample", str(runs / "laplace-wine" / "checkpoint.pt"), "--n", "20", "--out", str(out), "--device", "cpu"]) == 0
    picture = mpimg.imread(out)
    assert picture.shape[0] > 150 and picture.shape[1] > 150 and picture[..., :3].std() > 0.05


def test_resume_takes_the_model_settings_from_the_checkpoint(runs, tmp_path, capsys):
    """`--resume PATH` alone continues a conv/gaussian/feature/dequantized run; a flag that
    contradicts the checkpoint is refused in one line."""
    checkpoint = str(runs / "conv-dequantized" / "checkpoint.pt")
    out = tmp_path / "more"
    # No --latent-dim either: the model's sizes come from the checkpoint too.
    assert main(["train", "--out", str(out), "--resume", checkpoint, "--epochs", "2", "--device", "cpu", "--quiet"]) == 0
    resumed = load_checkpoint(out / "checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["model_config"]["model"] == "conv"
    assert {k: resumed["train_config"][k] for k in ("likelihood", "learn_scale", "dequantize")} == {
        "likelihood": "gaussian", "learn_scale": "feature", "dequantize": True}
    for flags, message in ((["--likelihood", "laplace"], "--likelihood laplace differs from the gaussian"),
                           (["--learn-scale", "shared"], "--learn-scale shared differs from the feature"),
                           (["--model", "mlp"], "--model mlp differs from the conv"),
                           (["--channels", "4", "16"], "--channels 4 16 differs from the 4 8"),
                           (["--no-dequantize"], "--dequantize False differs from the True"),
                           (["--latent-dim", "3"], "--latent-dim 3 differs from the 2")):
        assert main(["train", "--out", str(tmp_path / "x"), "--resume", checkpoint, *TINY, *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "wine"], "--likelihood bernoulli needs data in [0, 1], but data set wine holds values in"),
        (["--dataset", "wine", "--model", "conv", "--likelihood", "gaussian"],
         "--model conv needs image data, but data set wine has samples of shape (13,)"),
        (["--learn-scale", "shared"], "--learn-scale shared needs --likelihood gaussian or laplace"),
        (["--dataset", "wine", "--likelihood", "gaussian", "--dequantize"], "--dequantize: data set wine holds real values"),
        (["--model", "conv", "--channels", "8", "8", "8", "8"], "too small"),
    ],
)
def test_bad_combinations_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
