"""Drop-in training benchmark: the PyTorch examples' VAE and loss against `vae_fast.VAE` +
`vae_fast.loss_function`, in the example's setup (batch 128, Adam lr 1e-3), on real MNIST digits
(8,000 train / 2,000 held out from the 10,000-image test files).

Both start from the same weights and see the same batches in the same order. They train side by
side in one process, interleaved step by step (the first to run rotates), so bursts of load from
other processes on the machine hit all variants alike; an epoch's time is the sum of its timed
steps (forward, loss, backward, optimizer step), and the speedup is the ratio of median epoch
times. Batches are slices of an in-memory tensor, identical for all variants (data loading,
the same for all, is left out).
The held-out loss is the mean per-image negative ELBO (the example's loss) after each epoch, with
the same posterior noise for every model.

    python benchmarks/bench_vae_training.py [--epochs 10] [--data-dir ../shared/data/mnist] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import vae_fast
from vae_fast import VAE
from vae_fast.baselines import ExampleVAE, example_loss_function
from vae_fast.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE, LR = 128, 1e-3


def _vae_from_example(example: ExampleVAE) -> VAE:
    """vae_fast.VAE holding the example's initial weights (both heads stacked into one layer)."""
    model = VAE()
    with torch.no_grad():
        for ours, theirs in ((model.encoder[0], example.fc1), (model.decoder[0], example.fc3), (model.decoder[2], example.fc4)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        model.encoder_heads.weight.copy_(torch.cat([example.fc21.weight, example.fc22.weight]))
        model.encoder_heads.bias.copy_(torch.cat([example.fc21.bias, example.fc22.bias]))
    return model


def _step_drop_in(model, loss_fn):
    def step(x):
        recon, mu, logvar = model(x)
        return loss_fn(recon, x, mu, logvar)

    return step


def _step_logits(model: VAE):
    def step(x):
        logits, mu, logvar = model.forward_logits(x)
        return vae_fast.vae_loss(logits, x, mu, logvar, logits=True)

    return step


def _timed_step(step, optimizer, x) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    loss = step(x)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


@torch.no_grad()
def _held_out_loss(model, test_x: torch.Tensor, eps: torch.Tensor) -> float:
    """Mean negative ELBO per image, z = mu + std * eps with the given noise (the same for all models)."""
    mu, logvar = model.encode(test_x)
    recon = model.decode(mu + torch.exp(0.5 * logvar) * eps)
    return example_loss_function(recon, test_x, mu, logvar).item() / len(test_x)


def run(epochs: int, data_dir: Path, seed: int = 0) -> dict:
    data = load_dataset("mnist", data_dir=data_dir, seed=seed, download_url=None)
    torch.manual_seed(seed)
    example = ExampleVAE()
    drop_in, logits_path = _vae_from_example(example), _vae_from_example(example)
    variants = {
        "example VAE + example loss_function": (example, _step_drop_in(example, example_loss_function)),
        "vae_fast.VAE + vae_fast.loss_function (drop-in)": (drop_in, _step_drop_in(drop_in, vae_fast.loss_function)),
        "vae_fast.VAE.forward_logits + vae_loss(logits=True)": (logits_path, _step_logits(logits_path)),
    }
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=LR) for name, (model, _) in variants.items()}
    times = {name: [] for name in variants}
    losses = {name: [] for name in variants}
    names = list(variants)
    for epoch in range(epochs):
        order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed + epoch))
        batches = [data.train_x[i] for i in order.split(BATCH_SIZE)]
        for name in names:
            times[name].append(0.0)
        for index, x in enumerate(batches):
            for name in names[index % len(names):] + names[: index % len(names)]:
                times[name][-1] += _timed_step(variants[name][1], optimizers[name], x)
        eps = torch.randn(len(data.test_x), 20, generator=torch.Generator().manual_seed(seed + 2000 + epoch))
        for name in names:
            losses[name].append(_held_out_loss(variants[name][0], data.test_x, eps))
        print(f"epoch {epoch + 1}: " + ", ".join(f"{times[n][-1]:.3f}s/{losses[n][-1]:.2f}" for n in names), flush=True)
    return {"times": times, "losses": losses, "epochs": epochs, "train": len(data.train_x), "test": len(data.test_x)}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def report(result: dict) -> str:
    names = list(result["times"])
    baseline = statistics.median(result["times"][names[0]])
    baseline_min = min(result["times"][names[0]])
    baseline_loss = result["losses"][names[0]][-1]
    lines = [
        f"# Drop-in VAE training, CPU, {datetime.date.today().isoformat()}",
        "",
        f"Machine: {_cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; vae_fast {vae_fast.__version__}. "
        f"Load average (1/5/15 min) at the end: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}: other processes shared "
        "the machine; epochs much slower than the fastest ran under their load, which the interleaving spreads over all variants.",
        f"Data: MNIST test files, {result['train']} train / {result['test']} held out; batch {BATCH_SIZE}, Adam lr {LR}; "
        f"{result['epochs']} epochs, the variants' steps interleaved; epoch time = sum of its steps.",
        "",
        "| variant | median epoch (s) | speedup | fastest epoch (s) | speedup | held-out loss after last epoch (nats/image) | vs example |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        median = statistics.median(result["times"][name])
        loss = result["losses"][name][-1]
        fastest = min(result["times"][name])
        lines.append(f"| {name} | {median:.3f} | {baseline / median:.2f}x | {fastest:.3f} | {baseline_min / fastest:.2f}x "
                     f"| {loss:.2f} | {100 * (loss / baseline_loss - 1):+.2f}% |")
    lines += ["", "Per-epoch times (s): " + "; ".join(f"{n}: " + ", ".join(f"{t:.3f}" for t in result["times"][n]) for n in names)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    table = report(run(args.epochs, args.data_dir))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"vae_training-cpu-{datetime.date.today().isoformat()}.md"
    path.write_text(table)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
