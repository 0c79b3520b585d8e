"""vae_fast.vae_loss vs the eager baselines and their torch.compile, on probabilities and on logits,
forward and forward+backward."""

import pytest
import torch
from conftest import DEVICES

from vae_fast.bench import timing
from vae_fast.bench.cases import IMPLEMENTATIONS, MODES, LOSS_OPS, loss_case

BATCHES = (128, 1024, 4096)  # 65536 is the report runner's: minutes per case on a small CPU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("op", sorted(LOSS_OPS))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vae_loss(bench_case, mode, implementation, op, batch, backward, device):
    device = torch.device(device)
    case = loss_case(op, batch, 20, backward=backward, dtype=torch.float32, device=device,
                     rotation_bytes=4 * timing.last_level_cache_bytes(device))
    bench_case(case, implementation, mode)
