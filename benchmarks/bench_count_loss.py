"""Count-loss benchmark (issue 20): vae_fast.vae_loss's fused Poisson / NB / ZINB against the loss as a
scVI user writes it (vae_fast.baselines.count_loss: scvi-tools' log_nb_positive / log_zinb_positive,
a plain torch formula for Poisson) in eager torch and under torch.compile, forward + backward.

Shapes: B in {128, 1024} cells, D = 20,000 genes, float32; log_mu = log_softmax + log library size
(scVI's decoder), counts drawn from the NB (ZINB: zeroed with the inflation probability), log_theta
per gene requiring grad, gradients for log_mu, mu, logvar, log_theta (and zi_logits). Two modes:
- warm: the same inputs every call (their last writer just ran, as in a training step);
- cold: input sets rotating through more than 4x the last-level cache, so every call reads memory.
The contenders take turns in interleaved rounds (vae_fast.bench.timing); the median per call counts.

The strongest CPU baseline is torch.compile of another build (torch 2.13's CPU wheel compiles these
formulas faster than the CUDA build 2.14 this project pins): with --baseline-python that interpreter
runs this file as a server (`--serve`), builds the same seeded inputs (the checksums are compared)
and times its eager and compiled calls when asked, so its samples interleave with ours, with the
machine left idle SETTLE_S before each (vae_fast.bench.baseline_process says why).

Memory: peak resident memory during one fwd+bwd above the resident memory just before it (inputs
live), sampled every 0.2 ms from /proc/self/statm by a thread, in a fresh process per contender at
B = 1024 (tensors of 80 MB, above glibc's largest mmap threshold, so freed memory leaves the
process at once and the RSS follows the live tensors); compared with the gradients' bytes, i.e.
peak <= inputs + gradients. torch's CPU allocator keeps no statistics and tracemalloc does not see it.

    python benchmarks/bench_count_loss.py [--baseline-python /work/venv-torch213/bin/python]
        [--likelihoods nb zinb poisson] [--batches 128 1024] [--modes warm cold] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from vae_fast import baselines
from vae_fast.bench import timing
from vae_fast.bench.baseline_process import SETTLE_S, WARMUP_AFTER_SETTLE_S, RemoteRun

GENES = 20_000
LATENT = 10
SEED = 20
LIKELIHOODS = ("nb", "zinb", "poisson")
TARGETS = {"eager": 4.0, "compiled": 2.0}  # issue 20, NB and ZINB on the CPU
ROOT = Path(__file__).resolve().parents[1]


# ---- inputs ----


def make_set(likelihood: str, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One seeded input set, scVI-shaped. Every tensor that a model would learn requires grad."""
    library = torch.randint(1_000, 20_000, (batch, 1), generator=generator).float()
    log_mu = torch.log_softmax(2 * torch.randn(batch, GENES, generator=generator), 1) + library.log()
    log_theta = torch.randn(GENES, generator=generator)
    gamma = torch._standard_gamma(log_theta.exp().expand(batch, GENES).contiguous(), generator=generator)
    x = torch.poisson(gamma * (log_mu - log_theta).exp(), generator=generator)
    zi_logits = torch.randn(batch, GENES, generator=generator) - 1
    if likelihood == "zinb":
        x = torch.where(torch.rand(batch, GENES, generator=generator) < torch.sigmoid(zi_logits), 0.0, x)
    inputs = {"log_mu": log_mu, "x": x, "mu": torch.randn(batch, LATENT, generator=generator),
              "logvar": 0.5 * torch.randn(batch, LATENT, generator=generator)}
    if likelihood != "poisson":
        inputs["log_theta"] = log_theta
    if likelihood == "zinb":
        inputs["zi_logits"] = zi_logits
    for name, t in inputs.items():
        t.requires_grad_(name != "x")
    return inputs


def input_sets(likelihood: str, batch: int, mode: str) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(SEED)
    first = make_set(likelihood, batch, generator)
    if mode == "warm":
        return [first]
    set_bytes = sum(t.numel() * t.element_size() for t in first.values())
    count = max(2, -(-4 * timing.last_level_cache_bytes(torch.device("cpu")) // set_bytes))
    return [first] + [make_set(likelihood, batch, generator) for _ in range(count - 1)]


def checksum(sets: list[dict[str, torch.Tensor]]) -> float:
    return float(sum(float(t.detach().double().sum()) for s in sets for t in s.values()))


# ---- contenders ----


def fused_loss(likelihood: str) -> Callable:
    import vae_fast

    def loss(log_mu, x, mu, logvar, log_theta=None, zi_logits=None):
        return vae_fast.vae_loss(log_mu, x, mu, logvar, likelihood=likelihood, log_theta=log_theta, zi_logits=zi_logits)

    return loss


def baseline_loss(likelihood: str) -> Callable:
    def loss(log_mu, x, mu, logvar, log_theta=None, zi_logits=None):
        return baselines.count_loss(log_mu, x, mu, logvar, log_theta, zi_logits, likelihood)

    return loss


def forward_backward(loss: Callable, sets: list[dict[str, torch.Tensor]]) -> Callable[[], object]:
    """One call = loss and every input gradient (torch.autograd.grad: nothing accumulates), on the
    next input set."""
    index = [0]

    def run():
        inputs = sets[index[0] % len(sets)]
        index[0] += 1
        leaves = [t for t in inputs.values() if t.requires_grad]
        return torch.autograd.grad(loss(**inputs), leaves)

    return run


def local_runs(likelihood: str, sets, names) -> dict[str, Callable[[], object]]:
    torch._dynamo.reset()
    makers = {"fused": lambda: fused_loss(likelihood), "eager": lambda: baseline_loss(likelihood),
              "compiled": lambda: torch.compile(baseline_loss(likelihood), fullgraph=True)}
    return {name: forward_backward(makers[name](), sets) for name in names}


# ---- the other interpreter ----


def serve() -> None:
    """Server loop in the baseline interpreter: JSON requests on stdin, replies on stdout."""
    runs, sets = {}, None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "hello":
                reply = {"torch": torch.__version__}
            elif request["cmd"] == "build":
                runs, sets = {}, None
                torch.set_num_threads(request["threads"])
                sets = input_sets(request["likelihood"], request["batch"], request["mode"])
                runs = local_runs(request["likelihood"], sets, ("eager", "compiled"))
                compile_s = timing.first_call_seconds(runs["compiled"], torch.device("cpu"))
                for run in runs.values():
                    run()
                reply = {"checksum": checksum(sets), "compile_s": compile_s}
            elif request["cmd"] == "time":
                reply = {"seconds": timing.HostClock().seconds_per_call(runs[request["name"]], request["calls"])}
            elif request["cmd"] == "warm":
                timing.warm_for(runs[request["name"]], request["seconds"])
                reply = {}
            else:
                reply = {"error": f"unknown request {request['cmd']!r}"}
        except Exception as error:  # noqa: BLE001  (reported to the parent)
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)


class Baseline:
    """The server in the other interpreter; `RemoteRun(self, name, mode)` times one of its contenders
    (the case built last, whose mode the build request named: `mode` is not sent again)."""

    def __init__(self, python: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
        self.child = subprocess.Popen([python, str(Path(__file__).resolve()), "--serve"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
        self.torch_version = self.ask({"cmd": "hello"})["torch"]

    def ask(self, request: dict) -> dict:
        self.child.stdin.write(json.dumps(request) + "\n")
        self.child.stdin.flush()
        line = self.child.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline interpreter exited ({self.child.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"baseline interpreter: {reply['error']}")
        return reply

    def seconds_per_call(self, name: str, mode: str, calls: int) -> float:
        return self.ask({"cmd": "time", "name": name, "calls": calls})["seconds"]

    def warm_for(self, name: str, mode: str, seconds: float) -> None:
        self.ask({"cmd": "warm", "name": name, "seconds": seconds})

    def close(self) -> None:
        self.child.stdin.close()
        self.child.wait(timeout=60)


# ---- timing ----


@dataclass
class Row:
    likelihood: str
    batch: int
    mode: str
    medians_ms: dict[str, float]
    compile_s: dict[str, float]
    input_sets: int


def measure_case(likelihood: str, batch: int, mode: str, baseline: Baseline | None, budget_s: float) -> Row:
    sets = input_sets(likelihood, batch, mode)
    runs = local_runs(likelihood, sets, ("fused", "eager", "compiled"))
    compile_s = {"compiled": timing.first_call_seconds(runs["compiled"], torch.device("cpu"))}
    if baseline is not None:
        reply = baseline.ask({"cmd": "build", "likelihood": likelihood, "batch": batch, "mode": mode,
                              "threads": torch.get_num_threads()})
        if abs(reply["checksum"] - checksum(sets)) > 1e-6 * abs(checksum(sets)):
            raise RuntimeError(f"the baseline interpreter built other inputs for {likelihood} B={batch} {mode}")
        compile_s["compiled 2.13"] = reply["compile_s"]
        runs["eager 2.13"] = RemoteRun(baseline, "eager", mode)
        runs["compiled 2.13"] = RemoteRun(baseline, "compiled", mode)
    for run in runs.values():
        run()
    clock = timing.HostClock()
    repetitions = timing.choose_repetitions(runs, clock, min_sample_s=0.05, budget_s=budget_s, min_rounds=5, max_rounds=15)
    samples = timing.interleaved_samples(runs, clock, repetitions, settle_s=SETTLE_S if baseline else 0.0,
                                         warmup_s=WARMUP_AFTER_SETTLE_S if baseline else 0.0)
    medians = {name: 1e3 * statistics.median(s) for name, s in samples.items()}
    return Row(likelihood, batch, mode, medians, compile_s, len(sets))


# ---- memory ----


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_bytes(run: Callable[[], object]) -> int:
    """Peak RSS during one call above the RSS just before it (the gradients it returns included)."""
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    result = run()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    del result
    return peak[0] - before


def memory_child(likelihood: str, batch: int, name: str) -> None:
    """Runs in a fresh process: prints {"extra": bytes, "inputs": bytes, "gradients": bytes}."""
    sets = input_sets(likelihood, batch, "warm")
    run = local_runs(likelihood, sets, (name,))[name]
    for _ in range(2):
        run()
    extra = min(peak_extra_bytes(run) for _ in range(3))
    inputs = sum(t.numel() * t.element_size() for t in sets[0].values())
    gradients = sum(t.numel() * t.element_size() for t in sets[0].values() if t.requires_grad)
    print(json.dumps({"extra": extra, "inputs": inputs, "gradients": gradients}))


def measure_memory(likelihood: str, batch: int, python: str = sys.executable) -> dict[str, dict]:
    out = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("fused", "eager", "compiled"):
        result = subprocess.run([python, str(Path(__file__).resolve()), "--memory-child", likelihood, str(batch), name],
                                capture_output=True, text=True, env=env, cwd=str(ROOT), check=True)
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# ---- report ----


def ratio_cells(row: Row, names) -> list[str]:
    fused = row.medians_ms["fused"]
    return [f"{row.medians_ms[n] / fused:.2f}x" if n in row.medians_ms else "-" for n in names]


def run_lines(header: dict) -> list[str]:
    remote = "baseline_torch" in header
    return [f"- {header['date']}, revision {header['revision']}: `{header['command']}`; fused, eager, compiled: torch "
            f"{header['torch']}" + (f"; eager 2.13, compiled 2.13: torch {header['baseline_torch']} "
                                    f"({header['baseline_python']}), same seeded inputs, rounds interleaved" if remote else "")
            + f"; load average before / after {header['load_before']} / {header['load_after']}."]


def to_markdown(rows: list[Row], memory: dict, headers: list[dict]) -> str:
    remote = any("eager 2.13" in r.medians_ms for r in rows)
    names = ["fused", "eager", "compiled"] + (["eager 2.13", "compiled 2.13"] if remote else [])
    header = headers[0]
    lines = [f"# Count-loss benchmark: cpu ({header['cpu']}, {header['threads']} threads), {header['date'][:10]}", "",
             "Runs:", *[line for h in headers for line in run_lines(h)], "",
             "Median ms per fwd+bwd (loss and every input gradient) over interleaved rounds; `vs X` is X's time over "
             "fused's. D = 20,000 genes, float32, log_theta per gene. eager/compiled: vae_fast.baselines.count_loss "
             "(scvi-tools' formulas; Poisson: the plain formula).", "",
             "| likelihood | B | mode | sets | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"vs {n}" for n in names[1:]) + " | compile s |",
             "|---|---:|---|---:|" + "---:|" * (2 * len(names) - 1) + "---:|"]
    for r in rows:
        times = [f"{r.medians_ms[n]:.3g}" for n in names]
        compile_s = ", ".join(f"{v:.0f}" for v in r.compile_s.values())
        lines.append(f"| {r.likelihood} | {r.batch} | {r.mode} | {r.input_sets} | " + " | ".join(times) + " | "
                     + " | ".join(ratio_cells(r, names[1:])) + f" | {compile_s} |")
    lines += ["", "## Targets (issue 20: NB and ZINB >= 4x eager and >= 2x compiled, CPU)", ""]
    for r in rows:
        if r.likelihood == "poisson":
            continue
        compiled = min(r.medians_ms[n] for n in names if n.startswith("compiled"))
        eager = min(r.medians_ms[n] for n in names if n.startswith("eager"))
        for what, best, target in (("eager", eager, TARGETS["eager"]), ("compiled", compiled, TARGETS["compiled"])):
            speedup = best / r.medians_ms["fused"]
            verdict = "met" if speedup >= target else "short"
            lines.append(f"- {r.likelihood} B={r.batch} {r.mode}: vs the faster {what} {speedup:.2f}x (target {target:g}x): **{verdict}**")
    if memory:
        lines += ["", "## Peak memory of one fwd+bwd (B = 1024, RSS above the inputs, fresh process each)", "",
                  "| likelihood | inputs MB | gradients MB | " + " | ".join(f"{n} peak extra MB" for n in memory_names(memory))
                  + " | fused within inputs + gradients |", "|---|---:|---:|" + "---:|" * len(memory_names(memory)) + "---|"]
        for likelihood, per in memory.items():
            first = next(iter(per.values()))
            extras = [f"{per[n]['extra'] / 2**20:.0f}" for n in memory_names(memory)]
            within = "yes" if per["fused"]["extra"] <= first["gradients"] * 1.05 else "no"
            lines.append(f"| {likelihood} | {first['inputs'] / 2**20:.0f} | {first['gradients'] / 2**20:.0f} | "
                         + " | ".join(extras) + f" | {within} |")
        lines.append("")
        lines.append("'within' allows 5% over the gradients' bytes for the RSS sampling's page granularity and the loss's own buffers.")
    return "\n".join(lines) + "\n"


def memory_names(memory: dict) -> list[str]:
    return list(next(iter(memory.values())))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--likelihoods", nargs="+", default=list(LIKELIHOODS), choices=LIKELIHOODS)
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 1024])
    parser.add_argument("--modes", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    parser.add_argument("--baseline-python", help="interpreter of another torch build whose eager and compile are timed too")
    parser.add_argument("--budget-s", type=float, default=8.0, help="timing budget per case (seconds)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the measurements here, for --combine")
    parser.add_argument("--combine", nargs="+", type=Path, help="only build the report from these --json files")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.combine:
        return write_report(combined(args.combine), args.out)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "cpu": platform.processor() or "cpu", "threads": torch.get_num_threads(),
              "command": "python " + " ".join(sys.argv), "load_before": "%.1f" % os.getloadavg()[0],
              "torch": torch.__version__, "revision": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=ROOT).stdout.strip()}
    with open("/proc/cpuinfo") as f:
        info = f.read()
    header["cpu"] = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                         header["cpu"]) + (", AVX-512" if " avx512f" in info else "")
    baseline = Baseline(args.baseline_python) if args.baseline_python else None
    if baseline:
        header.update(baseline_torch=baseline.torch_version, baseline_python=args.baseline_python)
    rows = []
    try:
        for likelihood in args.likelihoods:
            for batch in args.batches:
                for mode in args.modes:
                    rows.append(measure_case(likelihood, batch, mode, baseline, args.budget_s))
                    print(rows[-1], flush=True)
    finally:
        if baseline:
            baseline.close()
    memory = {} if args.no_memory else {lik: measure_memory(lik, 1024) for lik in args.likelihoods}
    header["load_after"] = "%.1f" % os.getloadavg()[0]
    run = {"headers": [header], "rows": [asdict(r) for r in rows], "memory": memory}
    if args.json:
        args.json.write_text(json.dumps(run, indent=1))
    return write_report(run, args.out)


def combined(paths: list[Path]) -> dict:
    """Several runs (one per likelihood keeps each under a few minutes) as one."""
    runs = [json.loads(p.read_text()) for p in paths]
    return {"headers": [h for r in runs for h in r["headers"]], "rows": [row for r in runs for row in r["rows"]],
            "memory": {k: v for r in runs for k, v in r["memory"].items()}}


def write_report(run: dict, out: Path | None) -> int:
    report = to_markdown([Row(**r) for r in run["rows"]], run["memory"], run["headers"])
    print(report)
    if out:
        out.write_text(report)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve()
    elif sys.argv[1:2] == ["--memory-child"]:
        memory_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(main())
