"""Training benchmarks, two suites.

--suite drop-in (default): the PyTorch examples' VAE and loss against `vae_fast.VAE` +
`vae_fast.loss_function`, in the example's setup (batch 128, Adam lr 1e-3), on real MNIST digits
(8,000 train / 2,000 held out from the 10,000-image test files), on the CPU or a GPU.

Both start from the same weights and see the same batches in the same order. They train side by
side in one process, interleaved step by step (the first to run rotates), so bursts of load from
other processes on the machine hit all variants alike; an epoch's time is the sum of its timed
steps (forward, loss, backward, optimizer step), and the speedup is the ratio of median epoch
times. Batches are slices of an in-memory tensor, identical for all variants (data loading,
the same for all, is left out).
One more variant is not a drop-in: the step `vae-fast train` runs (`vae_fast.train_step.TrainStep`
on `vae_fast.training.NegativeElbo`, the same code as the command), from the same weights.
On a GPU each step ends in a synchronization, as the example's loop does (its `loss.item()`), and
two more variants run: the whole step (forward, loss, backward, Adam) of vae_fast and of the example
captured in a CUDA graph and replayed, one launch per step: the strongest baseline a GPU user has
without writing kernels.
The held-out loss is the mean per-image negative ELBO (the example's loss) after each epoch, with
the same posterior noise for every model.

--suite train-step: for the example's MLP VAE and the widely copied conv VAE
(`vae_fast.bench.training.train_step_contenders`), what a user would try for a whole step: the
eager loop; torch.compile of model+loss; torch.compile(mode="reduce-overhead") of model+loss with
Adam's step compiled and a tensor lr (PyTorch's tutorial); `vae_fast.TrainStep` on the user's own
model and loss, and on vae_fast's model and fused loss; on a GPU, TrainStep's CUDA graph for both.
Compiling and capturing happen in warm-up steps timed apart (see `run`). `--other-torch PYTHON`
runs the torch-only contenders again under another torch, in a process of their own after this
one's, on the same data, seeds and weights (vae_fast's Python from this tree).

    python benchmarks/bench_vae_training.py [--epochs 10] [--data-dir ../shared/data/mnist] [--out benchmarks/results]
                                            [--device cuda] [--batch-sizes 128,1024]
    python benchmarks/bench_vae_training.py --suite train-step [--models mlp,conv] [--profile]
                                            [--other-torch /work/venv-torch213/bin/python]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import vae_fast
from vae_fast import VAE
from vae_fast.baselines import ExampleVAE, example_loss_function
from vae_fast.bench.training import train_step_contenders, vae_fast_model
from vae_fast.train_step import TrainStep, make_optimizer
from vae_fast.cli import _positive_ints as positive_ints
from vae_fast.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE, LR = 128, 1e-3
TRAIN_COMMAND = "vae-fast train's step (TrainStep: logits, fused loss, fused Adam)"


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


class EagerStep:
    """One training step as the example writes it."""

    def __init__(self, loss_of_batch, model):
        self.loss_of_batch = loss_of_batch
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def __call__(self, x):
        self.optimizer.zero_grad()
        self.loss_of_batch(x).backward()
        self.optimizer.step()


def _captured(loss_of_batch, model) -> TrainStep:
    """The whole step replayed from a CUDA graph (TrainStep's graph mode), with the example's Adam
    made capturable."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, capturable=True)
    return TrainStep(model, optimizer, lambda _, x: loss_of_batch(x), cuda_graph=True)


class TrainCommandStep:
    """The step `vae-fast train` runs (vae_fast.train_step.TrainStep: the model's logits path and
    the fused loss through training.NegativeElbo, the fused Adam called directly, the batch's
    [loss, KL] kept on the device), with its per-step bookkeeping: the loop reads the rows once
    per epoch, outside the timed steps (a few microseconds)."""

    def __init__(self, _loss_of_batch, model):
        from vae_fast.training import NegativeElbo  # tqdm's importer: not where another torch runs --torch-only

        self.step = TrainStep(NegativeElbo(model), make_optimizer(model.parameters(), LR),
                              lambda objective, x: objective(x, 1.0))
        self.rows: list[torch.Tensor] = []

    def __call__(self, x):
        self.rows.append(self.step(x)[1])


def _timed_step(step, x) -> float:
    start = time.perf_counter()
    step(x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


@torch.no_grad()
def _held_out_loss(model, test_x: torch.Tensor, eps: torch.Tensor) -> float:
    """Mean negative ELBO per image, z = mu + std * eps with the given noise (the same for all models)."""
    mu, logvar = model.encode(test_x)
    recon = model.decode(mu + torch.exp(0.5 * logvar) * eps)
    return example_loss_function(recon.reshape(len(test_x), -1), test_x, mu, logvar).item() / len(test_x)


def _variants(device: torch.device) -> dict:
    """name -> (model, step). The first is the baseline every ratio is taken against."""
    example = ExampleVAE().to(device)
    variants = {"example VAE + example loss_function": (example, EagerStep)}
    drop_in, logits_path = vae_fast_model("mlp", example).to(device), vae_fast_model("mlp", example).to(device)
    variants["vae_fast.VAE + vae_fast.loss_function (drop-in)"] = (drop_in, EagerStep)
    variants["vae_fast.VAE.forward_logits + vae_loss(logits=True)"] = (logits_path, EagerStep)
    variants[TRAIN_COMMAND] = (vae_fast_model("mlp", example).to(device), TrainCommandStep)
    if device.type == "cuda":
        captured_example = ExampleVAE().to(device)
        captured_example.load_state_dict(example.state_dict())
        variants["example, whole step captured in a CUDA graph"] = (captured_example, _captured)
        variants["vae_fast drop-in, whole step captured in a CUDA graph"] = (vae_fast_model("mlp", example).to(device), _captured)
    loss_of_batch = {
        name: _step_logits(model) if "forward_logits" in name
        else _step_drop_in(model, example_loss_function if isinstance(model, ExampleVAE) else vae_fast.loss_function)
        for name, (model, _) in variants.items()
    }
    return {name: (model, step_class(loss_of_batch[name], model)) for name, (model, step_class) in variants.items()}


def run(epochs: int, data_dir: Path, seed: int = 0, *, device: str = "cpu", batch_size: int = BATCH_SIZE, chunk: int = 1,
        variants=_variants) -> dict:
    """`chunk` steps of one variant run back to back before the next variant's: 1 interleaves step
    by step; more lets each variant find its weights and Adam state in the cache, as in a training
    loop that runs alone (four variants' ~10 MB each do not fit a 32 MB L3 together).
    `variants(device)` gives name -> (model, step(x)). Before the timed epochs each variant takes,
    alone, a step on a full batch, one more, and one on the epoch's last, partial batch: compiling
    and capturing (for both shapes) happen there, timed apart ("warm-up"), and on a GPU the peak
    memory each variant allocates beyond what is resident before them."""
    device = torch.device(device)
    data = load_dataset("mnist", data_dir=data_dir, seed=seed, download_url=None)
    train_x, test_x = data.train_x.to(device), data.test_x.to(device)
    torch.manual_seed(seed)
    variants = variants(device)
    names = list(variants)
    warmup = [train_x[:batch_size], train_x[batch_size:2 * batch_size], train_x[: len(train_x) % batch_size or batch_size]]
    warmup_seconds, peak_bytes = {}, {}
    for name in names:
        warmup_seconds[name], peak_bytes[name] = _warm_up(variants[name][1], warmup, device)
    times = {name: [] for name in variants}
    losses = {name: [] for name in variants}
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed + epoch)).to(device)
        batches = [train_x[i] for i in order.split(batch_size)]
        for name in names:
            times[name].append(0.0)
        for index, start in enumerate(range(0, len(batches), chunk)):
            for name in names[index % len(names):] + names[: index % len(names)]:
                for x in batches[start:start + chunk]:
                    times[name][-1] += _timed_step(variants[name][1], x)
        eps = torch.randn(len(test_x), 20, generator=torch.Generator().manual_seed(seed + 2000 + epoch)).to(device)
        for name in names:
            losses[name].append(_held_out_loss(variants[name][0], test_x, eps))
        print(f"epoch {epoch + 1}: " + ", ".join(f"{times[n][-1]:.3f}s/{losses[n][-1]:.2f}" for n in names), flush=True)
    return {"times": times, "losses": losses, "epochs": epochs, "train": len(train_x), "test": len(test_x),
            "device": device, "batch_size": batch_size, "chunk": chunk, "warmup_seconds": warmup_seconds,
            "peak_bytes": peak_bytes, "torch": torch.__version__}


def _warm_up(step, batches: list[torch.Tensor], device: torch.device) -> tuple[float, int | None]:
    """Seconds of the steps on `batches` (compiling, capturing) and, on a GPU, the peak bytes they
    allocated beyond what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    seconds = sum(_timed_step(step, x) for x in batches)
    peak = torch.cuda.max_memory_allocated(device) - resident if device.type == "cuda" else None
    return seconds, peak


MATMULS = ("aten::mm", "aten::addmm")
ADAM_SCOPE, ADAM_KERNELS = "Optimizer.step#Adam.step", ("aten::_fused_adam_", "aten::_foreach_add_")


def profile(data_dir: Path, *, device: str = "cpu", batch_size: int = BATCH_SIZE, steps: int = 60, variants=None) -> str:
    """Where each variant's step goes: `steps` steps of each variant alone, after as many unprofiled
    ones, under torch.autograd.profiler's legacy profiler (Kineto's slowed every op ~30x on this
    machine), as shares of the profiled CPU time: the matrix multiplies (mm, addmm), Adam (the
    `Optimizer.step` scope, or the fused kernel called directly), and the rest (elementwise ops, the
    loss, autograd and Python). Shares only: the variants run one after the other here, so their
    times would not compare under a changing load. CPU only."""
    from torch.autograd import profiler

    data = load_dataset("mnist", data_dir=data_dir, seed=0, download_url=None)
    batches = data.train_x.split(batch_size)[: 2 * steps]
    torch.manual_seed(0)
    lines = ["| variant | matmuls | Adam | rest |", "|---|---:|---:|---:|"]
    for name, (_, step) in (variants or _variants)(torch.device(device)).items():
        for x in batches[:steps]:  # Adam's state created, allocator warmed up
            step(x)
        with profiler.profile(use_kineto=False) as prof:
            for x in batches[steps:]:
                step(x)
        events = {e.key: e for e in prof.key_averages()}
        total = sum(e.self_cpu_time_total for e in events.values())
        matmul = sum(events[k].self_cpu_time_total for k in MATMULS if k in events)
        adam = (events[ADAM_SCOPE].cpu_time_total if ADAM_SCOPE in events
                else sum(events[k].self_cpu_time_total for k in ADAM_KERNELS if k in events))
        lines.append(f"| {name} | {100 * matmul / total:.0f}% | {100 * adam / total:.0f}% "
                     f"| {100 * (total - matmul - adam) / total:.0f}% |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _machine(device: torch.device) -> str:
    cpu = f"{_cpu_name()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (host {cpu})"
    return cpu


def _interleaving(result: dict) -> str:
    return "one by one" if result["chunk"] == 1 else f"in runs of {result['chunk']} steps"


def report(result: dict) -> str:
    """One batch size's table: median and fastest epoch, held-out loss, each against the example."""
    names = list(result["times"])
    baseline = statistics.median(result["times"][names[0]])
    baseline_min = min(result["times"][names[0]])
    baseline_loss = result["losses"][names[0]][-1]
    interleaving = _interleaving(result)
    lines = [
        f"## Batch {result['batch_size']}",
        "",
        f"Data: MNIST test files, {result['train']} train / {result['test']} held out; batch {result['batch_size']}, "
        f"Adam lr {LR}; {result['epochs']} epochs, the variants' steps interleaved "
        f"{interleaving}; "
        "epoch time = sum of its steps.",
        "",
        "| variant | median epoch (s) | speedup | fastest epoch (s) | speedup | held-out loss after last epoch (nats/image) | vs example |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        median = statistics.median(result["times"][name])
        loss = result["losses"][name][-1]
        fastest = min(result["times"][name])
        lines.append(f"| {name} | {median:.4f} | {baseline / median:.2f}x | {fastest:.4f} | {baseline_min / fastest:.2f}x "
                     f"| {loss:.2f} | {100 * (loss / baseline_loss - 1):+.2f}% |")
    lines += ["", "Per-epoch times (s): " + "; ".join(f"{n}: " + ", ".join(f"{t:.4f}" for t in result["times"][n]) for n in names)]
    return "\n".join(lines) + "\n"


def report_train_step(kind: str, results: list[dict]) -> str:
    """One model and batch size of the TrainStep suite: every contender against the eager loop and
    the model+loss torch.compile of its own process (a process of another torch: its own rows)."""
    first = results[0]
    lines = [
        f"## {kind.upper()} VAE, batch {first['batch_size']}",
        "",
        f"Data: MNIST test files, {first['train']} train / {first['test']} held out; Adam lr {LR}; {first['epochs']} epochs "
        f"after the warm-up steps, the contenders' steps interleaved {_interleaving(first)} within a process; epoch "
        "time = sum of "
        "its steps; warm-up = the first three steps (two full batches and the last, partial one), where compiling and "
        "capturing happen.",
        "",
        "| contender | torch | median epoch (s) | vs eager | vs torch.compile | fastest epoch (s) | held-out loss (nats/image) "
        "| vs eager | warm-up (s) | peak memory (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        names = list(result["times"])
        eager = statistics.median(result["times"][names[0]])
        compiled = statistics.median(result["times"][names[1]])
        eager_loss = result["losses"][names[0]][-1]
        for name in names:
            median, loss = statistics.median(result["times"][name]), result["losses"][name][-1]
            peak = result["peak_bytes"][name]
            lines.append(f"| {name} | {result['torch']} | {median:.4f} | {eager / median:.2f}x | {compiled / median:.2f}x "
                         f"| {min(result['times'][name]):.4f} | {loss:.2f} | {100 * (loss / eager_loss - 1):+.2f}% "
                         f"| {result['warmup_seconds'][name]:.1f} | {'—' if peak is None else f'{peak / 2**20:.0f}'} |")
    for result in results:
        lines += ["", f"Per-epoch times (s), torch {result['torch']}: " + "; ".join(
            f"{n}: " + ", ".join(f"{t:.4f}" for t in times) for n, times in result["times"].items())]
    return "\n".join(lines) + "\n"


def _other_torch(python: str, kind: str, args, batch_size: int) -> dict:
    """The torch-only contenders run by another torch's Python (its own process, after this one's),
    on the same data, seeds and weights; vae_fast's Python code from this tree."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [python, __file__, "--suite", "train-step", "--torch-only", "--models", kind, "--batch-sizes",
                   str(batch_size), "--epochs", str(args.epochs), "--chunk", str(args.chunk), "--data-dir", str(args.data_dir),
                   "--json", str(out)]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
        return json.loads(out.read_text())


def _train_step_suite(args, device: torch.device) -> list[str]:
    sections = []
    for kind in args.models:
        for size in args.batch_sizes:
            variants = functools.partial(train_step_contenders, kind, torch_only=args.torch_only)
            result = run(args.epochs, args.data_dir, device=device, batch_size=size, chunk=args.chunk, variants=variants)
            if args.json:
                args.json.write_text(json.dumps({k: v for k, v in result.items() if k != "device"}))
                return []
            results = [result] + [_other_torch(python, kind, args, size) for python in args.other_torch]
            sections.append(report_train_step(kind, results))
            print(sections[-1], flush=True)  # a run stopped by a time limit keeps the tables done
    return sections


def header(device: torch.device, suite: str = "drop-in") -> str:
    kind = "GPU" if device.type == "cuda" else "CPU"
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    title = "Drop-in VAE training" if suite == "drop-in" else "The whole training step: vae_fast.TrainStep against torch.compile"
    return "\n".join([
        f"# {title}, {kind}, {datetime.date.today().isoformat()}",
        "",
        f"Machine: {_machine(device)}; torch {torch.__version__}; vae_fast {vae_fast.__version__}. "
        f"Load average (1/5/15 min) at the end: {load}; epochs much slower than the fastest ran under other "
        "processes' load, which the interleaving spreads over all variants.",
        "",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-sizes", type=positive_ints("--batch-sizes"), default=(BATCH_SIZE,), help="e.g. 128,1024")
    parser.add_argument("--chunk", type=int, default=1,
                        help="steps each variant runs back to back before the next one's (1: step by step)")
    parser.add_argument("--profile", action="store_true", help="also profile each variant's step (CPU): matmul, Adam, rest")
    parser.add_argument("--suite", choices=("drop-in", "train-step"), default="drop-in",
                        help="drop-in: the example against vae_fast.VAE + loss_function; train-step: vae_fast.TrainStep "
                             "against eager and torch.compile for the MLP and conv VAEs")
    parser.add_argument("--models", type=lambda v: v.split(","), default=["mlp", "conv"], help="train-step: mlp,conv")
    parser.add_argument("--other-torch", action="append", default=[], metavar="PYTHON",
                        help="train-step: also run the torch-only contenders under this Python (another torch), "
                             "each in its own process after this one's")
    parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # --other-torch's child writes its result here
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device here")
    if args.profile and device.type != "cpu":
        parser.error("--profile profiles the CPU step; on a GPU use benchmarks/cuda_profile.py")
    if args.suite == "train-step":
        sections = _train_step_suite(args, device)
        if args.json:
            return
        if args.profile:
            variants = functools.partial(train_step_contenders, "mlp")
            sections += [f"## Where a step goes, MLP VAE, batch {size}\n\n{profile(args.data_dir, batch_size=size, variants=variants)}"
                         for size in args.batch_sizes]
    else:
        sections = [report(run(args.epochs, args.data_dir, device=device, batch_size=size, chunk=args.chunk))
                    for size in args.batch_sizes]
        if args.profile:
            sections += [f"## Where a step goes, batch {size}\n\n{profile(args.data_dir, batch_size=size)}" for size in args.batch_sizes]
    table = header(device, args.suite) + "\n".join(sections)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.chunk == 1 else f"-chunk{args.chunk}"
    stem = "vae_training" if args.suite == "drop-in" else "train_step"
    path = args.out / f"{stem}-{device.type}-{datetime.date.today().isoformat()}{suffix}.md"
    path.write_text(table)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
