"""`vae-fast train | eval | sample` end to end on the bundled digits with a tiny model, and the
one-line errors (exit status 2, no traceback) for each kind of bad input."""

import json
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest

from vae_fast.checkpoints import load_checkpoint
from vae_fast.cli import main

TINY = ["--epochs", "1", "--hidden-dims", "16", "--latent-dim", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny digits run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    return out


def _one_line_error(capsys, argv, message) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def test_train_writes_metrics_checkpoint_and_images(trained):
    for name in ("metrics.csv", "metrics.json", "checkpoint.pt", "reconstructions.png", "samples.png", "latent.png",
                 "manifold.png", "interpolation.png", "loss_curves.png"):
        assert (trained / name).exists(), name
    assert load_checkpoint(trained / "checkpoint.pt")["dataset"]["name"] == "digits"


def test_train_resume_adds_epochs(trained, tmp_path):
    out = tmp_path / "more"
    assert main(["train", "--out", str(out), "--resume", str(trained / "checkpoint.pt"), *TINY[2:], "--epochs", "2"]) == 0
    history = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]


def test_eval_prints_elbo_and_iwae(trained, capsys):
    assert main(["eval", str(trained / "checkpoint.pt"), "--samples", "8", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "digits" and result["held_out_samples"] == 359 and result["iwae_samples"] == 8
    assert result["negative_elbo"] == pytest.approx(result["recon"] + result["kl"])
    assert -result["negative_elbo"] - 5 < result["iwae_log_likelihood"] < 0


def test_sample_writes_a_png_grid(trained, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["sample", str(trained / "checkpoint.pt"), "--n", "9", "--out", str(grid), "--device", "cpu"]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(grid) in capsys.readouterr().out


def test_python_dash_m_and_the_console_script(tmp_path):
    scripts = [ep for ep in entry_points(group="console_scripts") if ep.name == "vae-fast"]
    assert [ep.value for ep in scripts] == ["vae_fast.cli:main"]
    result = subprocess.run([sys.executable, "-m", "vae_fast", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--kl-warmup" in result.stdout


def test_missing_and_corrupt_data_files(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--dataset", "npy", "--data-file", str(tmp_path / "none.npy"), *TINY], "does not exist")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"garbage!")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"garbage!")
    _one_line_error(capsys, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path), *TINY], "is not an IDX file")
    _one_line_error(capsys, ["train", "--dataset", "npy", *TINY], "needs --data-file")


def test_bad_arguments(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--out", str(tmp_path), *TINY, "--latent-dim", "0"], "--latent-dim must be positive")
    _one_line_error(capsys, ["train", "--out", str(tmp_path), *TINY, "--hidden-dims", "16", "-3"], "--hidden-dims must be positive")
    _one_line_error(capsys, ["sample", str(tmp_path / "x.pt"), "--n", "0"], "--n must be positive")


def test_bad_checkpoints(capsys, trained, tmp_path):
    _one_line_error(capsys, ["train", "--out", str(tmp_path), "--resume", str(tmp_path / "missing.pt"), *TINY], "does not exist")
    _one_line_error(capsys, ["train", "--out", str(tmp_path), "--resume", str(trained / "checkpoint.pt"), *TINY, "--latent-dim", "3"],
                    "another configuration: latent_dim=2 (this run: 3)")
    _one_line_error(capsys, ["eval", str(tmp_path / "missing.pt")], "does not exist")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    _one_line_error(capsys, ["sample", str(tmp_path / "junk.pt")], "could not be read")
    np.save(tmp_path / "narrow.npy", np.zeros((20, 16), dtype=np.uint8))
    _one_line_error(capsys, ["eval", str(trained / "checkpoint.pt"), "--dataset", "npy", "--data-file", str(tmp_path / "narrow.npy")],
                    "models input_dim=64 features but data set npy:narrow.npy has 16")


def test_diverging_loss_stops_with_a_clear_message(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--out", str(tmp_path), *TINY, "--lr", "1e30"], "loss became nan")
