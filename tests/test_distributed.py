"""Training on two gloo ranks over loopback (CPU) does what one process does:
- `torchrun --nproc_per_node=2 -m vae_fast train` computes the same weights as one process that
  takes both ranks' shards of every batch (each with that rank's noise stream) and sums their
  gradients before each Adam step;
- two ranks log what one process logs for the same global batches: every column of metrics.csv,
  for the fixed model of tests/metrics_oracle.py (whose losses do not depend on the ranks' noise),
  so the train metrics are the sums over both ranks' shards, not rank 0's alone;
- stopped by Ctrl-C in the middle of an epoch (the test hook's SIGINT on every rank) and resumed,
  two ranks end with the uninterrupted torchrun's checkpoint bit for bit, each rank drawing on
  from its own saved RNG state.
The runs after the first go through train() in two processes of torch.multiprocessing (one process
group for all of them, no images: a fraction of torchrun's start-up), while the torchrun runs; one
thread per rank throughout."""

import os
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data.distributed import DistributedSampler

import metrics_oracle
from vae_fast import VAE, vae_loss
from vae_fast.checkpoints import load_checkpoint
from vae_fast.data import load_dataset
from vae_fast.training import TrainConfig, TrainingInterrupted, train

WORLD, SEED, EPOCHS, BATCH, LR = 2, 0, 2, 16, 1e-2
IMAGES = 64  # 4x4; 20% held out leaves 52 training images: per rank 26, steps of 8, 8, 8 and 2
BETA, WARMUP = 2.5, 1.5  # the fixed model's runs
# Ctrl-C after step 5 (epoch 2's first) is acted on after step 6: saved at epoch 2, after step 2.
INTERRUPT_AFTER_STEP = 5


def _config(root: Path, out: str, **overrides) -> TrainConfig:
    """The torchrun command's settings as train() takes them."""
    config = TrainConfig(dataset="npy", data_file=str(root / "data.npy"), epochs=EPOCHS, batch_size=BATCH, lr=LR,
                         latent_dim=2, hidden_dims=(8,), seed=SEED, out=str(root / out), progress=False, images=False)
    return replace(config, **overrides)


def _fixed_config(root: Path, out: str = "fixed", **overrides) -> TrainConfig:
    return _config(root, out, lr=metrics_oracle.LEARNING_RATE, beta=BETA, kl_warmup=WARMUP, **overrides)


def _torchrun(root: Path, out: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_FAST_TEST_")}
    env.update(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={WORLD}",
               "-m", "vae_fast", "train", "--dataset", "npy", "--data-file", str(root / "data.npy"), "--epochs", str(EPOCHS),
               "--batch-size", str(BATCH), "--lr", str(LR), "--latent-dim", "2", "--hidden-dims", "8", "--seed", str(SEED),
               "--device", "cpu", "--out", str(root / out), "--quiet"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_ranks(rank: int, root: str) -> None:
    """One rank of the train() runs: interrupted, then resumed into another folder; the fixed model's."""
    root = Path(root)
    for name in [k for k in os.environ if k.startswith("VAE_FAST_TEST_")]:
        del os.environ[name]
    os.environ["WORLD_SIZE"] = str(WORLD)  # train() reads it, as under torchrun
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=(root / "rendezvous").as_uri(), rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    data = load_dataset("npy", data_file=root / "data.npy", seed=SEED)
    os.environ["VAE_FAST_TEST_SIGNAL_AFTER_STEP"] = f"{INTERRUPT_AFTER_STEP}:SIGINT"
    try:
        train(_config(root, "interrupted"), data)
    except TrainingInterrupted:
        pass
    else:
        raise AssertionError("the test hook's Ctrl-C did not stop training")
    del os.environ["VAE_FAST_TEST_SIGNAL_AFTER_STEP"]
    # Rank 1 leaves train() while rank 0 may still write the checkpoint (under torchrun both exit first).
    dist.barrier()
    train(_config(root, "resumed", resume=str(root / "interrupted" / "checkpoint.pt")), data)
    train(_fixed_config(root, "fixed-two-ranks", resume=str(root / "fixed.pt")), data)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder every run wrote in, the torchrun's (exit status, stderr), and the 1-process run of
    the fixed model: (its metrics, the fixed weights, its checkpoint)."""
    root = tmp_path_factory.mktemp("ddp")
    np.save(root / "data.npy", np.random.default_rng(0).integers(0, 256, size=(IMAGES, 4, 4), dtype=np.uint8))
    data = load_dataset("npy", data_file=root / "data.npy", seed=SEED)
    # The fixed model: one epoch at lr 1e-30 in one process, then rewritten.
    train(_fixed_config(root, epochs=1), data)
    (root / "fixed" / "checkpoint.pt").rename(root / "fixed.pt")
    weights = metrics_oracle.fix_model(root / "fixed.pt")

    torchrun = _torchrun(root, "straight")
    mp.spawn(_two_ranks, args=(str(root),), nprocs=WORLD)
    one_process = train(_fixed_config(root, resume=str(root / "fixed.pt")), data)
    try:
        _, err = torchrun.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        torchrun.kill()
        torchrun.communicate()
        raise
    return root, (torchrun.returncode, err), (one_process, weights, load_checkpoint(root / "fixed" / "checkpoint.pt"))


def _single_process_equivalent(data) -> VAE:
    torch.manual_seed(SEED)
    model = VAE(data.input_dim, latent_dim=2, hidden_dims=(8,))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    rng = []
    for rank in range(WORLD):
        torch.manual_seed(SEED + rank)
        rng.append(torch.get_rng_state())
    for epoch in range(EPOCHS):
        shards = []
        for rank in range(WORLD):
            sampler = DistributedSampler(range(len(data.train_x)), num_replicas=WORLD, rank=rank, shuffle=True, seed=SEED)
            sampler.set_epoch(epoch)
            shards.append(torch.tensor(list(sampler)).split(BATCH // WORLD))
        for step_indices in zip(*shards):
            optimizer.zero_grad()
            for rank, indices in enumerate(step_indices):
                torch.set_rng_state(rng[rank])
                x = data.train_x[indices]
                logits, mu, logvar = model.forward_logits(x)
                vae_loss(logits, x, mu, logvar, logits=True).backward()  # gradients add up across shards
                rng[rank] = torch.get_rng_state()
            optimizer.step()
    return model


def test_two_gloo_ranks_match_one_process(runs):
    root, (status, err), _ = runs
    assert status == 0, err[-3000:]
    checkpoint = load_checkpoint(root / "straight" / "checkpoint.pt")
    assert checkpoint["epoch"] == EPOCHS and len(checkpoint["rng_states"]) == WORLD

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        expected = _single_process_equivalent(load_dataset("npy", data_file=root / "data.npy", seed=SEED))
    finally:
        torch.set_num_threads(threads)
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(checkpoint["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_two_ranks_log_the_metrics_of_one_process(runs):
    root, _, (one_process, weights, one_checkpoint) = runs
    data = load_dataset("npy", data_file=root / "data.npy", seed=SEED)
    # The 1-process run logged the float64 recomputation's numbers (as tests/test_training_metrics.py
    # checks at more length), and the two ranks logged the 1-process run's.
    expected = metrics_oracle.expected_rows(one_checkpoint, weights, data.train_x, data.test_x, epochs=EPOCHS,
                                            batch_size=BATCH, beta=BETA, kl_warmup=WARMUP)
    metrics_oracle.assert_rows_match(one_process, expected)
    logged = metrics_oracle.read_metrics(root / "fixed-two-ranks" / "metrics.csv")
    metrics_oracle.assert_rows_match(logged, [{k: v for k, v in row.items() if k != "seconds"} for row in one_process],
                                     rtol=1e-6)


def test_interrupted_and_resumed_two_ranks_end_as_the_uninterrupted_run(runs):
    root, (status, err), _ = runs
    assert status == 0, err[-3000:]
    interrupted = load_checkpoint(root / "interrupted" / "checkpoint.pt")
    assert (interrupted["epoch"], interrupted["step"]) == (1, 2)
    resumed = load_checkpoint(root / "resumed" / "checkpoint.pt")
    straight = load_checkpoint(root / "straight" / "checkpoint.pt")
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for key, state in straight["optimizer"]["state"].items():
        assert all(torch.equal(resumed["optimizer"]["state"][key][k], state[k]) for k in state), key
    for rank, (a, b) in enumerate(zip(resumed["rng_states"], straight["rng_states"], strict=True)):
        assert torch.equal(a, b), f"rank {rank}'s RNG state"
    drop_time = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert drop_time(resumed["history"]) == drop_time(straight["history"])


def _command_rank(rank: int, root: str, port: int) -> None:
    """One rank of `vae-fast train` run in this process as torchrun would start it; records whether
    the process group is still open when the command has returned."""
    from vae_fast.cli import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    status = main(["train", "--dataset", "npy", "--data-file", str(Path(root) / "data.npy"), "--epochs", "1",
                   "--batch-size", str(BATCH), "--latent-dim", "2", "--hidden-dims", "8", "--device", "cpu",
                   "--out", str(Path(root) / "command"), "--quiet"])
    (Path(root) / f"rank{rank}.txt").write_text(f"{status} {dist.is_initialized()}")


def test_the_train_command_leaves_the_process_group_it_joined(tmp_path):
    """Left open to interpreter teardown, gloo's threads can abort a rank after a good run (torch
    2.11 did in CI: "terminate called without an active exception"); the command closes it."""
    import socket

    np.save(tmp_path / "data.npy", np.random.default_rng(0).integers(0, 256, size=(IMAGES, 4, 4), dtype=np.uint8))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_command_rank, args=(str(tmp_path), port), nprocs=WORLD)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)] == ["0 False"] * WORLD
    assert load_checkpoint(tmp_path / "command" / "checkpoint.pt")["epoch"] == 1
