"""vae_fast.reparameterize vs the eager baseline and its torch.compile, forward and forward+backward."""

import pytest
import torch
from conftest import DEVICES

from vae_fast.bench import timing
from vae_fast.bench.cases import IMPLEMENTATIONS, MODES, reparameterize_case

BATCHES = (128, 1024, 4096)  # 65536 is the report runner's: minutes per case on a small CPU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_reparameterize(bench_case, mode, implementation, batch, backward, device):
    device = torch.device(device)
    case = reparameterize_case(batch, 20, backward=backward, dtype=torch.float32, device=device,
                               rotation_bytes=4 * timing.last_level_cache_bytes(device))
    bench_case(case, implementation, mode)
