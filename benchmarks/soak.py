"""Leak soak (issue 9): many forward+backward calls of each op, and a multi-epoch training run, with
the process's resident memory (and, on a GPU, torch's CUDA memory) read after a warm-up and then at
checkpoints. Memory must stay flat: under 1 MB of growth from the end of the warm-up to the end.

    python benchmarks/soak.py                      # 100,000 calls per case, 20 epochs, CPU
    python benchmarks/soak.py --device cuda --out benchmarks/results/soak-cuda-<date>.md
    python benchmarks/soak.py --calls 20000 --epochs 5

Cases (small shapes, so that a case takes seconds to a minute on a 2-core CPU; a leak is per call,
not per byte of data): reparameterize [64, 20] with torch's global generator and with an explicit
torch.Generator; vae_loss [64, 784] / [64, 20] on probabilities (reduction "sum", grad_output 1) and
on logits (reduction "none", a non-unit grad_output, so the gradient scaling runs); and vae_loss
refusing a probability outside [0, 1] (the error path, forward only: an exception every call). Every
fwd+bwd call takes the input gradients with torch.autograd.grad (nothing accumulates in .grad).
Training: `vae_fast.training.train` (the `vae-fast train` loop: Adam, held-out evaluation and a
checkpoint every epoch) on a subset of MNIST, with the resident memory read at the end of each epoch.

Resident memory is read from /proc/self/statm (Linux), else psutil, else the peak resident size from
getrusage (which can only grow: then a flat result still means something, a growth may be a peak).
Python's garbage collector runs before each reading. Growth = reading at the end - reading after the
warm-up; "max growth" is the largest growth at any checkpoint. Exit status 1 when a growth (the end
reading, for resident memory and CUDA allocated/reserved memory) reaches 1 MB.

The allocator: glibc's malloc serves blocks above its mmap threshold with mmap (unmapped, so gone
from RSS, when freed), but raises that threshold to the size of each such block freed, after which
blocks of that size come from the heap, whose resident high-water mark then steps up now and then
as it fragments (~1-4 MB steps in the first tens of training epochs here, then flat): growth that
is no leak. `--mmap-threshold BYTES` fixes the threshold (mallopt(M_MMAP_THRESHOLD), as the
MALLOC_MMAP_THRESHOLD_ environment variable does), so that RSS follows the live large blocks; the
report says which allocator setting it ran with. A leak shows under both.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import vae_fast
from vae_fast import training
from vae_fast.data import DataError, Dataset, load_dataset

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20
LIMIT_MB = 1.0
DEFAULT_CALLS, DEFAULT_WARMUP, DEFAULT_EPOCHS, DEFAULT_WARMUP_EPOCHS = 100_000, 2_000, 20, 2
B, D, L = 64, 784, 20


# ---- memory readings ----

def _statm_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _psutil_rss() -> int:
    import psutil  # optional

    return psutil.Process().memory_info().rss


def _maxrss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def rss_source() -> tuple[str, Callable[[], int]]:
    """(name, reader) of the first resident-memory reading that works here."""
    for name, reader in (("/proc/self/statm", _statm_rss), ("psutil", _psutil_rss), ("getrusage peak", _maxrss)):
        try:
            reader()
        except Exception:  # noqa: BLE001  (missing file, missing module, ...: try the next one)
            continue
        return name, reader
    raise RuntimeError("no way to read the resident memory of this process")


class Meter:
    """Memory readings of this process: resident (bytes) and, on CUDA, torch's allocated/reserved."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source, self._rss = rss_source()
        # The object count builds a list of every object (~1.5 MB here), which stays resident once
        # freed: a first reading whose RSS came before any such list would show a 1.5 MB step that
        # is the meter's own. So one reading is taken and dropped, and the RSS is read last.
        self.read()

    def read(self) -> dict:
        gc.collect()
        reading = {"gc_objects": len(gc.get_objects())}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            reading["cuda_allocated"] = torch.cuda.memory_allocated(self.device)
            reading["cuda_reserved"] = torch.cuda.memory_reserved(self.device)
        reading["rss"] = self._rss()
        return reading


def set_mmap_threshold(size: int) -> None:
    """glibc mallopt(M_MMAP_THRESHOLD, size): blocks of `size` bytes or more are mmapped and returned
    to the system when freed, and the threshold no longer moves. Raises where that is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as error:
        raise RuntimeError(f"--mmap-threshold needs glibc: {error}") from None
    m_mmap_threshold = -3
    if libc.mallopt(m_mmap_threshold, int(size)) != 1:
        raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {size}) failed (the maximum is 32 MiB on 64-bit)")
    os.environ["VAE_FAST_SOAK_MMAP_THRESHOLD"] = str(int(size))  # for the report


def allocator_description() -> str:
    fixed = os.environ.get("VAE_FAST_SOAK_MMAP_THRESHOLD") or os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if fixed:
        return f"malloc with a fixed mmap threshold of {int(fixed):,} bytes (blocks that large are unmapped when freed)"
    return "malloc with its default, dynamic mmap threshold"


# ---- the op cases ----

def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def make_cases(device: torch.device) -> dict[str, Callable[[], None]]:
    """name -> one call (fwd+bwd unless the name says otherwise), on fixed inputs of small shapes."""
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    mu, logvar = _leaf(randn(B, L)), _leaf(0.5 * randn(B, L))
    grad_z = randn(B, L)
    probs = _leaf(torch.sigmoid(randn(B, D)))
    logits = _leaf(randn(B, D))
    x = torch.rand(B, D, generator=g, device=device).round()
    row_weights = torch.rand(B, generator=g, device=device) + 0.5
    bad = probs.detach().clone()
    bad[0, 0] = 1.5
    noise_generator = torch.Generator(device=device).manual_seed(1)

    def reparameterize_global():
        z = vae_fast.reparameterize(mu, logvar)
        torch.autograd.grad(z, (mu, logvar), grad_z)

    def reparameterize_generator():
        z = vae_fast.reparameterize(mu, logvar, generator=noise_generator)
        torch.autograd.grad(z, (mu, logvar), grad_z)

    def loss_probs():
        loss = vae_fast.vae_loss(probs, x, mu, logvar)
        torch.autograd.grad(loss, (probs, mu, logvar))

    def loss_logits_none():
        loss = vae_fast.vae_loss(logits, x, mu, logvar, logits=True, beta=0.5, reduction="none")
        torch.autograd.grad(loss, (logits, mu, logvar), row_weights)

    def loss_domain_error():
        try:
            vae_fast.vae_loss(bad, x, mu, logvar)
        except ValueError:
            return
        raise AssertionError("vae_loss accepted a probability of 1.5")

    cases = {
        "reparameterize (global generator)": reparameterize_global,
        "reparameterize (torch.Generator)": reparameterize_generator,
        "vae_loss probs, sum": loss_probs,
        "vae_loss logits, none, grad_output != 1": loss_logits_none,
    }
    if device.type == "cpu":  # the CPU refuses out-of-domain input; CUDA gives NaN instead (no sync)
        cases["vae_loss domain error (fwd only)"] = loss_domain_error
    return cases


def _checkpoint_calls(calls: int, checkpoints: int) -> list[int]:
    """Call counts (after the warm-up) at which memory is read: every 1/checkpoints of the calls."""
    return sorted({max(1, round(calls * k / checkpoints)) for k in range(1, checkpoints + 1)})


def _growth(readings: list[dict], key: str) -> tuple[float, float]:
    """(growth at the end, largest growth at any reading) in MB, against the first reading."""
    base = readings[0][key]
    return (readings[-1][key] - base) / MB, max(r[key] - base for r in readings) / MB


def soak_case(name: str, call: Callable[[], None], meter: Meter, calls: int, warmup: int,
              checkpoints: int = 10, log: Callable[[str], None] | None = None) -> dict:
    """Runs `warmup` calls, reads memory, then `calls` calls with a reading every 1/checkpoints."""
    for _ in range(warmup):
        call()
    readings = [{"calls": 0, **meter.read()}]
    done = 0
    started = time.perf_counter()
    for target in _checkpoint_calls(calls, checkpoints):
        for _ in range(target - done):
            call()
        done = target
        readings.append({"calls": done, **meter.read()})
        if log:
            log(f"  {name}: {done:>7} calls, RSS {readings[-1]['rss'] / MB:8.2f} MB "
                f"({(readings[-1]['rss'] - readings[0]['rss']) / MB:+.3f})")
    return _summarize(name, "calls", readings, calls, time.perf_counter() - started)


def _summarize(name: str, unit: str, readings: list[dict], count: int, seconds: float) -> dict:
    row = {"case": name, "unit": unit, "count": count, "seconds": seconds, "readings": readings}
    for key in ("rss", "cuda_allocated", "cuda_reserved"):
        if key in readings[0]:
            row[f"{key}_start_mb"] = readings[0][key] / MB
            row[f"{key}_growth_mb"], row[f"{key}_max_growth_mb"] = _growth(readings, key)
    row["gc_objects_growth"] = readings[-1]["gc_objects"] - readings[0]["gc_objects"]
    row["bytes_per_unit"] = row["rss_growth_mb"] * MB / max(count, 1)
    row["passed"] = all(row[k] < LIMIT_MB for k in row if k.endswith("_growth_mb") and "max" not in k)
    return row


# ---- training ----

def training_dataset(data_dir: str | None, train_size: int, test_size: int) -> tuple[Dataset, str]:
    """A subset of MNIST's test files (8,000 / 2,000 split) when they are there, else of scikit-learn's
    8x8 digits (offline); (dataset, description)."""
    data = None
    if data_dir:
        with contextlib.suppress(DataError):
            data = load_dataset("mnist", data_dir=data_dir, seed=0, download_url=None)
    if data is None:
        data = load_dataset("digits", seed=0)
    subset = Dataset(data.name, data.train_x[:train_size].clone(), None, data.test_x[:test_size].clone(), None,
                     data.image_shape)
    return subset, f"{data.name}, {len(subset.train_x)} train / {len(subset.test_x)} held out, {data.input_dim} features"


def soak_training(meter: Meter, epochs: int, warmup_epochs: int, dataset: Dataset, description: str,
                  batch_size: int = 128, log: Callable[[str], None] | None = None) -> dict:
    """`epochs` epochs of vae_fast.training.train, memory read at the end of each epoch (in the hook
    train() calls once per epoch, after the checkpoint: its metrics writer). Growth is counted from
    the end of epoch `warmup_epochs` (the first epochs allocate Adam's state and the like)."""
    if not 0 < warmup_epochs < epochs:
        raise ValueError(f"the training soak needs 0 < warm-up epochs ({warmup_epochs}) < epochs ({epochs})")
    writer = getattr(training, "_write_metrics", None)
    if writer is None:
        raise RuntimeError("vae_fast.training has no _write_metrics (the per-epoch hook this soak uses)")
    readings: list[dict] = []

    def hook(out_dir, history):
        writer(out_dir, history)
        readings.append({"calls": len(history), **meter.read()})
        if log:
            log(f"  training: epoch {len(history):>3}, RSS {readings[-1]['rss'] / MB:8.2f} MB")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        config = training.TrainConfig(dataset=dataset.name, epochs=epochs, batch_size=batch_size,
                                      device=str(meter.device), out=out, progress=False, images=False)
        training._write_metrics = hook
        try:
            training.train(config, dataset=dataset)
        finally:
            training._write_metrics = writer
    if len(readings) != epochs:
        raise RuntimeError(f"the per-epoch hook ran {len(readings)} times in {epochs} epochs")
    row = _summarize(f"training ({description}, batch {batch_size})", "epochs", readings[warmup_epochs - 1:],
                     epochs - warmup_epochs, time.perf_counter() - started)
    row["all_readings"] = readings
    return row


# ---- report ----

def _git_revision() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "vae_fast": vae_fast.__version__,
        "revision": _git_revision(), "device": str(device), "allocator": allocator_description(),
    }
    backend = vae_fast.backend_info()
    info["implementation"] = backend["devices"]["cuda" if device.type == "cuda" else "cpu"]["implementation"]
    info["cpu_isa"] = backend["extension"]["cpu_isa"]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        info["load_average"] = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return info


COLUMNS = ["case", "count", "warm-up", "RSS after warm-up (MB)", "RSS growth (MB)", "max growth (MB)",
           "bytes per call", "gc objects +", "seconds", "result"]
CUDA_COLUMNS = ["CUDA allocated growth (MB)", "CUDA reserved growth (MB)"]


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    cuda = report["machine"]["device"].startswith("cuda")
    for row in report["rows"]:
        warmup = f"{report['warmup']} calls" if row["unit"] == "calls" else f"{report['warmup_epochs']} epochs"
        cells = [row["case"], f"{row['count']:,} {row['unit']}", warmup, f"{row['rss_start_mb']:.2f}",
                 f"{row['rss_growth_mb']:+.3f}", f"{row['rss_max_growth_mb']:+.3f}",
                 f"{row['bytes_per_unit']:+.2f}" if row["unit"] == "calls" else "—",
                 f"{row['gc_objects_growth']:+d}", f"{row['seconds']:.1f}"]
        if cuda:
            cells += [f"{row['cuda_allocated_growth_mb']:+.3f}", f"{row['cuda_reserved_growth_mb']:+.3f}"]
        cells.append("pass" if row["passed"] else "**FAIL**")
        rows.append(cells)
    return rows


def to_markdown(report: dict) -> str:
    m = report["machine"]
    cuda = m["device"].startswith("cuda")
    columns = COLUMNS[:-1] + (CUDA_COLUMNS if cuda else []) + COLUMNS[-1:]
    where = f"{m['gpu']} (GPU), " if cuda else ""
    lines = [
        f"# Leak soak, {m['device']}, {m['date'][:10]}",
        "",
        f"Machine: {where}{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; Python {m['python']}, "
        f"torch {m['torch']}, vae_fast {m['vae_fast']} ({m['implementation']}, CPU kernels {m['cpu_isa']}), "
        f"revision {m['revision']}; {m['date']}"
        + (f"; load average (1/5/15 min) at the end {m['load_average']}" if "load_average" in m else "") + ".",
        "",
        f"Command: `{report['command']}`. Allocator: {m['allocator']}. Resident memory from {report['rss_source']}, read after "
        f"`gc.collect()`; growth = last reading - reading after the warm-up, max growth = the largest at any of "
        f"the {report['checkpoints']} checkpoints; limit {LIMIT_MB:g} MB. Shapes: reparameterize [{B}, {L}], "
        f"vae_loss recon/x [{B}, {D}], mu/logvar [{B}, {L}]; float32; every call fwd+bwd "
        f"(`torch.autograd.grad`) unless it says fwd only.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    lines += ["", f"**{'PASS' if report['passed'] else 'FAIL'}**: " + (
        f"every case grew less than {LIMIT_MB:g} MB after its warm-up." if report["passed"]
        else "some case grew by 1 MB or more after its warm-up (see the table).")]
    for row in report["rows"]:
        readings = row.get("all_readings", row["readings"])
        unit = "epoch" if row["unit"] == "epochs" else "calls"
        series = ", ".join(f"{r['calls']}: {r['rss'] / MB:.2f}" for r in readings)
        lines += ["", f"RSS (MB) by {unit}, {row['case']}: {series}"]
    return "\n".join(lines) + "\n"


def run(calls: int, warmup: int, epochs: int, warmup_epochs: int, device: str = "cpu", checkpoints: int = 10,
        data_dir: str | None = None, train_size: int = 2048, test_size: int = 512, cases: list[str] | None = None,
        log: Callable[[str], None] | None = print, command: str = "benchmarks.soak.run(...)") -> dict:
    """The whole soak; returns the report (rows, machine, pass/fail). epochs=0 skips training."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    meter = Meter(dev)
    rows = []
    for name, call in make_cases(dev).items():
        if cases is None or any(c in name for c in cases):
            rows.append(soak_case(name, call, meter, calls, warmup, checkpoints, log))
    if epochs:
        dataset, description = training_dataset(data_dir, train_size, test_size)
        rows.append(soak_training(meter, epochs, warmup_epochs, dataset, description, log=log))
    return {
        "rows": rows, "machine": machine_info(dev), "rss_source": meter.source, "warmup": warmup,
        "warmup_epochs": warmup_epochs, "checkpoints": checkpoints, "passed": all(r["passed"] for r in rows),
        "command": command,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS, help="fwd+bwd calls per case after the warm-up")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="calls before the first reading")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (0: no training soak)")
    parser.add_argument("--warmup-epochs", type=int, default=DEFAULT_WARMUP_EPOCHS,
                        help="epochs before the training soak's first reading")
    parser.add_argument("--checkpoints", type=int, default=10, help="readings per case after the warm-up")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"),
                        help="MNIST IDX files for the training soak (scikit-learn's digits when absent)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cases", nargs="*", default=None, help="only the op cases whose name contains one of these")
    parser.add_argument("--out", default=None, help="Markdown report path, e.g. benchmarks/results/soak-cpu-<date>.md")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="fix glibc malloc's mmap threshold (e.g. 131072): no heap high-water steps in RSS")
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)])
    for name in ("calls", "checkpoints"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    if args.warmup < 0 or args.epochs < 0:
        parser.error("--warmup and --epochs must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mmap_threshold is not None:
        set_mmap_threshold(args.mmap_threshold)

    report = run(args.calls, args.warmup, args.epochs, args.warmup_epochs, args.device, args.checkpoints,
                 args.data_dir, cases=args.cases, command=command)
    markdown = to_markdown(report)
    print()
    print(markdown)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown)
        print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
