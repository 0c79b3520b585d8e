"""Per-call host time of the fused ops on the CPU at a training batch (issue 21): loss forward+backward
and reparameterize forward+backward, warm inputs (the same every call, as in a training step),
gradients set to None each call, against the eager formulas and torch's own cost of any backward.

Each contender runs in its own process (another build of vae_fast, another torch), one after the
other in rounds, so that a slower minute of a shared machine falls on all of them alike; a row's
figure is the median over rounds of each round's median per-call time.

    python benchmarks/bench_call_overhead.py --before /work/main --torch213 /work/venv-torch213/bin/python \\
        --out benchmarks/results/call-overhead-cpu-<date>.md

--before PATH: a checkout whose vae_fast (and built extension) is the "before" contender.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCH, FEATURES, LATENTS = 128, 784, 20
CASES = ("bernoulli probabilities", "bernoulli logits", "gaussian, learned scale", "reparameterize")


# ---- worker: one process, one vae_fast, one torch ----

def _per_call_us(step, samples: int, target_s: float = 0.01) -> float:
    """Median over samples of the mean time of one call, each sample about target_s long."""
    for _ in range(30):
        step()
    start = time.perf_counter()
    step()
    calls = max(10, int(target_s / max(time.perf_counter() - start, 1e-7)))
    times = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        for _ in range(calls):
            step()
        times.append((time.perf_counter_ns() - start) / calls / 1e3)
    return statistics.median(times)


def _inputs(torch, case: str):
    gen = torch.Generator().manual_seed(0)
    recon = torch.randn(BATCH, FEATURES, generator=gen)
    if case == "bernoulli probabilities":
        recon = torch.sigmoid(recon)
    x = (torch.rand(BATCH, FEATURES, generator=gen) > 0.5).float()
    mu = torch.randn(BATCH, LATENTS, generator=gen)
    logvar = torch.randn(BATCH, LATENTS, generator=gen)
    log_scale = torch.zeros(())  # one shared learned log-sigma, as the eager baseline's
    leaves = [t.requires_grad_() for t in (recon, mu, logvar)]
    if case == "gaussian, learned scale":
        leaves.append(log_scale.requires_grad_())
    return recon, x, mu, logvar, log_scale, leaves


def _step(torch, case: str, implementation: str):
    """One training step's use of the op: forward, backward, gradients set to None."""
    from vae_fast import baselines

    recon, x, mu, logvar, log_scale, leaves = _inputs(torch, case)
    if case == "reparameterize":
        grad_z = torch.randn(BATCH, LATENTS)
        leaves = [mu, logvar]
        if implementation == "fused":
            import vae_fast
            forward = lambda: vae_fast.reparameterize(mu, logvar)  # noqa: E731
        else:
            forward = lambda: baselines.eager_reparameterize(mu, logvar)  # noqa: E731
        backward = lambda z: z.backward(grad_z)  # noqa: E731
    else:
        if implementation == "fused":
            import vae_fast
            kwargs = {"bernoulli probabilities": {}, "bernoulli logits": {"logits": True},
                      "gaussian, learned scale": {"likelihood": "gaussian", "log_scale": log_scale}}[case]
            forward = lambda: vae_fast.vae_loss(recon, x, mu, logvar, **kwargs)  # noqa: E731
        else:
            eager = {"bernoulli probabilities": lambda: baselines.eager_loss_probs(recon, x, mu, logvar),
                     "bernoulli logits": lambda: baselines.eager_loss_logits(recon, x, mu, logvar),
                     "gaussian, learned scale": lambda: baselines.eager_loss_gaussian(recon, x, mu, logvar, log_scale)}
            forward = eager[case]
        backward = lambda loss: loss.backward()  # noqa: E731

    def step():
        for leaf in leaves:
            leaf.grad = None
        backward(forward())
    return step


def _floor_step(torch):
    """torch's own cost of the smallest backward: a 4-element sum into one leaf."""
    a = torch.randn(4, requires_grad=True)

    def step():
        a.grad = None
        a.sum().backward()
    return step


def _breakdown(torch, samples: int) -> dict[str, float]:
    """Where a fused loss call's host time goes (bernoulli logits), each piece timed alone."""
    import vae_fast
    from torch.autograd.variable import Variable
    from vae_fast import functional

    recon, x, mu, logvar, _, leaves = _inputs(torch, "bernoulli logits")
    tiny = [t[:1, :1].detach().clone().requires_grad_(t.requires_grad) for t in (recon, x, mu, logvar)]
    one = torch.ones(())
    pieces = {}

    def none_grads():
        for leaf in leaves + tiny:
            leaf.grad = None
    for label, args in (("B=128", (recon, x, mu, logvar)), ("B=1, D=1, L=1", tiny)):
        def op_forward(args=args):
            torch.ops.vae_fast.vae_loss.default(*args, None, None, "bernoulli", True, 0.0, 1.0, "sum",
                                                [False] * 6)
        with torch.no_grad():
            pieces[f"{label}: op forward under no_grad (torch.ops, C++ checks, kernel)"] = _per_call_us(op_forward, samples)
            pieces[f"{label}: vae_fast.vae_loss forward under no_grad"] = _per_call_us(
                lambda args=args: vae_fast.vae_loss(*args, logits=True), samples)
            checked_path = functional._vae_loss_unchecked
            functional._vae_loss_unchecked = lambda *args: None
            pieces[f"{label}: vae_fast.vae_loss forward under no_grad, through its Python checks"] = _per_call_us(
                lambda args=args: vae_fast.vae_loss(*args, logits=True), samples)
            functional._vae_loss_unchecked = checked_path
        pieces[f"{label}: vae_fast.vae_loss forward, autograd node made"] = _per_call_us(
            lambda args=args: vae_fast.vae_loss(*args, logits=True), samples)

        def engine_only(args=args):
            none_grads()
            loss = vae_fast.vae_loss(*args, logits=True)
            Variable._execution_engine.run_backward((loss,), (one,), False, False, (), allow_unreachable=True,
                                                    accumulate_grad=True)
        pieces[f"{label}: forward + the engine's backward (no torch.autograd.backward Python)"] = _per_call_us(
            engine_only, samples)

        def full(args=args):
            none_grads()
            vae_fast.vae_loss(*args, logits=True).backward()
        pieces[f"{label}: forward + loss.backward()"] = _per_call_us(full, samples)
    return pieces


def worker(implementation: str, samples: int, breakdown: bool) -> None:
    warnings.simplefilter("ignore")  # torch 2.13 has no build of the extension: its reference warns
    import torch

    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": {}}
    result["rows"]["torch floor: 4-element sum().backward()"] = _per_call_us(_floor_step(torch), samples)
    for case in CASES:
        result["rows"][case] = _per_call_us(_step(torch, case, implementation), samples)
    if breakdown:
        result["breakdown"] = _breakdown(torch, samples)
    print(json.dumps(result))


# ---- driver: contenders in alternating rounds ----

def _run(python: str, pythonpath: Path, implementation: str, samples: int, breakdown: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    command = [python, str(Path(__file__).resolve()), "--worker", implementation, "--samples", str(samples)]
    if breakdown:
        command.append("--breakdown")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} (PYTHONPATH={pythonpath}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(contenders: dict[str, list[dict]], rows: list[str]) -> list[str]:
    names = list(contenders)
    lines = ["| per call, us | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in rows:
        cells = []
        for name in names:
            values = [r["rows"][row] for r in contenders[name] if row in r["rows"]]
            cells.append(f"{statistics.median(values):.1f}" if values else "")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def _cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    return name + (" (AVX-512)" if " avx512f" in info else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=("fused", "eager"), help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=7, help="samples per case and round (default 7)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over the contenders (default 5)")
    parser.add_argument("--before", type=Path, help="checkout of the 'before' vae_fast (its extension built)")
    parser.add_argument("--torch213", help="python of a torch 2.13 venv, for its eager and backward cost")
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.samples, args.breakdown)
        return

    python = sys.executable
    contenders = {"fused, this checkout": (python, REPO, "fused")}
    if args.before:
        contenders["fused, --before"] = (python, args.before, "fused")
    contenders["eager"] = (python, REPO, "eager")
    if args.torch213:
        contenders["eager, --torch213"] = (args.torch213, REPO, "eager")
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    breakdowns = []
    for round_index in range(args.rounds):
        for name, (py, path, implementation) in contenders.items():
            breakdown = name == "fused, this checkout"
            result = _run(py, path, implementation, args.samples, breakdown)
            results[name].append(result)
            if breakdown:
                breakdowns.append(result.pop("breakdown"))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    rows = ["torch floor: 4-element sum().backward()", *CASES]
    header = [
        f"# Per-call host time, CPU, B = {BATCH}, D = {FEATURES}, L = {LATENTS}",
        "",
        f"{_cpu_name()}, {os.cpu_count()} logical CPUs; "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; `python {' '.join(sys.argv)}`.",
        "torch: " + ", ".join(f"{name} {results[name][0]['torch']} ({results[name][0]['threads']} threads)"
                              for name in contenders) + ".",
        f"Forward + backward, warm inputs, gradients set to None each call; median over {args.rounds} rounds "
        f"(contenders alternating, one process each) of the median of {args.samples} samples.",
        "",
    ]
    lines = header + _table(results, rows) + ["", "## Where the fused call's time goes (bernoulli logits, this checkout)", "",
                                              "| piece | us |", "|---|---:|"]
    for piece in breakdowns[0]:
        lines.append(f"| {piece} | {statistics.median(b[piece] for b in breakdowns):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
