"""The public functions: argument checks, then the fused kernels where the compiled extension
serves the device, else the pure-torch reference (`vae_fast.reference`)."""

from __future__ import annotations

import math
import numbers

import torch

from . import _extension, ops, reference  # noqa: F401  (ops registers autograd and fake kernels)

__all__ = ["reparameterize", "vae_loss", "loss_function", "LIKELIHOODS"]

REDUCTIONS = ("sum", "mean", "none")


def _require_float_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {value.dtype}")


def _common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mixed float dtypes (e.g. a bf16 decoder output against float32 data) are promoted once here;
    the kernels take a single dtype."""
    dtype = tensors[0].dtype
    if all(t.dtype == dtype for t in tensors):  # the common case costs no promotion lookups
        return tensors
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def _check_same_device(fn: str, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    first = tensors[0].device
    for name, t in zip(names, tensors):
        if t.device != first:
            raise ValueError(f"{fn}: {name} is on {t.device} but {names[0]} is on {first}")


# The device types whose kernels the unchecked paths below call (decided at import, as `serves`).
_OP_SERVES_CPU = _extension.reason_for_reference("cpu") is None
_OP_SERVES_CUDA = _extension.reason_for_reference("cuda") is None


def _op_serves(t: torch.Tensor) -> bool:
    return (t.is_cpu and _OP_SERVES_CPU) or (t.is_cuda and _OP_SERVES_CUDA)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample z = mu + exp(0.5 * logvar) * eps with eps ~ N(0, I), drawn inside the fused kernel.

    Args:
        mu, logvar: floating tensors of one shape (any shape, typically [B, L]) on one device.
        generator: optional torch.Generator of that device; by default torch's global generator, so
            `torch.manual_seed` reproduces the draw.
    Returns:
        z, shape and dtype of mu. Gradients: dz/dmu = 1, dz/dlogvar = 0.5 * (z - mu).
    Raises:
        TypeError for a non-tensor or non-floating input, ValueError for mismatched shapes or devices.
    """
    if not torch.compiler.is_compiling():
        z = _reparameterize_unchecked(mu, logvar, generator)
        if z is not None:
            return z
    for name, value in (("mu", mu), ("logvar", logvar)):
        _require_float_tensor("reparameterize", name, value)
    if mu.shape != logvar.shape:
        raise ValueError(f"reparameterize: mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    _check_same_device("reparameterize", ("mu", "logvar"), (mu, logvar))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"reparameterize: generator must be a torch.Generator or None, got {type(generator).__name__}")
    mu, logvar = _common_dtype(mu, logvar)
    if not _extension.serves(mu.device):
        return reference.reparameterize(mu, logvar, generator=generator)
    return torch.ops.vae_fast.reparameterize(mu, logvar, generator)


def _reparameterize_unchecked(mu, logvar, generator) -> torch.Tensor | None:
    """The common call straight to the op, whose C++ checks (csrc/reparameterize_common.h) cover
    every argument: the Python checks cost about 5 us a call (benchmarks/bench_call_overhead.py).
    None where this path does not apply or the op refused the call; reparameterize's checks then say what is wrong (the op
    checks before it draws, so a refused call consumed no random numbers)."""
    try:
        if _op_serves(mu) and mu.dtype is logvar.dtype:
            return torch.ops.vae_fast.reparameterize.default(mu, logvar, generator)
    except Exception:  # any refusal: the checks below explain it, or repeat the call and its error
        pass
    return None


_LOSS_ARGS = ("recon", "x", "mu", "logvar")
LIKELIHOODS = reference.LIKELIHOODS
_COUNT_LIKELIHOODS = ("poisson", "nb", "zinb")


def _check_loss_args(recon, x, mu, logvar, beta, reduction) -> float:
    for name, value in zip(_LOSS_ARGS, (recon, x, mu, logvar)):
        _require_float_tensor("vae_loss", name, value)
    if recon.dim() == 0:
        raise ValueError("vae_loss: recon must have a batch dimension, got a 0-d tensor")
    batch = recon.shape[0]
    for name, value in (("x", x), ("mu", mu), ("logvar", logvar)):
        if value.dim() == 0 or value.shape[0] != batch:
            raise ValueError(
                f"vae_loss: {name} must have batch size {batch} (recon.shape[0]), got shape {tuple(value.shape)}"
            )
    per_sample = math.prod(recon.shape[1:])
    x_per_sample = math.prod(x.shape[1:])
    if per_sample != x_per_sample:
        raise ValueError(
            f"vae_loss: recon has {per_sample} elements per sample but x has {x_per_sample} "
            f"(shapes {tuple(recon.shape)} and {tuple(x.shape)})"
        )
    if mu.shape != logvar.shape:
        raise ValueError(f"vae_loss: mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    _check_same_device("vae_loss", _LOSS_ARGS, (recon, x, mu, logvar))
    if isinstance(beta, torch.Tensor) and beta.numel() == 1:
        beta = beta.item()
    # type() first: the common float/int case skips the slower abstract-class check
    if type(beta) not in (float, int) and (isinstance(beta, bool) or not isinstance(beta, numbers.Real)):
        raise TypeError(f"vae_loss: beta must be a real number, got {type(beta).__name__}")
    if not beta >= 0:  # also rejects NaN
        raise ValueError(f"vae_loss: beta must be a non-negative number, got {beta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"vae_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return float(beta)


def _check_log_scale(likelihood: str, logits, log_scale, recon: torch.Tensor):
    """The likelihood's arguments; returns log_scale as None, a float, or a tensor."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"vae_loss: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if likelihood == "bernoulli":
        if log_scale is not None:
            raise ValueError("vae_loss: log_scale applies to the 'gaussian' and 'laplace' likelihoods; "
                             "the Bernoulli likelihood has no scale, so log_scale must be None")
        return None
    if logits:
        raise ValueError(f"vae_loss: logits=True applies to the Bernoulli likelihood only; with likelihood={likelihood!r} "
                         "recon is the mean (location) of the distribution, not a logit")
    return _check_scale_value("log_scale", log_scale, recon)


def _check_scale_value(name: str, value, recon: torch.Tensor):
    """log_scale or log_theta: None, a finite float, or a tensor of one of log_scale_kind's layouts."""
    if value is None or isinstance(value, torch.Tensor):
        if value is not None:
            _check_log_scale_tensor(value, recon, name)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"vae_loss: {name} must be None, a real number or a floating tensor, got {type(value).__name__}")
    if not -math.inf < value < math.inf:  # also NaN; comparisons (not math.isfinite) trace under torch.compile
        raise ValueError(f"vae_loss: {name} must be finite, got {value}")
    return float(value)


def _check_count_args(likelihood: str, logits, log_scale, log_theta, zi_logits, recon: torch.Tensor):
    """The count likelihoods' arguments; returns log_theta as None (poisson), a float or a tensor."""
    if logits:
        raise ValueError(f"vae_loss: logits=True applies to the Bernoulli likelihood only; with likelihood={likelihood!r} "
                         "recon is the log of the mean, not a logit")
    if log_scale is not None:
        raise ValueError(f"vae_loss: log_scale applies to the 'gaussian' and 'laplace' likelihoods; with likelihood="
                         f"{likelihood!r} it must be None (the negative binomial's dispersion is log_theta)")
    if likelihood == "poisson" and log_theta is not None:
        raise ValueError("vae_loss: log_theta applies to the 'nb' and 'zinb' likelihoods; the Poisson likelihood has "
                         "no dispersion, so log_theta must be None")
    if likelihood != "poisson" and log_theta is None:
        raise ValueError(f"vae_loss: the {likelihood!r} likelihood needs log_theta (the log inverse dispersion: a "
                         "float, or a tensor of shape (), recon's per-sample shape or recon's shape), got None")
    if likelihood != "zinb" and zi_logits is not None:
        raise ValueError(f"vae_loss: zi_logits applies to the 'zinb' likelihood only; with likelihood={likelihood!r} "
                         "it must be None")
    if likelihood == "zinb":
        _check_zi_logits(zi_logits, recon)
    return _check_scale_value("log_theta", log_theta, recon)


def _check_zi_logits(zi_logits, recon: torch.Tensor) -> None:
    if zi_logits is None:
        raise ValueError("vae_loss: the 'zinb' likelihood needs zi_logits (the logits of the zero-inflation "
                         "probability, recon's shape), got None")
    _require_float_tensor("vae_loss", "zi_logits", zi_logits)
    if zi_logits.shape != recon.shape:
        raise ValueError(f"vae_loss: zi_logits must have recon's shape {tuple(recon.shape)}, got {tuple(zi_logits.shape)}")
    if zi_logits.device != recon.device:
        raise ValueError(f"vae_loss: zi_logits is on {zi_logits.device} but recon is on {recon.device}")


def log_scale_kind(log_scale: torch.Tensor, recon_shape) -> str | None:
    """'shared' (one value), 'feature' (one per element of a sample, shared over the batch) or
    'element' (recon's full shape) for a log_scale tensor of that shape; None for any other shape.

    Shapes that broadcast to recon's the same way count too: (1,) or (1, 1) is shared, and
    (1, *per_sample) per feature, so that `nn.Parameter(torch.zeros(1))` works as a shared scale.
    """
    shape = tuple(log_scale.shape)
    if len(shape) > len(recon_shape):  # it would broadcast recon's loss to more dimensions
        return None
    if all(size == 1 for size in shape):
        return "shared"
    per_sample = tuple(recon_shape[1:])
    stripped = shape
    while len(stripped) > len(per_sample) and stripped[0] == 1:
        stripped = stripped[1:]
    if stripped == per_sample:
        return "feature"
    if shape == tuple(recon_shape):
        return "element"
    return None


def _check_log_scale_tensor(log_scale: torch.Tensor, recon: torch.Tensor, name: str = "log_scale") -> None:
    if not log_scale.is_floating_point():
        raise TypeError(f"vae_loss: {name} must be a floating-point tensor, got dtype {log_scale.dtype}")
    if log_scale.device != recon.device:
        raise ValueError(f"vae_loss: {name} is on {log_scale.device} but recon is on {recon.device}")
    if log_scale.dim() > recon.dim():
        raise ValueError(f"vae_loss: {name} has shape {tuple(log_scale.shape)}, more dimensions than recon's "
                         f"{tuple(recon.shape)}; drop its extra leading 1s")
    if log_scale_kind(log_scale, recon.shape) is None:
        raise ValueError(
            f"vae_loss: {name} has shape {tuple(log_scale.shape)}, which is none of: one shared value (shape ()), "
            f"one per feature (recon's per-sample shape {tuple(recon.shape[1:])}), or one per element "
            f"(recon's shape {tuple(recon.shape)})"
        )


def vae_loss(
    recon: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    likelihood: str = "bernoulli",
    logits: bool = False,
    log_scale: torch.Tensor | float | None = None,
    log_theta: torch.Tensor | float | None = None,
    zi_logits: torch.Tensor | None = None,
    beta: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """The negative ELBO of a VAE, -E_q[log p(x|z)] + beta * KL(q(z|x) || N(0, I)), in one fused pass.

    per-sample loss = sum_features NLL(x | recon) + beta * sum_latents KL_j,
    KL_j = -0.5 * (1 + logvar - mu^2 - exp(logvar)), where NLL per element is

    - bernoulli: -[x log p + (1 - x) log(1 - p)], p = recon (or sigmoid(recon) with `logits=True`);
    - gaussian:  0.5 * ((x - recon) / sigma)^2 + log(sigma) + 0.5 * log(2 pi), sigma = exp(log_scale);
    - laplace:   |x - recon| / b + log(b) + log(2), b = exp(log_scale). At x == recon its gradient
      is taken as 0 (the subgradient torch.abs uses);
    - poisson:   mu - x log mu + lgamma(x + 1), mu = exp(recon);
    - nb:        -log NB(x; mean mu, inverse dispersion theta), theta = exp(log_theta):
      -[lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) + theta log(theta / (theta + mu))
        + x log(mu / (theta + mu))] (scVI's log_nb_positive), evaluated in a form that stays exact
      as theta grows (where NB tends to Poisson) instead of cancelling;
    - zinb:      zero-inflated NB with pi = sigmoid(zi_logits): -log(pi + (1 - pi) NB(0)) at x = 0,
      -log(1 - pi) - log NB(x) at x > 0.

    Every constant is kept, so the loss is a true negative ELBO in nats that compares across
    likelihoods and with `vae_fast.evaluation.iwae_log_likelihood`. With a fixed sigma = 1 the
    Gaussian term is 0.5 * (sum of squared errors) + 0.5 * D * log(2 pi): the "MSE" loss up to a
    factor 1/2 and a constant, so it has the same minimiser but a KL weight twice as large relative
    to it as `F.mse_loss(reduction="sum") + KL`; learning sigma sets that balance from the data.

    Args:
        recon: [B, ...] decoder output: probabilities in [0, 1] or logits (bernoulli), the mean
            / location (gaussian, laplace; any real number), or the log of the mean (poisson, nb,
            zinb; e.g. a log-softmax plus the log library size).
        x: [B, ...] targets, any shape with recon's number of elements per sample (e.g. images
            [B, 1, 28, 28] against recon [B, 784]); in [0, 1] for bernoulli, non-negative counts
            for poisson/nb/zinb (floats; integers are not required), any real otherwise.
        mu, logvar: [B, L] posterior mean and log-variance.
        likelihood: "bernoulli" (default), "gaussian" or "laplace".
        logits: recon holds Bernoulli logits (the numerically safer choice: no log(0) clamping,
            exact gradients when saturated). Bernoulli only.
        log_scale: log of the decoder's scale, gaussian/laplace only: None (0, a unit scale), a
            float (fixed), or a tensor, which may require grad (a learned scale), of shape () or
            (1,) (one shared value), recon's per-sample shape (one per feature, shared over the
            batch), or recon's shape (one per element). Its gradient comes back in its own shape.
        log_theta: log of the negative binomial's inverse dispersion theta, nb/zinb only and
            required there: a float (fixed) or a tensor of log_scale's layouts (shape () shared,
            recon's per-sample shape per gene as scVI's default, recon's shape per element as
            scVI's "gene-cell"), which may require grad.
        zi_logits: zinb only and required there: [B, ...] of recon's shape, the logits of the
            zero-inflation probability; may require grad.
        beta: weight of the KL term, >= 0 (beta-VAE).
        reduction: "sum" over the batch (the PyTorch examples' convention), "mean" over the batch,
            or "none" for the [B] per-sample losses.
    Returns:
        The loss, float32 for float32/float16/bfloat16 inputs and float64 for float64 inputs.
    Raises:
        TypeError for non-tensors or non-floating dtypes; ValueError for mismatched shapes, batch
        sizes or devices, an unknown likelihood or reduction, logits=True, a log_scale, log_theta or
        zi_logits with a likelihood that has no use for it (or a missing log_theta / zi_logits),
        a log_scale / log_theta / zi_logits of another shape, a negative beta, and (on CPU)
        Bernoulli probabilities or targets outside [0, 1], or count targets that are negative,
        NaN or infinite (on CUDA, where a check would stall the stream, those give a NaN loss).
        NaN or infinite inputs give a NaN loss (and NaN gradients for gaussian/laplace and the
        count likelihoods); a logvar whose exp overflows gives +inf, and so does a recon whose
        exp overflows against a count x > 0.
    """
    if log_theta is None and zi_logits is None and not torch.compiler.is_compiling():
        loss = _vae_loss_unchecked(recon, x, mu, logvar, likelihood, logits, log_scale, beta, reduction)
        if loss is not None:
            return loss
    beta = _check_loss_args(recon, x, mu, logvar, beta, reduction)
    if likelihood in _COUNT_LIKELIHOODS:
        return _count_loss(recon, x, mu, logvar, likelihood, log_scale, log_theta, zi_logits, logits, beta, reduction)
    for name, value in (("log_theta", log_theta), ("zi_logits", zi_logits)):
        if value is not None and likelihood in LIKELIHOODS:
            raise ValueError(f"vae_loss: {name} applies to the count likelihoods ('nb', 'zinb') only; with "
                             f"likelihood={likelihood!r} it must be None")
    log_scale = _check_log_scale(likelihood, logits, log_scale, recon)
    if isinstance(log_scale, torch.Tensor):
        recon, x, mu, logvar, log_scale = _common_dtype(recon, x, mu, logvar, log_scale)
    else:
        recon, x, mu, logvar = _common_dtype(recon, x, mu, logvar)
    if not _extension.serves(recon.device):
        return reference.vae_loss(recon, x, mu, logvar, likelihood=likelihood, logits=logits, log_scale=log_scale,
                                  beta=beta, reduction=reduction)
    scale_tensor = log_scale if isinstance(log_scale, torch.Tensor) else None
    if torch.is_grad_enabled():
        grad_mask = [t.requires_grad for t in (recon, x, mu, logvar)]
        grad_mask.append(scale_tensor is not None and scale_tensor.requires_grad)
        grad_mask.append(False)
    else:
        grad_mask = [False] * 6
    fixed_log_scale = log_scale if isinstance(log_scale, float) else 0.0
    return torch.ops.vae_fast.vae_loss(
        recon, x, mu, logvar, scale_tensor, None, likelihood, bool(logits), fixed_log_scale, beta, reduction, grad_mask
    )[0]


_UNCHECKED_LIKELIHOODS = ("bernoulli", "gaussian", "laplace")


def _vae_loss_unchecked(recon, x, mu, logvar, likelihood, logits, log_scale, beta, reduction) -> torch.Tensor | None:
    """The common call straight to the op, whose C++ checks (csrc/vae_loss_common.h) cover every
    argument it is given: the Python checks cost about 7 us a call, nearly the op's own host work
    (benchmarks/bench_call_overhead.py).
    None where this path does not apply (mixed dtypes to promote, a device the reference serves, a
    fixed float log_scale, whose finiteness only the Python checks test) or where the op refused the
    call: vae_loss's checks then say what is wrong in the caller's terms, or call the op again,
    which raises its own error (the op has no side effects to repeat)."""
    if likelihood not in _UNCHECKED_LIKELIHOODS or type(beta) not in (float, int):
        return None
    if log_scale is not None and not isinstance(log_scale, torch.Tensor):
        return None
    try:
        if not (_op_serves(recon) and recon.dtype is x.dtype is mu.dtype is logvar.dtype):
            return None
        if log_scale is not None and log_scale.dtype is not recon.dtype:
            return None
        grad = torch.is_grad_enabled()
        grad_mask = [grad and recon.requires_grad, grad and x.requires_grad, grad and mu.requires_grad,
                     grad and logvar.requires_grad, grad and log_scale is not None and log_scale.requires_grad, False]
        return torch.ops.vae_fast.vae_loss.default(
            recon, x, mu, logvar, log_scale, None, likelihood, bool(logits), 0.0, beta, reduction, grad_mask
        )[0]
    except Exception:  # any refusal: vae_loss's checks explain it, or repeat the call and its error
        return None


def _count_loss(recon, x, mu, logvar, likelihood, log_scale, log_theta, zi_logits, logits, beta, reduction):
    """vae_loss for poisson/nb/zinb: log_theta takes the op's log_scale slot."""
    log_theta = _check_count_args(likelihood, logits, log_scale, log_theta, zi_logits, recon)
    theta_tensor = log_theta if isinstance(log_theta, torch.Tensor) else None
    optional = tuple(t for t in (theta_tensor, zi_logits) if t is not None)
    # Indexing, not `*rest` unpacking + pop: torch 2.11's dynamo makes the starred target a tuple.
    promoted = _common_dtype(recon, x, mu, logvar, *optional)
    recon, x, mu, logvar = promoted[:4]
    if theta_tensor is not None:
        theta_tensor = promoted[4]
    if zi_logits is not None:
        zi_logits = promoted[-1]
    if not _extension.serves(recon.device):
        log_theta = theta_tensor if theta_tensor is not None else log_theta
        return reference.vae_loss(recon, x, mu, logvar, likelihood=likelihood, log_theta=log_theta,
                                  zi_logits=zi_logits, beta=beta, reduction=reduction)
    grad_enabled = torch.is_grad_enabled()
    grad_mask = [grad_enabled and t is not None and t.requires_grad
                 for t in (recon, x, mu, logvar, theta_tensor, zi_logits)]
    fixed_log_theta = log_theta if isinstance(log_theta, float) else 0.0
    return torch.ops.vae_fast.vae_loss(
        recon, x, mu, logvar, theta_tensor, zi_logits, likelihood, False, fixed_log_theta, beta, reduction, grad_mask
    )[0]


def loss_function(recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Drop-in for the PyTorch examples' VAE `loss_function`: summed BCE of probabilities + KL."""
    return vae_loss(recon_x, x, mu, logvar)
