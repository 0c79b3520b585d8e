"""Whole-step training benchmark of the scVI-shaped count model (issue 20): `vae_fast.VAE` with a
negative binomial or zero-inflated NB decoder over D = 20,000 genes (scVI's defaults: one hidden
layer of 128, a 10-d latent, dispersion per gene), batch 128, Adam, on synthetic counts
(`vae_fast.count_data.synthetic_counts`, library size 2,000).

Two objectives on the same model, from the same weights, on the same batches:
- fused: `vae_fast.vae_loss(..., likelihood="nb" | "zinb", log_theta=..., zi_logits=...)`
  (the fused kernels where the extension serves the device, else the pure-torch reference);
- scvi eager: scvi-tools' own formula (`vae_fast.baselines.count_loss`: log_nb_positive /
  log_zinb_positive, from its published definition) in eager torch.
A step is forward, loss, backward and Adam; the two alternate step by step (the first to run
rotates) so that load from other processes hits both alike; each reports its median step time and
the speed-up is the ratio of the medians.

    python benchmarks/bench_count_training.py [--steps 30] [--genes 20000] [--batch 128] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

import vae_fast
from vae_fast import VAE, _extension
from vae_fast.baselines import count_loss
from vae_fast.count_data import synthetic_counts
from vae_fast.train_step import make_optimizer

HIDDEN, LATENT, LR = 128, 10, 1e-3


def fused_loss(model: VAE, x: torch.Tensor) -> torch.Tensor:
    return model.loss(x)


def scvi_eager_loss(model: VAE, x: torch.Tensor) -> torch.Tensor:
    log_mu, mu, logvar, kwargs = model.forward_loss_inputs(x)
    return count_loss(log_mu, x, mu, logvar, kwargs.get("log_theta"), kwargs.get("zi_logits"), likelihood=model.likelihood)


VARIANTS = {"fused": fused_loss, "scvi eager": scvi_eager_loss}


def _step(model, optimizer, loss_of, x) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_of(model, x)
    loss.backward()
    optimizer.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def time_likelihood(likelihood: str, batches: list[torch.Tensor], steps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per step of each variant, interleaved, after `warmup` untimed steps each."""
    torch.manual_seed(0)
    base = VAE(batches[0].shape[1], HIDDEN, LATENT, likelihood=likelihood, dispersion="gene", library_size=2000.0)
    runs = {}
    for name in VARIANTS:
        model = copy.deepcopy(base).to(batches[0].device)
        runs[name] = (model, make_optimizer(model.parameters(), LR))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for index in range(warmup + steps):
        x = batches[index % len(batches)]
        names = list(VARIANTS)
        names = names[index % 2:] + names[:index % 2]  # who goes first rotates
        for name in names:
            model, optimizer = runs[name]
            elapsed = _step(model, optimizer, VARIANTS[name], x)
            if index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def _table(results: dict, args, device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"# Count-model training step: fused vs scvi-tools' eager formula ({device.type})",
        "",
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, vae_fast {vae_fast.__version__}, "
        f"{cpu}, {torch.get_num_threads()} threads; batch {args.batch}, D = {args.genes}, hidden {HIDDEN}, latent {LATENT}, "
        f"dispersion per gene, Adam; median of {args.steps} interleaved steps after 3 warm-up steps each.",
        f"The fused variant's loss: {'the compiled extension' if _extension.serves(device) else 'the pure-torch reference'} "
        f"serves {device.type}.",
        "",
        "| likelihood | fused ms/step | scvi eager ms/step | speed-up |",
        "| --- | ---: | ---: | ---: |",
    ]
    for likelihood, medians in results.items():
        fused, eager = medians["fused"], medians["scvi eager"]
        lines.append(f"| {likelihood} | {fused * 1e3:.1f} | {eager * 1e3:.1f} | {eager / fused:.2f}x |")
    lines += ["", "Command: `python benchmarks/bench_count_training.py " + " ".join(args.argv) + "`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant and likelihood")
    parser.add_argument("--genes", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--likelihoods", default="nb,zinb")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="folder for count_training-<device>-<date>.md (printed only without it)")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    device = torch.device(args.device)
    results = {}
    for likelihood in args.likelihoods.split(","):
        data = synthetic_counts(4 * args.batch, args.genes, latent_dim=LATENT, likelihood=likelihood, library_size=2000.0, seed=0)
        batches = [b.to(device) for b in data.x.split(args.batch)]
        results[likelihood] = time_likelihood(likelihood, batches, args.steps)
        print(likelihood, {k: f"{v * 1e3:.1f} ms" for k, v in results[likelihood].items()}, flush=True)
    table = _table(results, args, device)
    print(table)
    if args.out:
        path = Path(args.out) / f"count_training-{device.type}-{datetime.date.today().isoformat()}.md"
        path.write_text(table)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
