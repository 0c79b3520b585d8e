"""Every column of `vae-fast train`'s metrics.csv against a recomputation in float64 from the
weights (tests/metrics_oracle.py: a model fixed so that each step's loss depends on its batch
alone). beta != 1 with a KL warm-up, so that a reconstruction metric taken as loss - KL (without
the step's KL weight) is off; 70 training samples in batches of 16, so that the last step is short
and a loss averaged over steps instead of samples is off too."""

import time
from dataclasses import replace

import pytest
import torch

import metrics_oracle
from vae_fast.checkpoints import load_checkpoint
from vae_fast.data import Dataset
from vae_fast.training import TrainConfig, train

EPOCHS, BATCH, BETA, WARMUP = 3, 16, 2.5, 1.5  # 5 steps per epoch, the last of 6 samples


def _binary() -> Dataset:
    x = torch.bernoulli(torch.full((80, 16), 0.3), generator=torch.Generator().manual_seed(0))
    return Dataset("binary", x[:70], None, x[70:], None, (4, 4))


def _real() -> Dataset:
    x = torch.randn(80, 6, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    return Dataset("real", x[:70], None, x[70:], None, (6,), continuous=True)


@pytest.mark.parametrize("likelihood, learn_scale, data", [("bernoulli", "none", _binary), ("laplace", "feature", _real),
                                                           ("gaussian", "none", _real)],
                         ids=["bernoulli", "laplace-feature-scale", "gaussian-unit-scale"])
def test_every_metric_matches_the_float64_recomputation(tmp_path, likelihood, learn_scale, data):
    data = data()
    config = TrainConfig(dataset=data.name, likelihood=likelihood, learn_scale=learn_scale, epochs=1, batch_size=BATCH,
                         lr=metrics_oracle.LEARNING_RATE, latent_dim=2, hidden_dims=(8,), beta=BETA, kl_warmup=WARMUP,
                         out=str(tmp_path), progress=False, images=False)
    train(config, data)
    checkpoint_path = tmp_path / "checkpoint.pt"
    weights = metrics_oracle.fix_model(checkpoint_path)
    started = time.perf_counter()
    history = train(replace(config, epochs=EPOCHS, resume=str(checkpoint_path)), data)
    elapsed = time.perf_counter() - started

    checkpoint = load_checkpoint(checkpoint_path)
    for name, tensor in weights.items():  # the model stayed fixed: Adam at lr 1e-30 moved nothing that counts
        torch.testing.assert_close(checkpoint["model"][name], tensor, rtol=0, atol=1e-25, msg=name)
    expected = metrics_oracle.expected_rows(checkpoint, weights, data.train_x, data.test_x, epochs=EPOCHS,
                                            batch_size=BATCH, beta=BETA, kl_warmup=WARMUP)
    logged = metrics_oracle.read_metrics(tmp_path / "metrics.csv")
    metrics_oracle.assert_rows_match(logged, expected)
    assert sum(row["seconds"] for row in logged) <= elapsed
    assert logged == history  # the CSV holds what train() returned
