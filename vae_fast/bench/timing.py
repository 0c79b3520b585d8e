"""How `vae-fast bench` times things so that ratios hold on a noisy machine.

All implementations of one case are measured in the same process, in interleaved rounds: every
round takes one sample of each, so slow drift (frequency scaling, a busy neighbour) lands on all of
them alike. A sample is a run of back-to-back calls on rotating input sets, timed by the host clock
on the CPU and by CUDA events on a GPU; the reported time is the median sample, per call.
"""

from __future__ import annotations

import glob
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

COPY_BUFFER_BYTES = 256 * 2**20
# Fallback when the cache size cannot be read (CPU sysfs missing): a typical server L3 slice.
DEFAULT_LAST_LEVEL_CACHE_BYTES = 32 * 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostClock:
    """Wall clock; right for the CPU, where a call returns when its work is done. A run that times
    itself (another process's, `baseline_process.RemoteRun`) is asked for its own figure."""

    def seconds_per_call(self, run: Callable[[], object], calls: int) -> float:
        own_timing = getattr(run, "seconds_per_call", None)
        if own_timing is not None:
            return own_timing(calls)
        start = time.perf_counter()
        for _ in range(calls):
            run()
        return (time.perf_counter() - start) / calls


class CudaEventClock:
    """CUDA events on the current stream: GPU time, launch gaps included, no host-side guessing."""

    def __init__(self, device: torch.device):
        self.device = device

    def seconds_per_call(self, run: Callable[[], object], calls: int) -> float:
        # Start from an idle GPU: queued work of the previous implementation would otherwise be
        # counted here, or would hide this implementation's launch overhead behind it.
        torch.cuda.synchronize(self.device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls


def clock_for(device: torch.device) -> HostClock | CudaEventClock:
    return CudaEventClock(device) if device.type == "cuda" else HostClock()


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 of a GPU, the largest CPU cache level otherwise: the size input rotation must exceed."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=DEFAULT_LAST_LEVEL_CACHE_BYTES)


class OthersCpuShare:
    """The share of all cores that processes other than `pids` used between start() and share():
    from /proc/stat's busy time minus those processes' own CPU time. On a shared machine another
    process that holds a core makes every 2-thread parallel region wait for its time slice (a call
    of 0.25 ms took 8 ms: benchmarks/small_batch_probe.py), so a row says how busy its cores were.
    None where /proc is missing."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self._start = None

    @staticmethod
    def _system() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # busy, total (idle and iowait apart)

    def _own(self) -> int:
        total = 0
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        return total

    def start(self) -> None:
        try:
            self._start = (*self._system(), self._own())
        except OSError:
            self._start = None

    def share(self) -> float | None:
        if self._start is None:
            return None
        try:
            busy, total, own = (*self._system(), self._own())
        except OSError:
            return None
        busy0, total0, own0 = self._start
        return max(0.0, (busy - busy0) - (own - own0)) / max(1, total - total0)


def first_call_seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, to its end on the device: what torch.compile's first call costs."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Repetitions:
    calls_per_sample: int
    rounds: int


def choose_repetitions(
    runs: dict[str, Callable[[], object]],
    clock,
    *,
    min_sample_s: float,
    budget_s: float,
    min_rounds: int,
    max_rounds: int,
) -> Repetitions:
    """Enough calls per sample that the fastest implementation's sample outlasts timer and launch
    noise; as many rounds as the budget allows, within [min_rounds, max_rounds]."""
    per_call = {name: clock.seconds_per_call(run, 1) for name, run in runs.items()}
    calls = max(1, math.ceil(min_sample_s / max(min(per_call.values()), 1e-9)))
    round_s = calls * sum(per_call.values())
    rounds = min(max_rounds, max(min_rounds, int(budget_s / max(round_s, 1e-9))))
    return Repetitions(calls, rounds)


def warm_for(run: Callable[[], object], seconds: float) -> None:
    """Untimed calls of `run` for `seconds`, at least one; a run in another process
    (`baseline_process.RemoteRun`) makes them there."""
    remote = getattr(run, "warm_for", None)
    if remote is not None:
        remote(seconds)
        return
    end = time.perf_counter() + seconds
    run()
    while time.perf_counter() < end:
        run()


def interleaved_samples(runs: dict[str, Callable[[], object]], clock, repetitions: Repetitions,
                        settle_s: float = 0.0, warmup_s: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call, one sample per implementation per round; with settle_s, the machine is left
    idle that long before each sample (contenders in two processes: see baseline_process), then the
    implementation runs untimed for warmup_s (at least one call). After the idle its worker threads
    are asleep and the cores slowed down, a cost of the pause, not of the implementation: one call
    was not enough (the logits loss fwd+bwd at B = 128, 2 threads, measured 0.321 ms a call after
    the pause and one call, 0.200 ms after the pause and 20 ms of calls, 0.209 ms called alone;
    benchmarks/small_batch_probe.py, 2026-12-04), and a sample of few calls carried it in full."""
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repetitions.rounds):
        # The starting implementation moves each round, so none always runs right after another.
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            if settle_s:
                time.sleep(settle_s)
                warm_for(runs[name], warmup_s)
            samples[name].append(clock.seconds_per_call(runs[name], repetitions.calls_per_sample))
    return samples


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BUFFER_BYTES, reps: int = 15) -> float:
    """Bytes per second of `dst.copy_(src)` on a buffer far larger than any cache (read + write
    counted): the practical ceiling that the ideal-bytes bandwidth columns are compared with."""
    # Filled, not empty: first-touch page faults would otherwise be timed on the CPU.
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    clock = clock_for(device)
    for _ in range(3):
        dst.copy_(src)
    seconds = statistics.median(clock.seconds_per_call(lambda: dst.copy_(src), 1) for _ in range(reps))
    return 2 * src.numel() * src.element_size() / seconds
