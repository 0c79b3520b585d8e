"""`torchrun --nproc_per_node=2 -m vae_fast train` on CPU (gloo over loopback) computes what one
process computes: the same weights as one process that takes both ranks' shards of every batch
(each with that rank's noise stream) and sums their gradients before each Adam step."""

import os
import subprocess
import sys

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from vae_fast import VAE, vae_loss
from vae_fast.checkpoints import load_checkpoint
from vae_fast.data import load_dataset

WORLD, SEED, EPOCHS, BATCH, LR = 2, 0, 2, 16, 1e-2


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


def test_two_gloo_ranks_match_one_process(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(64, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "data.npy", images)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={WORLD}",
        "-m", "vae_fast", "train", "--dataset", "npy", "--data-file", str(tmp_path / "data.npy"),
        "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", str(LR), "--latent-dim", "2", "--hidden-dims", "8",
        "--device", "cpu", "--seed", str(SEED), "--out", str(out), "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["epoch"] == EPOCHS and len(checkpoint["rng_states"]) == WORLD

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        expected = _single_process_equivalent(load_dataset("npy", data_file=tmp_path / "data.npy", seed=SEED))
    finally:
        torch.set_num_threads(threads)
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(checkpoint["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
