"""pytest-benchmark harness: `pytest benchmarks/ --benchmark-only`.

Collects the bench_<op>.py files (pytest's own pattern is test_*.py, and the repository's testpaths
keep `pytest` alone on tests/). The cases are those of `vae-fast bench` (vae_fast.bench.cases); here
each implementation is timed on its own, so for ratios that hold on a busy machine use the report
runner, which interleaves them.
"""

import pytest
import torch

from vae_fast.bench import timing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def bench_case(benchmark):
    """bench_case(case, implementation, mode): warm up (torch.compile's first call reported in
    extra_info, not timed), then let pytest-benchmark time one call at a time, finished on the device."""

    def run(case, implementation, mode):
        call = case.modes[mode][implementation]
        benchmark.group = f"{case.label} {mode}"
        benchmark.extra_info["compile_or_first_call_s"] = timing.first_call_seconds(call, case.device)
        benchmark.extra_info["ideal_bytes"] = case.ideal_bytes
        for _ in range(3):
            call()

        def timed():
            call()
            timing.synchronize(case.device)  # the host timer must see the device's work done

        benchmark(timed)

    return run
