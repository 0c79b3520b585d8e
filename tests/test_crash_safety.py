"""Crash-safe training (issue 9): `vae-fast train` killed with SIGKILL mid-epoch or while its
checkpoint is being written, then continued with --resume, ends with exactly the checkpoint of an
uninterrupted run (weights, Adam state, RNG states, history: torch.equal on every tensor), and no
kill leaves an unreadable file under a checkpoint's name. The metrics files are parsed: what a kill
leaves holds one finite row per completed epoch, the uninterrupted run's, and a resumed run's hold
them all. Ctrl-C (SIGINT) saves, exits with status
130 and one line (no traceback), and resuming from what it saved finishes exactly too.

The runs are real `python -m vae_fast train` processes (one test calls train() in process). The
kills land at known points through the test hooks VAE_FAST_TEST_SIGNAL_AFTER_STEP (training.py: a
signal after the N-th step) and VAE_FAST_TEST_KILL_IN_CHECKPOINT (checkpoints.py: SIGKILL part way
through the N-th checkpoint), not after guessed sleeps. To fit a 2-core machine the processes of each phase (the reference and
the interrupted runs, then the resumed runs) run at the same time, one thread each.
"""

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import metrics_oracle
from vae_fast.checkpoints import CheckpointError, atomic_write, load_checkpoint
from vae_fast.data import Dataset
from vae_fast.training import TrainConfig, TrainingInterrupted, train

EPOCHS = 3  # of 10 steps: 160 training images in batches of 16
ARGS = ["--dataset", "npy", "--epochs", str(EPOCHS), "--batch-size", "16", "--hidden-dims", "16", "--latent-dim", "2",
        "--lr", "1e-2", "--device", "cpu", "--seed", "3", "--quiet"]

# name -> (test hook environment, expected exit status, whether a resumed run follows). Steps count
# from 1 in each process. Resumed runs write the PNG images at the end, the slowest part of a run, so
# only the interruptions that leave something new to resume from are resumed.
INTERRUPTED = {
    # SIGKILL after step 15: in the middle of epoch 2, which is lost; epoch 1's checkpoint remains.
    "kill_mid_epoch": ({"VAE_FAST_TEST_SIGNAL_AFTER_STEP": "15:SIGKILL"}, -signal.SIGKILL, True),
    # SIGKILL after 4 KiB of epoch 2's checkpoint: epoch 1's stays whole under the name.
    "kill_in_checkpoint": ({"VAE_FAST_TEST_KILL_IN_CHECKPOINT": "2"}, -signal.SIGKILL, True),
    # SIGINT after step 14: seen at step 15, so the run saves epoch 2 after its step 5 and stops.
    "sigint_mid_epoch": ({"VAE_FAST_TEST_SIGNAL_AFTER_STEP": "14:SIGINT"}, 130, True),
    # SIGKILL in the very first checkpoint: no checkpoint at all, rather than a truncated one.
    "kill_in_first_checkpoint": ({"VAE_FAST_TEST_KILL_IN_CHECKPOINT": "1"}, -signal.SIGKILL, False),
    # SIGINT after step 9: seen at step 10, the last of epoch 1, which is finished and saved as usual.
    "sigint_at_epoch_end": ({"VAE_FAST_TEST_SIGNAL_AFTER_STEP": "9:SIGINT"}, 130, False),
}
RESUMED = [name for name, (_, _, resume) in INTERRUPTED.items() if resume]


def _start(out: Path, data: Path, hooks: dict | None = None, resume: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_FAST_TEST_")}
    env.update(OMP_NUM_THREADS="1", **(hooks or {}))
    command = [sys.executable, "-m", "vae_fast", "train", *ARGS, "--data-file", str(data), "--out", str(out)]
    if resume:
        command += ["--resume", str(out / "checkpoint.pt")]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return process.returncode, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: {"first": (status, stderr), "files": {...}, "resumed": (status, stderr)}} and the
    reference run's checkpoint, from two phases of concurrent processes."""
    root = tmp_path_factory.mktemp("crash")
    data = root / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, size=(200, 6, 6), dtype=np.uint8))
    started = {"reference": _start(root / "reference", data)}
    started.update({name: _start(root / name, data, hooks) for name, (hooks, _, _) in INTERRUPTED.items()})
    first = {name: _finish(process) for name, process in started.items()}
    assert first["reference"][0] == 0, first["reference"][1][-3000:]

    results = {}
    for name in INTERRUPTED:
        out = root / name
        # What the interruption left, before anything else writes there.
        files = {path.name: _readable(path) for path in sorted(out.iterdir())}
        position = None
        if files.get("checkpoint.pt"):
            checkpoint = load_checkpoint(out / "checkpoint.pt")
            position = (checkpoint["epoch"], checkpoint["step"])
        results[name] = {"first": first[name], "files": files, "position": position, "out": out,
                         "metrics": _metrics(out) if files.get("metrics.csv") else None}
    resumed = {name: _start(results[name]["out"], data, resume=True) for name in RESUMED}
    for name, process in resumed.items():
        results[name]["resumed"] = _finish(process)
    return results, load_checkpoint(root / "reference" / "checkpoint.pt")


def _readable(path: Path) -> bool:
    """Whether the file reads back: torch.load for checkpoints, the csv or json parser for metrics."""
    try:
        if path.suffix == ".csv":
            metrics_oracle.read_metrics(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001  (any failure to read is what is looked for)
        return False
    return True


def _metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """The rows of out/metrics.csv (parsed, numbers as floats) and of out/metrics.json."""
    return metrics_oracle.read_metrics(out / "metrics.csv"), json.loads((out / "metrics.json").read_text())


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _assert_identical(actual, expected, where="checkpoint"):
    """Equal bit for bit, tensors by torch.equal; the timings and the --resume path excepted."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        ignored = {"seconds", "resume", "out"}  # the time an epoch took; train_config's paths
        assert set(actual) - ignored == set(expected) - ignored, where
        for key in set(expected) - ignored:
            _assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_identical(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("name", list(INTERRUPTED))
def test_no_interruption_leaves_an_unreadable_checkpoint(runs, name):
    run = runs[0][name]
    status, err = run["first"]
    assert status == INTERRUPTED[name][1], err[-3000:]
    # No checkpoint name ever holds a truncated file: a kill's leftover is at most a `.part` file.
    assert set(run["files"]) <= {"checkpoint.pt", "checkpoint.pt.part", "metrics.csv", "metrics.json"}, run["files"]
    assert run["files"].get("checkpoint.pt", True) is True, f"{name}: checkpoint.pt cannot be read"


@pytest.mark.parametrize("name", RESUMED)
def test_interrupted_then_resumed_run_equals_the_uninterrupted_one(runs, name):
    results, reference = runs
    run = results[name]
    status, err = run["resumed"]
    assert status == 0, err[-3000:]
    resumed = load_checkpoint(run["out"] / "checkpoint.pt")
    assert resumed["epoch"] == EPOCHS and resumed["step"] == 0
    _assert_identical(resumed, reference)
    assert not (run["out"] / "checkpoint.pt.part").exists(), "the next save replaces a killed save's leftover"
    csv_rows, json_rows = _metrics(run["out"])
    assert csv_rows == json_rows
    assert _without_seconds(csv_rows) == _without_seconds(reference["history"])


@pytest.mark.parametrize("name", [name for name in INTERRUPTED if name != "kill_in_first_checkpoint"])
def test_metrics_left_by_an_interruption_hold_each_completed_epoch(runs, name):
    """What the interruption left in metrics.csv and metrics.json: the columns, one row per epoch the
    checkpoint completed, finite numbers, those of the uninterrupted run (its seconds aside)."""
    results, reference = runs
    run = results[name]
    csv_rows, json_rows = run["metrics"]
    assert csv_rows == json_rows
    completed = run["position"][0]
    assert [row["epoch"] for row in csv_rows] == list(range(1, completed + 1))
    for row in csv_rows:
        assert list(row) == metrics_oracle.COLUMNS
        assert all(math.isfinite(value) for value in row.values()), row
    assert _without_seconds(csv_rows) == _without_seconds(reference["history"][:completed])


def test_sigkill_mid_epoch_leaves_the_last_epochs_checkpoint(runs):
    run = runs[0]["kill_mid_epoch"]
    assert run["files"] == {"checkpoint.pt": True, "metrics.csv": True, "metrics.json": True}
    assert run["position"] == (1, 0)


def test_sigkill_while_the_checkpoint_is_written_keeps_the_previous_one(runs):
    results, _ = runs
    # The kill really hit the write: the temporary file is there and truncated, the name holds epoch 1.
    assert results["kill_in_checkpoint"]["files"] == {
        "checkpoint.pt": True, "checkpoint.pt.part": False, "metrics.csv": True, "metrics.json": True}
    assert results["kill_in_checkpoint"]["position"] == (1, 0)
    assert results["kill_in_first_checkpoint"]["files"] == {"checkpoint.pt.part": False}


def test_sigint_exits_130_with_one_line_naming_the_saved_checkpoint(runs):
    results, _ = runs
    for name, position, saved in (("sigint_mid_epoch", "epoch 2, after step 5", (1, 5)), ("sigint_at_epoch_end", "epoch 1", (1, 0))):
        status, err = results[name]["first"]
        assert results[name]["position"] == saved
        checkpoint = results[name]["out"] / "checkpoint.pt"
        assert status == 130, err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith("vae-fast train: interrupted;") and f"({position})" in err and f"--resume {checkpoint}" in err, err
        assert results[name]["files"]["checkpoint.pt"] is True


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "file.txt"
    path.write_text("old")
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and not (tmp_path / "file.txt.part").exists()
    with atomic_write(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and len(synced) == 2  # the file's data, then the folder's entry


def test_train_raises_training_interrupted_and_a_mid_epoch_checkpoint_needs_the_same_batches(tmp_path, monkeypatch):
    """In process: train() turns SIGINT into TrainingInterrupted naming the checkpoint, gives the
    SIGINT handler back, and a checkpoint saved mid-epoch refuses another --batch-size (its step
    index would name other batches)."""
    x = torch.bernoulli(torch.full((80, 16), 0.3), generator=torch.Generator().manual_seed(0))
    toy = Dataset("toy", x[:64], None, x[64:], None, (4, 4))  # 4 steps of 16 per epoch
    config = TrainConfig(dataset="toy", epochs=2, batch_size=16, latent_dim=2, hidden_dims=(8,), out=str(tmp_path),
                         progress=False, images=False)
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setenv("VAE_FAST_TEST_SIGNAL_AFTER_STEP", "2:SIGINT")
    with pytest.raises(TrainingInterrupted, match=r"\(epoch 1, after step 3\)") as stopped:
        train(config, toy)
    assert signal.getsignal(signal.SIGINT) is handler
    assert stopped.value.checkpoint == tmp_path / "checkpoint.pt"
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (saved["epoch"], saved["step"], saved["partial_epoch"]["seen"]) == (0, 3, 48)
    monkeypatch.delenv("VAE_FAST_TEST_SIGNAL_AFTER_STEP")
    with pytest.raises(CheckpointError, match=r"middle of epoch 1 with --batch-size 16 on 1 process\(es\)"):
        train(replace(config, batch_size=8, resume=str(tmp_path / "checkpoint.pt")), toy)
    assert [row["epoch"] for row in train(replace(config, resume=str(tmp_path / "checkpoint.pt")), toy)] == [1, 2]
