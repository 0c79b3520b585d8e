"""vae_fast.baselines' count formulas (scvi-tools' log_nb_positive / log_zinb_positive, the plain Poisson)
compute the same likelihood as the oracle where they are accurate (float64, theta <= 1e3, mu >= 1e-3,
well above their eps = 1e-8 guards), so that bench_count_loss.py times like against like."""

import math

import pytest
import torch

from vae_fast import baselines

import count_oracle
from conftest import relative_error


def moderate_inputs(likelihood: str):
    gen = torch.Generator().manual_seed(5)
    log_mu = torch.empty(6, 40, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e4), generator=gen)
    log_theta = torch.empty(40, dtype=torch.float64).uniform_(math.log(1e-2), math.log(1e3), generator=gen)
    x = torch.poisson(log_mu.exp(), generator=gen)
    zi = torch.randn(6, 40, dtype=torch.float64, generator=gen) * 3
    return log_mu, x, log_theta, zi


@pytest.mark.parametrize("likelihood", ["poisson", "nb", "zinb"])
def test_count_loss_is_the_negative_elbo(likelihood):
    log_mu, x, log_theta, zi = moderate_inputs(likelihood)
    mu, logvar = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    loss = baselines.count_loss(log_mu, x, mu, logvar, log_theta, zi, likelihood)
    nll = count_oracle.elements(likelihood, log_mu, x, log_theta.expand(6, 40), zi)["loss"][0].sum()
    kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).sum()
    assert relative_error(loss, nll + kl) <= 1e-8


def test_zinb_formula_takes_theta_per_gene_or_per_element():
    log_mu, x, log_theta, zi = moderate_inputs("zinb")
    per_gene = baselines.log_zinb_positive(x, log_mu.exp(), log_theta.exp(), zi)
    per_element = baselines.log_zinb_positive(x, log_mu.exp(), log_theta.exp().expand(6, 40), zi)
    assert torch.equal(per_gene, per_element)
