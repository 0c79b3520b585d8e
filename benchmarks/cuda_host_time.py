"""Host time of the fused ops on a GPU, per call (issue 21's GPU half), in one run:

- per call, forward+backward, gradients set to None each call, warm inputs: the wall time of N
  calls between two CUDA events, and the host's own time to issue them (perf_counter, no sync
  inside the loop), fused against the eager formulas, at B = 128 (host-bound: target <= 60 us of
  host time and >= 3x eager) and B = 65536 (device-bound: compare with cuda_profile.py's graph replay);
- whether AccumulateGrad keeps the loss's own gradient tensors (stolen, no copy) and how many
  device allocations one call makes;
- a torch.profiler summary of a few host-timed B = 65536 calls (CPU ops with their CUDA time, and
  the runtime calls: a cudaStreamSynchronize, cudaMemcpy or cudaMalloc there is a stall), written to --out.

    python benchmarks/cuda_host_time.py --out results/cuda-host-time-<date>.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import vae_fast
from vae_fast import baselines

FEATURES = 784


def _inputs(batch: int, latents: int, probabilities: bool):
    g = torch.Generator("cuda").manual_seed(0)
    recon = torch.randn(batch, FEATURES, device="cuda", generator=g)
    if probabilities:
        recon = torch.sigmoid(recon)
    x = (torch.rand(batch, FEATURES, device="cuda", generator=g) > 0.5).float()
    mu = torch.randn(batch, latents, device="cuda", generator=g)
    logvar = 0.3 * torch.randn(batch, latents, device="cuda", generator=g)
    return [t.requires_grad_() for t in (recon, mu, logvar)], x


def _loss_step(batch: int, latents: int, logits: bool, fused: bool):
    (recon, mu, logvar), x = _inputs(batch, latents, probabilities=not logits)
    if fused:
        forward = lambda: vae_fast.vae_loss(recon, x, mu, logvar, logits=logits)  # noqa: E731
    else:
        eager = baselines.eager_loss_logits if logits else baselines.eager_loss_probs
        forward = lambda: eager(recon, x, mu, logvar)  # noqa: E731

    def step():
        recon.grad = mu.grad = logvar.grad = None
        forward().backward()
    return step


def _reparameterize_step(batch: int, latents: int, fused: bool):
    (_, mu, logvar), _ = _inputs(batch, latents, probabilities=False)
    grad_z = torch.randn_like(mu)
    sample = vae_fast.reparameterize if fused else baselines.eager_reparameterize

    def step():
        mu.grad = logvar.grad = None
        sample(mu, logvar).backward(grad_z)
    return step


def per_call_us(step, calls: int, rounds: int = 7) -> tuple[float, float]:
    """(wall per call between CUDA events, host time per call to issue it), medians over rounds."""
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    walls, hosts = [], []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        host_start = time.perf_counter()
        for _ in range(calls):
            step()
        hosts.append((time.perf_counter() - host_start) / calls * 1e6)
        end.record()
        end.synchronize()
        walls.append(start.elapsed_time(end) / calls * 1e3)
    return statistics.median(walls), statistics.median(hosts)


def gradients_kept(batch: int, latents: int) -> tuple[bool, int]:
    """Whether each leaf's .grad is the tensor the loss's forward computed (AccumulateGrad stole it
    rather than copying), and the device allocations of one forward+backward."""
    (recon, mu, logvar), x = _inputs(batch, latents, probabilities=False)
    grad_mask = [True, False, True, True, False, False]
    for _ in range(3):
        recon.grad = mu.grad = logvar.grad = None
        out = list(torch.ops.vae_fast.vae_loss.default(recon, x, mu, logvar, None, None, "bernoulli", True, 0.0, 1.0,
                                                       "sum", grad_mask))
        pointers = [out[i].data_ptr() for i in (1, 3, 4)]
        loss = out[0]
        del out
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        loss.backward()
        torch.cuda.synchronize()
        backward_allocations = torch.cuda.memory_stats()["allocation.all.allocated"] - before
    kept = all(p == t.grad.data_ptr() for p, t in zip(pointers, (recon, mu, logvar)))
    return kept, backward_allocations


def profile_summary(step, calls: int = 5) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    return f"torch.profiler over {calls} calls (times are totals over them):\n\n```\n{table}\n```\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the report (markdown) here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_host_time.py: no CUDA device")
    lines = [f"# Host time per call on {torch.cuda.get_device_name()}",
             "", f"{time.strftime('%Y-%m-%d', time.gmtime())}; torch {torch.__version__}; D = {FEATURES}; "
             "forward+backward, gradients set to None each call, warm inputs.", "",
             "| case | fused wall us | fused host us | eager wall us | eager host us | eager/fused wall |",
             "|---|---:|---:|---:|---:|---:|"]
    cases = [(f"loss {'logits' if logits else 'probabilities'} B={b} L={lat}",
              lambda fused, b=b, lat=lat, logits=logits: _loss_step(b, lat, logits, fused), calls)
             for b, lat, calls in ((128, 20, 500), (65536, 64, 50)) for logits in (True, False)]
    cases.append(("reparameterize B=128 L=20", lambda fused: _reparameterize_step(128, 20, fused), 500))
    for name, make, calls in cases:
        fused_wall, fused_host = per_call_us(make(True), calls)
        eager_wall, eager_host = per_call_us(make(False), calls)
        lines.append(f"| {name} | {fused_wall:.1f} | {fused_host:.1f} | {eager_wall:.1f} | {eager_host:.1f} | "
                     f"{eager_wall / fused_wall:.2f}x |")
    for batch, latents in ((128, 20), (65536, 64)):
        kept, allocations = gradients_kept(batch, latents)
        lines.append(f"\nB={batch}: .grad is the forward's own gradient tensor (no AccumulateGrad copy): {kept}; "
                     f"device allocations in backward: {allocations}")
    lines += ["", "## B = 65536, loss logits, fused", "", profile_summary(_loss_step(65536, 64, True, True))]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
