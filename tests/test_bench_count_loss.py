"""benchmarks/bench_count_loss.py with --baseline-python: its eager and compiled contenders timed in a
server process (here this same interpreter), side by side with the fused loss. The script had gone
out of step with vae_fast.bench's RemoteRun (a missing `mode`) and crashed at the first case."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_count_loss", ROOT / "benchmarks" / "bench_count_loss.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def test_a_case_times_every_contender_here_and_in_the_baseline_process(bench):
    baseline = bench.Baseline(sys.executable)
    try:
        row = bench.measure_case("poisson", 2, "warm", baseline, budget_s=0.05)
    finally:
        baseline.close()
    assert set(row.medians_ms) == {"fused", "eager", "compiled", "eager 2.13", "compiled 2.13"}
    assert all(ms > 0 for ms in row.medians_ms.values()), row.medians_ms
    assert set(row.compile_s) == {"compiled", "compiled 2.13"}
    assert row.input_sets == 1
