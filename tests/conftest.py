"""Shared helpers of the test suite: devices to run on and per-dtype tolerances."""

import contextlib
import os
import warnings

import pytest
import torch

import vae_fast
from vae_fast import _extension

# A test that touches a CUDA device carries the `cuda` marker: it skips without a GPU, and on a lent
# GPU, where device time is short, scripts/gpu_run.sh runs `-m cuda` first and the rest after.
requires_cuda = pytest.mark.cuda
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=requires_cuda)] if torch.cuda.is_available() else [])

# Norm-wise relative error allowed against a float64 reference, per input dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def loss_tolerance(dtype: torch.dtype) -> float:
    """The loss of `dtype` inputs against float64 on the same (rounded) inputs: it is computed and
    returned in float32 for every dtype but float64, so float32's bound holds for float16 and
    bfloat16 inputs too (their measured errors: 2e-9 to 8e-8)."""
    return TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32]


def gradient_tolerance(dtype: torch.dtype) -> float:
    """Norm-wise bound for a gradient in `dtype` against float64 on the same (rounded) inputs. A
    float16/bfloat16 gradient is computed in float32 and rounded to the dtype, once (twice for
    reduction "none" with a grad_output other than 1: by the kernel, then after the multiply); a
    rounding errs by at most half the dtype's eps relative, so one eps (2^-10, 2^-7) bounds both,
    float32's own ~1e-6 being small beside it and the norm averaging the roundings well below
    their bound (measured: at most 0.35 eps)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.finfo(dtype).eps
    return TOLERANCE[dtype]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def max_elementwise_relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float | None = None) -> float:
    """The largest |actual - expected| / |expected| over the elements whose reference is at least
    `floor` (default: float32's smallest normal, below which float32 holds no relative accuracy).
    Unlike the norm-wise relative_error, small elements beside large ones count as much. A NaN or
    infinite actual where the reference is finite counts as an infinite error."""
    actual, expected = actual.double(), expected.double()
    floor = torch.finfo(torch.float32).tiny if floor is None else floor
    keep = expected.abs() >= floor
    if not bool(keep.any()):
        return 0.0
    error = (actual[keep] - expected[keep]).abs() / expected[keep].abs()
    return float(torch.where(torch.isfinite(error), error, torch.full_like(error, float("inf"))).max())


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_enabled():
    """A suite started in the background by a non-interactive shell (`./.ci/run &`, nohup, some CI
    runners) inherits SIGINT ignored, and vae_fast's training then rightly leaves Ctrl-C alone, as
    Python itself does. The Ctrl-C tests need it delivered as in an interactive terminal: install
    Python's default handler for the session (child processes then start with SIGINT at its default too)."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _require_extension():
    # The suite tests the compiled kernels; a silent fallback to the reference would make every
    # parity test compare the reference with itself.
    assert _extension.extension_loaded(), f"vae_fast extension not loaded: {_extension.LOAD_ERROR}"
    yield


# Hypothesis profiles of the property tests (tests/test_properties.py). "ci", the default, replays
# the same derandomized examples on every run with no example database, so CI is reproducible and
# bounded in time; "deep" (VAE_FAST_HYPOTHESIS_PROFILE=deep) searches many fresh random examples
# for local bug hunts. Guarded so that an environment without hypothesis still runs the rest
# of the suite; the property tests import it unconditionally and fail loudly there.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    pass
else:
    settings.register_profile(
        "ci",
        max_examples=60,
        derandomize=True,
        database=None,
        deadline=None,  # a busy 2-core CI machine makes per-example timing meaningless
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "deep",
        max_examples=2000,
        derandomize=False,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("VAE_FAST_HYPOTHESIS_PROFILE", "ci"))


def checkpoint_round_trip(model, tmp_path):
    """`model` (its learned log_scale, if any, set away from its initial 0 first) saved as a training
    checkpoint and rebuilt by `model_from_checkpoint`."""
    from vae_fast.checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint

    if model.log_scale is not None:
        with torch.no_grad():
            model.log_scale.uniform_(-1, 1)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model_config": model.config(), "model": model.state_dict(), "optimizer": {}, "epoch": 0,
                           "dataset": {}, "train_config": {}, "rng_states": {}, "history": []})
    return model_from_checkpoint(load_checkpoint(path), path)


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@contextlib.contextmanager
def stream_mismatch_is_an_error():
    """Turns torch's "The AccumulateGrad node's stream does not match the stream of the node that
    produced the incoming gradient" warning into an error, every time it is raised (set_warn_always:
    a once-per-process warning an earlier test raised would otherwise pass unseen). It means a graph
    from an earlier step, made on another stream, is still alive, and costs a sync per backward."""
    was_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*AccumulateGrad node's stream does not match")
            yield
    finally:
        torch.set_warn_always(was_always)


__all__ = ["DEVICES", "TOLERANCE", "checkpoint_round_trip", "gradient_tolerance", "loss_tolerance",
           "max_elementwise_relative_error", "relative_error", "requires_cuda", "stream_mismatch_is_an_error", "vae_fast"]
