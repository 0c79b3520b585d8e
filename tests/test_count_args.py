"""The count likelihoods' arguments (issue 20): each misuse of log_theta, zi_logits, log_scale or
logits, and each target that is no count, is a one-line error naming the argument, from the public
function and from the op itself; the autograd node hands zi_logits its gradient whichever of the
optional tensors are given. The numbers themselves are tests/test_count_likelihoods.py's."""

from __future__ import annotations

import math

import pytest
import torch

import vae_fast
from conftest import DEVICES


def count_case(batch=3, features=4, latents=2, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    log_mu = torch.randn(batch, features, generator=g)
    x = torch.poisson(torch.full((batch, features), 2.0), generator=g)
    mu = torch.randn(batch, latents, generator=g)
    logvar = torch.randn(batch, latents, generator=g)
    return [t.to(device) for t in (log_mu, x, mu, logvar)]


# (keyword arguments, the error's type, a pattern its message must match)
MISUSES = [
    (dict(likelihood="nb"), ValueError, r"'nb' likelihood needs log_theta"),
    (dict(likelihood="zinb", zi_logits="z"), ValueError, r"'zinb' likelihood needs log_theta"),
    (dict(likelihood="zinb", log_theta=0.0), ValueError, r"'zinb' likelihood needs zi_logits"),
    (dict(likelihood="poisson", log_theta=0.0), ValueError, r"log_theta applies to the 'nb' and 'zinb'"),
    (dict(likelihood="nb", log_theta=0.0, zi_logits="z"), ValueError, r"zi_logits applies to the 'zinb' likelihood only"),
    (dict(likelihood="poisson", zi_logits="z"), ValueError, r"zi_logits applies to the 'zinb' likelihood only"),
    (dict(likelihood="nb", log_theta=0.0, log_scale=0.0), ValueError, r"log_scale applies to the 'gaussian' and 'laplace'"),
    (dict(likelihood="poisson", logits=True), ValueError, r"logits=True applies to the Bernoulli likelihood only"),
    (dict(likelihood="gaussian", log_theta=0.0), ValueError, r"log_theta applies to the count likelihoods"),
    (dict(likelihood="bernoulli", zi_logits="z"), ValueError, r"zi_logits applies to the count likelihoods"),
    (dict(likelihood="nb", log_theta=math.nan), ValueError, r"log_theta must be finite"),
    (dict(likelihood="nb", log_theta="1"), TypeError, r"log_theta must be None, a real number or a floating tensor"),
    (dict(likelihood="nb", log_theta=torch.zeros(5)), ValueError, r"log_theta has shape \(5,\), which is none of"),
    (dict(likelihood="nb", log_theta=torch.zeros(1, 1, 4)), ValueError, r"log_theta has shape .*more dimensions"),
    (dict(likelihood="nb", log_theta=torch.zeros(4, dtype=torch.int64)), TypeError, r"log_theta must be a floating-point"),
    (dict(likelihood="zinb", log_theta=0.0, zi_logits=torch.zeros(3)), ValueError, r"zi_logits must have recon's shape \(3, 4\)"),
    (dict(likelihood="zinb", log_theta=0.0, zi_logits=torch.zeros(3, 4, dtype=torch.int64)), TypeError,
     r"zi_logits must be a floating-point tensor"),
    (dict(likelihood="zinb", log_theta=0.0, zi_logits=1.0), TypeError, r"zi_logits must be a torch.Tensor"),
]


@pytest.mark.parametrize("kwargs, error, pattern", MISUSES, ids=[m[2][:40] for m in MISUSES])
def test_misuse_is_an_error_naming_the_argument(kwargs, error, pattern):
    log_mu, x, mu, logvar = count_case()
    kwargs = {k: (torch.zeros(3, 4) if v == "z" else v) for k, v in kwargs.items()}
    with pytest.raises(error, match=pattern):
        vae_fast.vae_loss(log_mu, x, mu, logvar, **kwargs)


@pytest.mark.parametrize("likelihood", ["poisson", "nb", "zinb"])
@pytest.mark.parametrize("bad", [-1.0, -1e-30, math.nan, math.inf, -math.inf])
def test_a_target_that_is_no_count_is_a_value_error_on_the_cpu(likelihood, bad):
    log_mu, x, mu, logvar = count_case()
    x[2, 3] = bad
    kwargs = {"log_theta": 0.5} if likelihood != "poisson" else {}
    if likelihood == "zinb":
        kwargs["zi_logits"] = torch.zeros(3, 4)
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match=rf"x \(the target\) must hold counts .* for the '{likelihood}' likelihood"):
            vae_fast.vae_loss(log_mu, x, mu, logvar, likelihood=likelihood, reduction=reduction, **kwargs)


def test_counts_need_not_be_integers_and_zero_is_a_count():
    log_mu, x, mu, logvar = count_case()
    x[0] = torch.tensor([0.0, 0.5, 2.25, 1e6])
    for likelihood, kwargs in (("poisson", {}), ("nb", {"log_theta": 1.0})):
        assert torch.isfinite(vae_fast.vae_loss(log_mu, x, mu, logvar, likelihood=likelihood, **kwargs))


def op_args(log_mu, x, mu, logvar, log_scale=None, zi_logits=None, likelihood="zinb", mask=(False,) * 6):
    return (log_mu, x, mu, logvar, log_scale, zi_logits, likelihood, False, 0.0, 1.0, "sum", list(mask))


def test_the_op_checks_its_own_count_arguments():
    """Called directly (torch.ops.vae_fast.vae_loss), the op refuses what the function would."""
    op = torch.ops.vae_fast.vae_loss
    log_mu, x, mu, logvar = count_case()
    z = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="'zinb' likelihood needs zi_logits"):
        op(*op_args(log_mu, x, mu, logvar))
    with pytest.raises(ValueError, match="zi_logits applies to the 'zinb' likelihood only"):
        op(*op_args(log_mu, x, mu, logvar, zi_logits=z, likelihood="nb"))
    with pytest.raises(ValueError, match=r"zi_logits must have recon's shape \[3, 4\]"):
        op(*op_args(log_mu, x, mu, logvar, zi_logits=z[:2]))
    with pytest.raises(TypeError, match="zi_logits has dtype Double"):
        op(*op_args(log_mu, x, mu, logvar, zi_logits=z.double()))
    with pytest.raises(ValueError, match="Poisson likelihood has no dispersion"):
        op(*op_args(log_mu, x, mu, logvar, log_scale=torch.zeros(()), likelihood="poisson"))
    with pytest.raises(ValueError, match=r"grad_mask\[5\] asks for the gradient of a zi_logits"):
        op(*op_args(log_mu, x, mu, logvar, likelihood="nb", mask=(False,) * 5 + (True,)))
    with pytest.raises(ValueError, match=r"likelihood must be .*'poisson', 'nb' or 'zinb', got 'gamma'"):
        op(*op_args(log_mu, x, mu, logvar, likelihood="gamma"))


@pytest.mark.parametrize("log_theta", ["float", "tensor, no grad", "tensor, grad"])
@pytest.mark.parametrize("device", DEVICES)
def test_zi_logits_gets_its_gradient_whichever_optional_tensors_are_given(log_theta, device):
    """Without a log_theta tensor zi_logits is the node's fifth input edge, not its sixth: its
    gradient must still arrive, be ZINB's d/dz (sigmoid(z) at x > 0), and log_theta's too."""
    log_mu, x, mu, logvar = count_case(device=device)
    x[:, 0] = 0.0
    x[:, 1:] = x[:, 1:].clamp_min(1.0)
    z = torch.linspace(-2, 2, 12, device=device).reshape(3, 4).requires_grad_()
    theta = 0.3 if log_theta == "float" else torch.full((4,), 0.3, device=device, requires_grad=log_theta.endswith(" grad"))
    loss = vae_fast.vae_loss(log_mu, x, mu, logvar, likelihood="zinb", log_theta=theta, zi_logits=z)
    loss.backward()
    assert torch.allclose(z.grad[:, 1:], torch.sigmoid(z.detach()[:, 1:]), rtol=1e-6, atol=0)
    assert (z.grad[:, 0] < 0).all()  # at x = 0 more inflation explains the zero better
    if log_theta == "tensor, grad":
        assert theta.grad is not None and theta.grad.shape == (4,) and torch.isfinite(theta.grad).all()


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "laplace"])
def test_the_other_likelihoods_leave_the_new_slots_empty(likelihood):
    """vae_fast.vae_loss passes no zi_logits and no sixth gradient for the older likelihoods: the
    same bits as the op called with None there."""
    g = torch.Generator().manual_seed(3)
    recon = torch.rand(4, 6, generator=g) if likelihood == "bernoulli" else torch.randn(4, 6, generator=g)
    x = torch.rand(4, 6, generator=g)
    mu, logvar = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    expected = torch.ops.vae_fast.vae_loss(recon, x, mu, logvar, None, None, likelihood, False, 0.0, 1.0, "sum",
                                           [False] * 6)
    assert expected[6].numel() == 0
    assert torch.equal(vae_fast.vae_loss(recon, x, mu, logvar, likelihood=likelihood), expected[0])
