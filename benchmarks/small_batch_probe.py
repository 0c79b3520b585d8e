"""Why the two-process bench's B = 128 loss rows read 3x the call alone (issue 21): the loss at
B = 128 (100,352 elements) runs in a parallel region of 2 threads, and such short calls are timed
one sample at a time after an idle pause. This script times the fused loss fwd+bwd (warm, B = 128,
D = 784, L = 20) and the torch.compile baseline in another interpreter, as the bench does, under
variants of the sample's protocol, and says how busy the cores were with other processes meanwhile.

    python benchmarks/small_batch_probe.py --baseline-python /work/venv-torch213/bin/python

Variants, each over the same rounds, contenders interleaved:
- "bench before": a 50 ms pause, one untimed call, then a sample of 5 ms (the bench up to issue 21);
- "pause + 20 ms warm-up": the pause, then 20 ms of untimed calls before the sample;
- "no pause": samples back to back;
- each with 1 thread (no parallel region) and with 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from vae_fast.bench import cases, timing
from vae_fast.bench.baseline_process import BaselineProcess, RemoteRun

OP = "loss_logits"
BATCH, LATENT = 128, 20
ROUNDS = 15
SAMPLE_S = 0.005


def variant(runs: dict, calls: int, pause_s: float, warmup_s: float | None) -> dict[str, float]:
    samples = {name: [] for name in runs}
    clock = timing.HostClock()
    for round_index in range(ROUNDS):
        for name in list(runs)[round_index % 2:] + list(runs)[:round_index % 2]:
            if pause_s:
                time.sleep(pause_s)
            if warmup_s is None:
                runs[name]()
            elif warmup_s:
                timing.warm_for(runs[name], warmup_s)
            samples[name].append(clock.seconds_per_call(runs[name], calls))
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-python", required=True)
    args = parser.parse_args()
    rotation = 4 * timing.last_level_cache_bytes(torch.device("cpu"))
    print(f"{OP} fwd+bwd B={BATCH} L={LATENT} warm, torch {torch.__version__} (fused); {ROUNDS} rounds; "
          f"ms per call, median of samples")
    print("| threads | protocol | fused ms | compiled ms | others' share of the cores |")
    print("|---|---|---:|---:|---:|")
    with BaselineProcess(args.baseline_python) as baseline:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            case = cases.op_case(OP, "fwd+bwd", BATCH, LATENT, dtype=torch.float32, device=torch.device("cpu"),
                                 rotation_bytes=rotation)
            baseline.build(OP, "fwd+bwd", BATCH, LATENT, "float32", rotation, threads, case.checksum)
            runs = {"fused": case.modes["warm"]["fused"], "compiled": RemoteRun(baseline, "compiled", "warm")}
            for run in runs.values():
                for _ in range(20):
                    run()
            alone = {name: timing.HostClock().seconds_per_call(run, 500) for name, run in runs.items()}
            calls = max(1, round(SAMPLE_S / min(alone.values())))
            print(f"| {threads} | alone: 500 calls back to back | {alone['fused'] * 1e3:.3f} | "
                  f"{alone['compiled'] * 1e3:.3f} | |")
            for label, pause_s, warmup_s in (("bench before: 50 ms pause + 1 call", 0.05, None),
                                             ("50 ms pause + 20 ms of calls", 0.05, 0.02),
                                             ("no pause", 0.0, 0.0)):
                others_share = timing.OthersCpuShare([os.getpid(), baseline.pid])
                others_share.start()
                medians = variant(runs, calls, pause_s, warmup_s)
                others = others_share.share() or 0.0
                print(f"| {threads} | {label} ({calls} calls a sample) | {medians['fused'] * 1e3:.3f} | "
                      f"{medians['compiled'] * 1e3:.3f} | {100 * others:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
