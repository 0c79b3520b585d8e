"""csrc/cpu/avx2_log_double.h (the count kernels' double log and log1p) against mpmath at 120 bits,
in ulps of the exact result: compiled alone with g++ into a small program (tests/log_double_harness.cpp)
that maps a file of doubles through it, so every lane path (normal, denormal, mantissa above
sqrt(2), the special values) is reached directly rather than through a likelihood's algebra."""

import math
import shutil
import subprocess
from pathlib import Path

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


pytestmark = pytest.mark.skipif(not _cpu_has_avx2_fma() or shutil.which("g++") is None,
                                reason="the header is AVX2 + FMA code; this CPU or machine cannot run it")


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("log_double") / "harness"
    subprocess.run(["g++", "-O2", "-std=c++17", "-mavx2", "-mfma", f"-I{ROOT / 'csrc' / 'cpu'}",
                    str(ROOT / "tests" / "log_double_harness.cpp"), "-o", str(out)], check=True)
    return out


def run(harness: Path, kind: str, values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    padded = np.concatenate([x, np.ones((-len(x)) % 4)])  # the harness takes whole vectors
    folder = harness.parent
    padded.tofile(folder / "in.bin")
    subprocess.run([str(harness), kind, str(folder / "in.bin"), str(folder / "out.bin")], check=True)
    return np.fromfile(folder / "out.bin")[: len(x)]


def worst_ulps(kind: str, x: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """The largest error in ulps of the exact value (mpmath, 120 bits), and the argument it was at."""
    mpmath.mp.prec = 120
    exact_of = mpmath.log if kind == "log" else mpmath.log1p
    worst, where = 0.0, math.nan
    for v, g in zip(x.tolist(), got.tolist()):
        exact = exact_of(mpmath.mpf(v))
        if exact == 0:
            error = 0.0 if g == 0 else math.inf
        else:
            error = abs(float((mpmath.mpf(g) - exact) / math.ulp(float(exact))))
        if error > worst:
            worst, where = error, v
    return worst, where


def log_arguments(rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([
        np.exp(rng.uniform(-744, 709, 6000)),          # every exponent, denormals included
        rng.uniform(0.5, 2.0, 3000),                   # the mantissa range itself
        1 + rng.uniform(-1e-6, 1e-6, 1000),            # near 1, where the result is small
        [5e-324, 1e-310, 2.2250738585072014e-308, 2.2250738585072009e-308, 1.0, 2.0, 0.5,
         math.sqrt(2), math.nextafter(math.sqrt(2), 2), math.nextafter(math.sqrt(2), 0), 1.7976931348623157e308],
    ])


def log1p_arguments(rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([
        rng.uniform(-1, 1, 3000),
        np.exp(rng.uniform(-744, 709, 4000)),          # positive, tiny to huge
        -np.exp(rng.uniform(-744, -1e-9, 3000)),       # in (-1, 0), tiny to next to -1
        [math.nextafter(-1, 0), 2.0**-53, -(2.0**-54), 5e-324, -5e-324, 1e16, 1e300, math.ldexp(1, 52) + 1],
    ])


def test_log_is_within_one_ulp(harness):
    x = log_arguments(np.random.default_rng(1))
    worst, where = worst_ulps("log", x, run(harness, "log", x))
    assert worst < 1.0, f"{worst:.2f} ulp at x = {where!r}"


def test_log1p_is_within_one_and_a_half_ulp(harness):
    """log(1 + v) rounded plus Goldberg's correction: the correction carries the digits of a small v."""
    v = log1p_arguments(np.random.default_rng(2))
    worst, where = worst_ulps("log1p", v, run(harness, "log1p", v))
    assert worst < 1.5, f"{worst:.2f} ulp at v = {where!r}"


def test_log_and_log1p_special_values(harness):
    x = np.array([0.0, -0.0, -1.0, -5e-324, math.inf, -math.inf, math.nan])
    got = run(harness, "log", x)
    assert got[0] == -math.inf and got[1] == -math.inf
    assert np.isnan(got[2]) and np.isnan(got[3])
    assert got[4] == math.inf
    assert np.isnan(got[5]) and np.isnan(got[6])
    v = np.array([-1.0, math.inf, -2.0, -math.inf, math.nan, 0.0, 1.7976931348623157e308])
    got = run(harness, "log1p", v)
    assert got[0] == -math.inf and got[1] == math.inf
    assert np.isnan(got[2]) and np.isnan(got[3]) and np.isnan(got[4])
    assert got[5] == 0.0
    assert got[6] == pytest.approx(math.log(1.7976931348623157e308), rel=1e-15)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(min_value=0.0, exclude_min=True, allow_infinity=False, allow_subnormal=True),
                       min_size=1, max_size=32),
       shifts=st.lists(st.floats(min_value=-1.0, exclude_min=True, max_value=1e30, allow_subnormal=True),
                       min_size=1, max_size=32))
def test_drawn_arguments(harness, values, shifts):
    worst, where = worst_ulps("log", np.array(values), run(harness, "log", values))
    assert worst < 1.0, f"log: {worst:.2f} ulp at x = {where!r}"
    worst, where = worst_ulps("log1p", np.array(shifts), run(harness, "log1p", shifts))
    assert worst < 1.5, f"log1p: {worst:.2f} ulp at v = {where!r}"
