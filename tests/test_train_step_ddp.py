"""vae_fast.TrainStep with a DistributedDataParallel model, through torchrun (two gloo ranks on the
CPU): each rank steps on its shard of every global batch (the last one partial and uneven, 3 and 2
rows), DDP averages the gradients in the backward, and the gradients are clipped by norm; both
ranks must end with the weights of one plain loop over the whole batch whose loss is the shards'
summed losses over 2 (the same average), up to float32 rounding (the all-reduce sums in another
order). The posterior noise comes in with the batch, so the loop draws what the ranks drew.

Run as a script, this file is one rank (torchrun starts it twice)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vae_fast import TrainStep, vae_loss

WORLD, DATA_SHAPE, LR, CLIP = 2, (37, 12), 0.01, 5.0


class NoiseInVAE(nn.Module):
    """A small MLP VAE taking its posterior noise as an argument."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 6))
        self.decoder = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 12))

    def forward(self, x, eps):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return self.decoder(mu + torch.exp(0.5 * logvar) * eps), mu, logvar


def summed_elbo(model, batch):
    x, eps = batch
    out, mu, logvar = model(x, eps)
    return vae_loss(out, x, mu, logvar, logits=True)


def _data():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(DATA_SHAPE, generator=g), torch.randn(DATA_SHAPE[0], 3, generator=g)
    return list(zip(x.split(16), eps.split(16))) * 2  # steps of 16, 16 and 5 rows, twice


def _shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor.tensor_split(WORLD)[rank]


def _rank(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(NoiseInVAE())
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=LR, fused=True), summed_elbo, clip_grad_norm=CLIP)
    assert step.cuda_graph is False
    for x, eps in _data():
        step((_shard(x, rank), _shard(eps, rank)))
    torch.save(model.module.state_dict(), out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_through_torchrun_trains_as_one_process_over_the_whole_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={WORLD}",
               __file__, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    torch.manual_seed(0)
    model = NoiseInVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for x, eps in _data():
        optimizer.zero_grad()
        (summed_elbo(model, (x, eps)) / WORLD).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
    for name, value in model.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    _rank(Path(sys.argv[1]))
