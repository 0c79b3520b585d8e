"""`vae-fast train | eval | sample` end to end on the bundled digits with a tiny model, and the
one-line errors (exit status 2, no traceback) for each kind of bad input."""

import copy
import json
import math
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vae_fast.checkpoints import load_checkpoint, model_from_checkpoint
from vae_fast.cli import main
from vae_fast.data import load_dataset
from png_grid import read_grid

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


def test_resume_takes_the_kl_schedule_and_seed_from_the_checkpoint(tmp_path, capsys):
    """`--resume PATH` alone continues exactly: beta, the KL warm-up and the seed (data split and
    order) come from the checkpoint, so the resumed run equals the uninterrupted one; a flag that
    contradicts the checkpoint is refused, since it would change the schedule mid-run (it used to
    end a warm-up silently: KL weights 0.8, 2.0, 2.0 instead of 0.8, 1.6, 2.0)."""
    run = ["--hidden-dims", "16", "--latent-dim", "2", "--device", "cpu", "--quiet", "--batch-size", "512"]
    schedule = ["--beta", "2", "--kl-warmup", "2.5", "--seed", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--out", str(straight), "--epochs", "3", *schedule, *run]) == 0
    assert main(["train", "--out", str(split), "--epochs", "1", *schedule, *run]) == 0
    assert main(["train", "--out", str(split), "--epochs", "3", "--resume", str(split / "checkpoint.pt"), *run]) == 0
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert [row["beta"] for row in a["history"]] == [row["beta"] for row in b["history"]]
    assert a["history"][1]["beta"] < 2.0  # the warm-up was still running at the resume point
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert {k: b["train_config"][k] for k in ("beta", "kl_warmup", "seed")} == {"beta": 2.0, "kl_warmup": 2.5, "seed": 4}
    for flag, value in (("--beta", "1"), ("--kl-warmup", "0"), ("--seed", "0")):
        _one_line_error(capsys, ["train", "--out", str(tmp_path / "x"), "--epochs", "4", "--resume",
                                 str(split / "checkpoint.pt"), flag, value, *run],
                        f"{flag} {float(value) if flag != '--seed' else int(value)} differs from the")
    # the same value as the checkpoint's is fine
    assert main(["train", "--out", str(tmp_path / "y"), "--epochs", "4", "--resume", str(split / "checkpoint.pt"),
                 "--beta", "2", *run]) == 0


def test_eval_prints_elbo_and_iwae(trained, capsys):
    assert main(["eval", str(trained / "checkpoint.pt"), "--samples", "8", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "digits" and result["held_out_samples"] == 359 and result["iwae_samples"] == 8
    assert result["negative_elbo"] == pytest.approx(result["recon"] + result["kl"])
    # Both numbers recomputed here in float64 from the checkpoint, with torch.distributions rather
    # than vae_fast's loss or evaluation code, on the very noise `eval` draws (its documented seed 0).
    checkpoint = load_checkpoint(trained / "checkpoint.pt")
    model = model_from_checkpoint(checkpoint)
    x = load_dataset("digits", seed=checkpoint["train_config"]["seed"]).test_x
    expected = _independent_held_out_metrics(model, x, iwae_samples=8)
    for key in ("negative_elbo", "recon", "kl", "iwae_log_likelihood"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-4), key
    # And the IWAE bound sits above the ELBO (by 0.085 nat for this 1-epoch model and these seeds).
    assert result["iwae_log_likelihood"] > -result["negative_elbo"]


def _log_joint_minus_q(model, x, eps) -> torch.Tensor:
    """log p(x|z) + log p(z) - log q(z|x) for z = mu + s * eps, eps [..., N, L]; model float64."""
    from torch.distributions import Bernoulli, Independent, Normal

    x = x.double()
    mu, logvar = model.encode(x)
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    z = mu + torch.exp(0.5 * logvar) * eps.double()
    prior = Independent(Normal(torch.zeros_like(z), torch.ones_like(z)), 1)
    decoder = Independent(Bernoulli(logits=model.decode_logits(z), validate_args=False), 1)
    return decoder.log_prob(x.expand_as(decoder.mean)) + prior.log_prob(z) - q.log_prob(z)


@torch.no_grad()
def _independent_held_out_metrics(model, x, *, iwae_samples: int) -> dict:
    """What `vae-fast eval` should print, computed independently. The noise is the only thing
    taken from eval's implementation: the negative ELBO draws eps with the fused kernel from a
    generator seeded 0 for the whole held-out set (one batch of up to 1000; the kernel with mu = 0
    and logvar = 0 returns its eps), the IWAE torch.randn([K, B, L]) from another seeded 0, per
    batch of 100."""
    from torch.distributions import Bernoulli, Independent, Normal

    import vae_fast

    assert len(x) <= 1000
    mu, logvar = model.encode(x)
    eps = vae_fast.reparameterize(torch.zeros_like(mu), torch.zeros_like(logvar), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(model).double()
    mu, logvar = model.encode(x.double())
    z = mu + torch.exp(0.5 * logvar) * eps.double()
    recon = -Independent(Bernoulli(logits=model.decode_logits(z), validate_args=False), 1).log_prob(x.double()).mean().item()
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    kl = torch.distributions.kl_divergence(q, Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)).mean().item()
    generator = torch.Generator().manual_seed(0)
    log_likelihoods = []
    for batch in x.split(100):
        eps = torch.randn((iwae_samples, len(batch), model.latent_dim), generator=generator)
        log_w = _log_joint_minus_q(model, batch, eps)
        log_likelihoods.append(torch.logsumexp(log_w, dim=0) - math.log(iwae_samples))
    return {"negative_elbo": recon + kl, "recon": recon, "kl": kl, "iwae_log_likelihood": torch.cat(log_likelihoods).mean().item()}


# --- The images hold what they claim (issue 13): each grid is read back from its PNG (tests/png_grid.py)
# and every tile compared with the images recomputed here from the checkpoint. Tolerance 2/255: the
# gray colormap's 256-entry table and the PNG's 8 bits each round by up to about 1/255.
PNG_ATOL = 2 / 255


def _decoded(model, z) -> np.ndarray:
    """Decoder probabilities for z [N, L] as [N, 8, 8] (the digits' tiles)."""
    with torch.no_grad():
        return torch.sigmoid(model.decode_logits(torch.as_tensor(z, dtype=torch.float32))).reshape(-1, 8, 8).numpy()


def _checkpoint_model_and_held_out(run: Path):
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    model = model_from_checkpoint(checkpoint).eval()
    return model, load_dataset("digits", seed=checkpoint["train_config"]["seed"]).test_x


def test_reconstruction_grid_is_inputs_over_their_reconstructions(trained):
    model, x = _checkpoint_model_and_held_out(trained)
    tiles = read_grid(trained / "reconstructions.png", (8, 8))
    assert tiles.shape == (2, 8, 8, 8)  # two rows of eight tiles
    with torch.no_grad():
        mu = model.encode(x[:8])[0]
    np.testing.assert_allclose(tiles[0], x[:8].reshape(8, 8, 8).numpy(), atol=PNG_ATOL, err_msg="top row: the first 8 held-out inputs")
    np.testing.assert_allclose(tiles[1], _decoded(model, mu), atol=PNG_ATOL, err_msg="bottom row: decode(mu(x))")
    assert np.abs(tiles[1] - tiles[0]).max() > 0.2  # the rows differ: a swapped or repeated row would fail


def test_latent_manifold_grid_has_z1_across_and_z2_down(trained):
    from statistics import NormalDist

    model, _ = _checkpoint_model_and_held_out(trained)
    tiles = read_grid(trained / "manifold.png", (8, 8))
    assert tiles.shape == (15, 15, 8, 8)
    # Evenly spaced prior quantiles 0.05..0.95: z1 grows left to right, z2 falls top to bottom.
    axis = [NormalDist().inv_cdf(0.05 + 0.9 * i / 14) for i in range(15)]
    z = [[axis[c], axis[14 - r]] for r in range(15) for c in range(15)]
    np.testing.assert_allclose(tiles.reshape(225, 8, 8), _decoded(model, z), atol=PNG_ATOL)
    # The check can tell the axes apart: the transposed layout differs well beyond the tolerance.
    assert np.abs(tiles.transpose(1, 0, 2, 3) - tiles).max() > 0.05


def test_interpolation_and_training_samples_grids(trained):
    model, x = _checkpoint_model_and_held_out(trained)
    with torch.no_grad():
        mu = model.encode(x[:2])[0]
    tiles = read_grid(trained / "interpolation.png", (8, 8))
    assert tiles.shape == (1, 10, 8, 8)
    t = torch.arange(10, dtype=torch.float32)[:, None] / 9
    np.testing.assert_allclose(tiles[0], _decoded(model, (1 - t) * mu[0] + t * mu[1]), atol=PNG_ATOL)
    # samples.png: 64 prior draws from a generator seeded with the run's seed (0), 8 per row.
    tiles = read_grid(trained / "samples.png", (8, 8))
    assert tiles.shape == (8, 8, 8, 8)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(tiles.reshape(64, 8, 8), _decoded(model, z), atol=PNG_ATOL)


def test_sample_writes_a_png_grid(trained, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["sample", str(trained / "checkpoint.pt"), "--n", "9", "--out", str(grid), "--device", "cpu", "--seed", "5"]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(grid) in capsys.readouterr().out
    model, _ = _checkpoint_model_and_held_out(trained)
    tiles = read_grid(grid, (8, 8))
    assert tiles.shape == (3, 3, 8, 8)  # ceil(sqrt(9)) tiles per row
    z = torch.randn(9, 2, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(tiles.reshape(9, 8, 8), _decoded(model, z), atol=PNG_ATOL)


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


def test_an_infinite_kl_weight_or_warmup_is_a_one_line_error(capsys, tmp_path):
    """--beta inf made the first loss inf, reported as a divergence ("try a lower --lr");
    --kl-warmup inf trained with a KL weight of 0 for ever."""
    _one_line_error(capsys, ["train", "--out", str(tmp_path), *TINY, "--beta", "inf"], "--beta must be >= 0 and finite, got inf")
    _one_line_error(capsys, ["train", "--out", str(tmp_path), *TINY, "--kl-warmup", "inf"],
                    "--kl-warmup must be >= 0 and finite (epochs), got inf")
    assert not (tmp_path / "metrics.csv").exists()


def _each_workflow_command(trained: Path, tmp_path: Path) -> list[list[str]]:
    checkpoint = str(trained / "checkpoint.pt")
    return [["train", "--out", str(tmp_path / "run"), *TINY], ["eval", checkpoint, "--samples", "2"],
            ["sample", checkpoint, "--out", str(tmp_path / "samples.png")]]


def test_a_device_torch_does_not_know_is_a_one_line_error(capsys, trained, tmp_path):
    for argv in _each_workflow_command(trained, tmp_path):
        _one_line_error(capsys, [*argv, "--device", "tpu"], "--device 'tpu' is not a device torch knows: use cpu, cuda or cuda:N")
        # no GPU 64 here, whether the machine has none (no cuda device) or some (their count)
        _one_line_error(capsys, [*argv, "--device", "cuda:64"], "--device cuda:64: this machine has ")


def test_a_gpu_where_there_is_none_is_a_one_line_error(trained, tmp_path):
    """--device cuda in a process that sees no GPU (CUDA_VISIBLE_DEVICES empty, so on any machine)
    was a traceback from the first tensor moved there. One process runs the three commands."""
    commands = [[*argv, "--device", "cuda"] for argv in _each_workflow_command(trained, tmp_path)]
    run = "import json, sys\nfrom vae_fast.cli import main\nprint(json.dumps([main(a) for a in json.loads(sys.argv[1])]))"
    done = subprocess.run([sys.executable, "-c", run, json.dumps(commands)], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=300)
    assert json.loads(done.stdout) == [2, 2, 2], done.stderr
    assert done.stderr.splitlines() == [f"vae-fast {argv[0]}: error: --device cuda: this machine has no cuda device "
                                        "(torch sees only the CPU); use --device cpu" for argv in commands], done.stderr


def test_bad_checkpoints(capsys, trained, tmp_path):
    _one_line_error(capsys, ["train", "--out", str(tmp_path), "--resume", str(tmp_path / "missing.pt"), *TINY], "does not exist")
    _one_line_error(capsys, ["train", "--out", str(tmp_path), "--resume", str(trained / "checkpoint.pt"), *TINY, "--latent-dim", "3"],
                    "--latent-dim 3 differs from the 2 that")
    _one_line_error(capsys, ["eval", str(tmp_path / "missing.pt")], "does not exist")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    _one_line_error(capsys, ["sample", str(tmp_path / "junk.pt")], "could not be read")
    np.save(tmp_path / "narrow.npy", np.zeros((20, 16), dtype=np.uint8))
    _one_line_error(capsys, ["eval", str(trained / "checkpoint.pt"), "--dataset", "npy", "--data-file", str(tmp_path / "narrow.npy")],
                    "models input_dim=64 features but data set npy:narrow.npy has 16")


def test_diverging_loss_stops_with_a_clear_message(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--out", str(tmp_path), *TINY, "--lr", "1e30"], "loss became nan")


# --- "The last good checkpoint" must be good (issue 13). With the whole digits training set in one
# batch each epoch is a single Adam step, and Adam's first steps move every weight by about --lr
# whatever the gradient, so --lr 1000 keeps two epochs finite and breaks the third, and --lr 1e30
# breaks the first. The breakage happens in an epoch's last (only) step, after the per-step loss check.
ONE_STEP_EPOCHS = ["--batch-size", "100000", "--hidden-dims", "16", "--latent-dim", "2", "--device", "cpu", "--quiet"]
NAMED_CHECKPOINT = re.compile(r"the last good checkpoint is (\S+) \(epoch (\d+)\)")


def _diverged_message(capsys, argv) -> str:
    assert main(argv) == 2, "training should have stopped on a diverged epoch"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _held_out_loss(checkpoint: dict) -> float:
    """Mean negative ELBO of the checkpoint's model on the digits held-out set in float64, written
    out here rather than taken from vae_fast: torch's BCE on the decoder's logits, one posterior
    draw, plus KL(N(mu, s^2) || N(0, 1)) = (mu^2 + s^2 - 1 - ln s^2) / 2 with ln s^2 = logvar (not
    torch.distributions: these weights are extreme, and s = exp(logvar / 2) underflows to 0)."""
    model = model_from_checkpoint(checkpoint).double()
    x = load_dataset("digits", seed=checkpoint["train_config"]["seed"]).test_x.double()
    with torch.no_grad():
        mu, logvar = model.encode(x)
        eps = torch.randn(mu.shape, dtype=mu.dtype, generator=torch.Generator().manual_seed(0))
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = F.binary_cross_entropy_with_logits(model.decode_logits(z), x, reduction="sum")
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum()
    return ((recon + kl) / len(x)).item()


def _assert_good(path: Path, epoch: int) -> None:
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == epoch
    for name, tensor in checkpoint["model"].items():
        assert torch.isfinite(tensor).all(), f"{path}: {name} is not finite"
    assert math.isfinite(_held_out_loss(checkpoint)), f"{path}: held-out loss is not finite"
    assert math.isfinite(checkpoint["history"][-1]["test_loss"])


def test_named_last_good_checkpoint_is_good_when_an_epochs_last_step_diverges(capsys, tmp_path):
    out = tmp_path / "run"
    err = _diverged_message(capsys, ["train", "--out", str(out), "--epochs", "3", "--lr", "1000", *ONE_STEP_EPOCHS])
    named = NAMED_CHECKPOINT.search(err)
    assert named, err
    path, epoch = Path(named.group(1)), int(named.group(2))
    assert path == out / "checkpoint.pt" and epoch >= 1, err
    _assert_good(path, epoch)  # the bad epoch did not overwrite it


def test_resumed_run_names_the_checkpoint_it_resumed_from(capsys, tmp_path):
    first = tmp_path / "first"
    assert main(["train", "--out", str(first), "--epochs", "2", "--lr", "1000", *ONE_STEP_EPOCHS]) == 0
    _assert_good(first / "checkpoint.pt", 2)
    # The resumed third epoch diverges before anything is written in the new folder, so the last
    # good checkpoint is the one resumed from, not a file that does not exist.
    resumed = tmp_path / "resumed"
    err = _diverged_message(capsys, ["train", "--out", str(resumed), "--resume", str(first / "checkpoint.pt"),
                                     "--epochs", "3", *ONE_STEP_EPOCHS])
    named = NAMED_CHECKPOINT.search(err)
    assert named and Path(named.group(1)) == first / "checkpoint.pt" and named.group(2) == "2", err
    assert not (resumed / "checkpoint.pt").exists()
    _assert_good(first / "checkpoint.pt", 2)


def test_no_checkpoint_is_labelled_good_when_the_first_epoch_diverges(capsys, tmp_path):
    out = tmp_path / "run"
    err = _diverged_message(capsys, ["train", "--out", str(out), "--epochs", "1", "--lr", "1e30", *ONE_STEP_EPOCHS])
    assert "no good checkpoint was written" in err and "last good checkpoint is" not in err, err
    assert not (out / "checkpoint.pt").exists()


def test_a_bad_checkpoint_resumed_from_is_not_called_good(capsys, tmp_path):
    first = tmp_path / "first"
    assert main(["train", "--out", str(first), "--epochs", "1", *ONE_STEP_EPOCHS]) == 0
    # A checkpoint with NaN weights, as the checks' absence let through before: resuming from it
    # diverges at once, and it must not be named as the good one to go back to.
    checkpoint = load_checkpoint(first / "checkpoint.pt")
    checkpoint["model"]["encoder.0.weight"].fill_(float("nan"))
    torch.save(checkpoint, first / "checkpoint.pt")
    err = _diverged_message(capsys, ["train", "--out", str(tmp_path / "resumed"), "--resume", str(first / "checkpoint.pt"),
                                     "--epochs", "2", *ONE_STEP_EPOCHS])
    assert "loss became nan at epoch 2, step 1" in err, err
    assert "no good checkpoint was written" in err and "last good checkpoint is" not in err, err


def test_step_settings_come_from_the_checkpoint_and_are_defended(capsys, tmp_path):
    """--bf16 (like --compile and --cuda-graph) changes the arithmetic: `--resume` alone keeps the
    checkpoint's, a contradicting flag is refused; a checkpoint from before the settings existed
    resumes as what it was, float32 without a graph."""
    run = ["--hidden-dims", "16", "--latent-dim", "2", "--device", "cpu", "--quiet", "--batch-size", "512"]
    out = tmp_path / "bf16"
    assert main(["train", "--out", str(out), "--epochs", "1", "--bf16", *run]) == 0
    assert main(["train", "--out", str(out), "--epochs", "2", "--resume", str(out / "checkpoint.pt"), *run]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["train_config"]["bf16"] is True
    _one_line_error(capsys, ["train", "--out", str(tmp_path / "x"), "--epochs", "3", "--resume", str(out / "checkpoint.pt"),
                             "--no-bf16", *run], "--bf16 False differs from the True that")
    old = load_checkpoint(out / "checkpoint.pt")
    for key in ("compile", "bf16", "cuda_graph"):
        del old["train_config"][key]
    torch.save(old, tmp_path / "old.pt")
    _one_line_error(capsys, ["train", "--out", str(tmp_path / "x"), "--epochs", "3", "--resume", str(tmp_path / "old.pt"),
                             "--cuda-graph", *run], "--cuda-graph True differs from the False that")
    assert main(["train", "--out", str(tmp_path / "y"), "--epochs", "3", "--resume", str(tmp_path / "old.pt"), *run]) == 0
    assert load_checkpoint(tmp_path / "y" / "checkpoint.pt")["train_config"]["bf16"] is False


def test_cuda_graph_on_the_cpu_is_a_one_line_error(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--out", str(tmp_path), *TINY, "--cuda-graph"],
                    "--cuda-graph replays the training step from a CUDA graph: it needs --device cuda, got --device cpu")
