"""vae_loss and reparameterize call the op straight away for the common arguments, leaving the checks
to its C++ side (vae_fast/functional.py, _vae_loss_unchecked): that path must give what the checked
path gives, bit for bit, take no Python check on the common calls, hand every refusal to the
checked path (the caller sees its message), and leave the random stream as the checked path does."""

import pytest
import torch

import vae_fast
from vae_fast import _extension, functional

pytestmark = pytest.mark.skipif(_extension.reason_for_reference("cpu") is not None,
                                reason="the unchecked path calls the compiled op, which this build lacks")

B, D, L = 5, 12, 3


def _inputs(dtype=torch.float32, probabilities=True):
    g = torch.Generator().manual_seed(1)
    recon = torch.rand(B, D, generator=g, dtype=dtype) if probabilities else torch.randn(B, D, generator=g, dtype=dtype)
    x = torch.rand(B, D, generator=g, dtype=dtype).round()
    mu, logvar = torch.randn(B, L, generator=g, dtype=dtype), torch.randn(B, L, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (recon, x, mu, logvar)]


COMMON_CALLS = {
    "probabilities": ({}, True),
    "logits, mean": ({"logits": True, "reduction": "mean"}, False),
    "gaussian, learned per-feature scale": ({"likelihood": "gaussian", "log_scale": torch.zeros(D).requires_grad_()}, False),
    "laplace, none, beta int": ({"likelihood": "laplace", "reduction": "none", "beta": 2}, False),
}


def _loss_and_grads(kwargs, probabilities):
    inputs = _inputs(probabilities=probabilities)
    scale = kwargs.get("log_scale")
    loss = vae_fast.vae_loss(*inputs, **kwargs)
    leaves = inputs + ([scale] if scale is not None else [])
    grads = torch.autograd.grad(loss.sum() * 1.5, leaves)
    return loss.detach(), grads


@pytest.mark.parametrize("case", COMMON_CALLS)
def test_common_calls_skip_the_python_checks_and_match_the_checked_path(case, monkeypatch):
    kwargs, probabilities = COMMON_CALLS[case]
    with monkeypatch.context() as patched:
        patched.setattr(functional, "_vae_loss_unchecked", lambda *args: None)
        checked_loss, checked_grads = _loss_and_grads(kwargs, probabilities)

    def no_python_checks(*args):
        raise AssertionError("the common call ran the Python checks")
    monkeypatch.setattr(functional, "_check_loss_args", no_python_checks)
    loss, grads = _loss_and_grads(kwargs, probabilities)
    assert torch.equal(loss, checked_loss)
    for grad, checked in zip(grads, checked_grads):
        assert torch.equal(grad, checked)


@pytest.mark.parametrize("kwargs, inputs", [
    ({"log_scale": 0.5, "likelihood": "gaussian"}, lambda: _inputs()),  # a float log_scale: finite only in Python
    ({}, lambda: [t.to(torch.float64) if i == 1 else t for i, t in enumerate(_inputs())]),  # mixed dtypes: promoted
])
def test_calls_the_op_cannot_take_as_they_are_go_through_the_checks(kwargs, inputs, monkeypatch):
    checked = []
    check = functional._check_loss_args
    monkeypatch.setattr(functional, "_check_loss_args", lambda *args: checked.append(1) or check(*args))
    assert torch.isfinite(vae_fast.vae_loss(*inputs(), **kwargs))
    assert checked == [1]


BAD_CALLS = {
    "batch size": (lambda r, x, mu, lv: (r, x[:-1], mu, lv), {}, ValueError, "x must have batch size"),
    "integer target": (lambda r, x, mu, lv: (r, x.detach().long(), mu, lv), {}, TypeError, "x must be a floating-point"),
    "not a tensor": (lambda r, x, mu, lv: (r.tolist(), x, mu, lv), {}, TypeError, "recon must be a torch.Tensor"),
    "negative beta": (lambda *a: a, {"beta": -1.0}, ValueError, "beta must be a non-negative"),
    "NaN beta": (lambda *a: a, {"beta": float("nan")}, ValueError, "beta must be a non-negative"),
    "reduction": (lambda *a: a, {"reduction": "avg"}, ValueError, "reduction must be one of"),
    "likelihood": (lambda *a: a, {"likelihood": "normal"}, ValueError, "likelihood must be one of"),
    "logits with gaussian": (lambda *a: a, {"likelihood": "gaussian", "logits": True}, ValueError, "logits=True applies"),
    "log_scale shape": (lambda *a: a, {"likelihood": "gaussian", "log_scale": torch.zeros(D + 1)}, ValueError,
                        "log_scale has shape"),
    "probabilities outside [0, 1]": (lambda r, x, mu, lv: (r.detach() + 2, x, mu, lv), {}, ValueError,
                                     "recon must hold probabilities"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_a_refused_call_raises_the_checked_paths_error(case):
    transform, kwargs, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        vae_fast.vae_loss(*transform(*_inputs()), **kwargs)


def _draws(mu, logvar):
    """Two draws from seed 3 with a refused call between them."""
    torch.manual_seed(3)
    first = vae_fast.reparameterize(mu, logvar)
    with pytest.raises(ValueError, match="mu and logvar must have the same shape"):
        vae_fast.reparameterize(mu, logvar[:, :-1])
    return first, vae_fast.reparameterize(mu, logvar)


def test_reparameterize_matches_the_checked_path_and_a_refused_call_draws_nothing(monkeypatch):
    mu, logvar = _inputs()[2:]
    draws = _draws(mu, logvar)
    with monkeypatch.context() as patched:
        patched.setattr(functional, "_reparameterize_unchecked", lambda *args: None)
        checked_draws = _draws(mu, logvar)
    for z, checked in zip(draws, checked_draws):
        assert torch.equal(z, checked)

    def no_python_checks(*args):
        raise AssertionError("the common call ran the Python checks")
    monkeypatch.setattr(functional, "_require_float_tensor", no_python_checks)
    torch.manual_seed(3)
    assert torch.equal(vae_fast.reparameterize(mu, logvar), draws[0])
