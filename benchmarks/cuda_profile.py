"""Where the time of the fused CUDA ops goes, at the issue's large sizes (B=65536, D=784, L=64, float32).

`vae-fast bench` times a call from the host, as a user's loop sees it: for a fwd+bwd that includes
autograd's host work, which at these sizes can be as long as the kernels themselves. This script
separates the two:
- "eager call": the host-timed call, as in the benchmark (median of repeated calls);
- "graph replay": the same fwd+bwd captured in a CUDA graph and replayed, timed with CUDA events:
  the device's own time with no host work in between, which is what the copy-bandwidth target is about;
- "kernels": each kernel's device time from torch.profiler, per call.

    python benchmarks/cuda_profile.py            # the table
    ncu --clock-control none -k regex:'vae_loss|reparameterize' python benchmarks/cuda_profile.py --once
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch

import vae_fast
from vae_fast.bench.cases import loss_ideal_bytes, reparameterize_ideal_bytes
from vae_fast.bench.timing import copy_bandwidth

BATCH, FEATURES, LATENT = 65536, 784, 64


def _cases(device):
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g)

    mu, logvar = randn(BATCH, LATENT).requires_grad_(), (0.3 * randn(BATCH, LATENT)).requires_grad_()
    logits = randn(BATCH, FEATURES).requires_grad_()
    probs = torch.sigmoid(randn(BATCH, FEATURES)).requires_grad_()
    x = torch.rand(BATCH, FEATURES, device=device, generator=g)

    def reparameterize():
        z = vae_fast.reparameterize(mu, logvar)
        return torch.autograd.grad(z, (mu, logvar), torch.ones_like(z))

    def loss(recon, logits_flag):
        def run():
            out = vae_fast.vae_loss(recon, x, mu, logvar, logits=logits_flag)
            return torch.autograd.grad(out, (recon, mu, logvar))

        return run

    return {
        "reparameterize fwd+bwd": (reparameterize, reparameterize_ideal_bytes(BATCH, LATENT, 4, backward=True)),
        "loss_logits fwd+bwd": (loss(logits, True), loss_ideal_bytes(BATCH, LATENT, 4, backward=True)),
        "loss_probs fwd+bwd": (loss(probs, False), loss_ideal_bytes(BATCH, LATENT, 4, backward=True)),
    }


def _host_timed(run, repeats=50) -> float:
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _graph_timed(run, repeats=50) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def _kernel_times(run, calls=20) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    per_kernel = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us and event.key not in ("ProfilerStep*",):
            per_kernel[event.key] = device_us / calls / 1e6
    return per_kernel


def _short(kernel: str) -> str:
    """The kernel's own name: the first identifier followed (after its template arguments) by the
    parameter list, so namespaces like `(anonymous namespace)` and parameter types drop out."""
    match = re.search(r"(\w+)(?:<[^()]*>)?\(", kernel.removeprefix("void "))
    return match.group(1) if match else kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="each case once after a warm-up (for ncu)")
    args = parser.parse_args()
    device = torch.device("cuda")
    cases = _cases(device)
    if args.once:
        for run, _ in cases.values():
            run()
            run()
        torch.cuda.synchronize()
        return
    copy = copy_bandwidth(device, 2**28)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; copy bandwidth {copy / 1e9:.0f} GB/s")
    print("| case | ideal MB | eager call ms | % of copy | graph replay ms | % of copy | kernels (device ms per call) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, (run, ideal) in cases.items():
        for _ in range(5):
            run()
        host, graph = _host_timed(run), _graph_timed(run)
        kernels = ", ".join(f"{_short(k)} {v * 1e3:.4f}" for k, v in sorted(_kernel_times(run).items(), key=lambda kv: -kv[1]))
        print(f"| {name} | {ideal / 1e6:.1f} | {host * 1e3:.4f} | {100 * ideal / host / copy:.0f}% "
              f"| {graph * 1e3:.4f} | {100 * ideal / graph / copy:.0f}% | {kernels} |", flush=True)


if __name__ == "__main__":
    main()
