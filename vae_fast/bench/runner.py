"""Running `vae-fast bench`: the plan of sizes and repetitions, the measurement of every case of one
device into a report dict, and the command's entry point (results on stdout and in files)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

import vae_fast

from . import timing
from .baseline_process import SETTLE_S, WARMUP_AFTER_SETTLE_S, BaselineProcess, BaselineProcessError, RemoteRun
from .cases import IMPLEMENTATIONS, MODES, Case, Unavailable, dtype_name, op_case
from .training import training_step_case

OP_PASSES = (
    ("reparameterize", "fwd"),
    ("reparameterize", "fwd+bwd"),
    ("loss_probs", "fwd"),
    ("loss_probs", "fwd+bwd"),
    ("loss_logits", "fwd"),
    ("loss_logits", "fwd+bwd"),
    ("loss_gaussian", "fwd"),
    ("loss_gaussian", "fwd+bwd"),
    ("loss_laplace", "fwd+bwd"),
)
DEFAULT_OUT = "benchmarks/results"
SCHEMA_VERSION = 1
WARMUP_CALLS = 3
HALF_AND_FULL = (torch.float32, torch.bfloat16, torch.float16)  # GPU dtypes; CPU runs float32 only


@dataclass
class Plan:
    """Which cases to run and how long to spend on each."""

    batches: tuple[int, ...]
    latents: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    op_passes: tuple[tuple[str, str], ...] = OP_PASSES
    modes: tuple[str, ...] = MODES  # each case in each of these (a training step is "cold" only)
    training_batches: tuple[int, ...] = ()
    training_logits: tuple[bool, ...] = (False, True)  # the drop-in path, then the logits path
    min_sample_s: float = 0.005
    budget_s: float = 4.0  # per case, all implementations together; min_rounds wins when larger
    min_rounds: int = 7
    max_rounds: int = 25
    compile: bool = True  # False leaves torch.compile out (tests: it costs seconds per case)
    copy_buffer_bytes: int = timing.COPY_BUFFER_BYTES
    quick: bool = False
    label: str = "full"

    @classmethod
    def full_run(cls, device: torch.device) -> Plan:
        cuda = device.type == "cuda"
        return cls(
            batches=(128, 1024, 4096, 65536),
            latents=(20, 64),
            dtypes=HALF_AND_FULL if cuda else (torch.float32,),
            # A training step at B=65536 takes seconds on a CPU and says nothing the others don't.
            training_batches=(128, 1024, 4096, 65536) if cuda else (128, 1024, 4096),
            budget_s=2.0 if cuda else 4.0,
        )

    @classmethod
    def quick_run(cls, device: torch.device) -> Plan:
        """Under a minute on a 2-core CPU, most of it torch.compile: the foundation targets' size only."""
        return cls(
            batches=(4096,),
            latents=(20,),
            dtypes=HALF_AND_FULL if device.type == "cuda" else (torch.float32,),
            training_batches=(128,),
            min_sample_s=0.002,
            budget_s=0.5,
            min_rounds=5,
            max_rounds=9,
            quick=True,
            label="quick",
        )

    def selected(self, *, batches=None, latents=None, dtypes=None, training_batches=None, modes=None,
                 op_passes=None) -> Plan:
        """This plan restricted to the given sizes, modes and (op, pass) pairs (None keeps the plan's
        own): a run that checks a few targets in minutes instead of the whole grid. Labelled
        "selected", so its files never overwrite a full run's."""
        chosen = {key: tuple(value) for key, value in dict(
            batches=batches, latents=latents, dtypes=dtypes, training_batches=training_batches, modes=modes,
            op_passes=op_passes).items() if value is not None}
        if not chosen:
            return self
        return replace(self, **chosen, label="selected")

    def describe(self) -> dict:
        described = asdict(self)
        described["dtypes"] = [dtype_name(d) for d in self.dtypes]
        return described


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_revision() -> str | None:
    """`git describe --always --dirty` of the checkout the package runs from, when it is one."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(vae_fast.__file__).parent,
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if described.returncode != 0:
        return None
    return described.stdout.strip() or None


def load_average() -> float | None:
    """1-minute load average: other processes on the cores make parallel CPU kernels straggle, so a
    report says how busy its machine was."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_description(device: torch.device) -> dict:
    described = {
        "cpu": cpu_model_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


def _summarize(case: Case, mode: str, samples: dict[str, list[float]], copy_bytes_per_s: float) -> dict:
    impls = {}
    for name, seconds in samples.items():
        median = statistics.median(seconds)
        entry = {"median_s": median, "min_s": min(seconds), "max_s": max(seconds), "samples": len(seconds)}
        if case.ideal_bytes is not None:
            entry["gb_per_s"] = case.ideal_bytes / median / 1e9
            entry["copy_fraction"] = case.ideal_bytes / median / copy_bytes_per_s
        impls[name] = entry
    fused = impls["fused"]["median_s"]
    return {
        "op": case.op,
        "pass": case.pass_,
        "batch": case.batch,
        "latent": case.latent,
        "dtype": dtype_name(case.dtype),
        "mode": mode,
        "ideal_bytes": case.ideal_bytes,
        "speedup_vs_eager": impls["eager"]["median_s"] / fused,
        "speedup_vs_compiled": impls["compiled"]["median_s"] / fused if "compiled" in impls else None,
        "impls": impls,
    }


def _cases(plan: Plan, device: torch.device, rotation_bytes: int):
    """(description, builder) pairs, built lazily so only one case's inputs live at a time."""
    for dtype in plan.dtypes:
        for op, pass_ in plan.op_passes:
            for latent in plan.latents:
                for batch in plan.batches:
                    yield (
                        f"{op} {pass_} B={batch} L={latent} {dtype_name(dtype)}",
                        lambda op=op, pass_=pass_, batch=batch, latent=latent, dtype=dtype: op_case(
                            op, pass_, batch, latent, dtype=dtype, device=device, rotation_bytes=rotation_bytes
                        ),
                    )
    for logits in plan.training_logits:
        for batch in plan.training_batches:
            yield (
                f"train_step{'_logits' if logits else ''} B={batch}",
                lambda batch=batch, logits=logits: training_step_case(
                    batch, logits=logits, device=device, rotation_bytes=rotation_bytes
                ),
            )


def _use_baseline_process(case: Case, baseline: BaselineProcess) -> float | None:
    """Replaces the case's eager and compiled runs, in every mode, by the baseline process's (built
    there from the same seeded inputs); returns that process's compile time."""
    built = baseline.build(case.op, case.pass_, case.batch, case.latent, dtype_name(case.dtype), case.rotation_bytes,
                           torch.get_num_threads(), case.checksum)
    for mode, runs in case.modes.items():
        for name in ("eager", "compiled"):
            if name in runs:
                runs[name] = RemoteRun(baseline, name, mode)
    return built["compile_s"] if "compiled" in case.modes["cold"] else None


def prepare_case(case: Case, baseline: BaselineProcess | None = None) -> float | None:
    """Hands the op cases' eager and compiled runs to the baseline process when there is one
    (training steps stay in this process); returns torch.compile's first call in seconds, timed
    apart from everything else (None without a compiled run)."""
    if baseline is not None and not case.op.startswith("train_step"):
        return _use_baseline_process(case, baseline)
    compiled_run = case.modes["cold"].get("compiled")
    return None if compiled_run is None else timing.first_call_seconds(compiled_run, case.device)


def measure_case(case: Case, mode: str, plan: Plan, remote: bool = False) -> tuple[dict[str, list[float]], dict]:
    """Warm every implementation of one mode up, then interleave. `remote`: the eager and compiled
    runs are in the baseline process (prepare_case), whose turns are separated by a settle pause."""
    clock = timing.clock_for(case.device)
    runs = case.modes[mode]
    # The inputs were written when created, so their pages are resident already; a few calls fill
    # the allocator's caches and finish any lazy initialization (autotuning, thread pools).
    for run in runs.values():
        for _ in range(WARMUP_CALLS):
            run()
    # A recompile inside the timed rounds would be timed as if it were a call; refuse it instead.
    with torch._dynamo.config.patch(error_on_recompile=True):
        repetitions = timing.choose_repetitions(
            runs,
            clock,
            min_sample_s=plan.min_sample_s,
            budget_s=plan.budget_s,
            min_rounds=plan.min_rounds,
            max_rounds=plan.max_rounds,
        )
        samples = timing.interleaved_samples(runs, clock, repetitions, settle_s=SETTLE_S if remote else 0.0,
                                             warmup_s=WARMUP_AFTER_SETTLE_S)
    return samples, {
        "calls_per_sample": repetitions.calls_per_sample,
        "rounds": repetitions.rounds,
        "input_sets": 1 if mode == "warm" else case.input_sets,
    }


def _measure_modes(case: Case, plan: Plan, baseline: BaselineProcess | None, copy_bytes_per_s: float) -> list[dict]:
    """One report row per mode of the plan that the case has."""
    compile_s = prepare_case(case, baseline)
    remote = baseline is not None and not case.op.startswith("train_step")
    others = timing.OthersCpuShare([os.getpid()] + ([baseline.pid] if remote else []))
    rows = []
    for mode in (m for m in plan.modes if m in case.modes):
        others.start()
        samples, details = measure_case(case, mode, plan, remote)
        rows.append({
            **_summarize(case, mode, samples, copy_bytes_per_s),
            **details,
            "baseline_torch": baseline.torch_version if remote else torch.__version__,
            "compile_s": compile_s,
            "load_average": load_average(),
            "others_cpu_share": others.share(),
        })
    return rows


def measure(device: str | torch.device, plan: Plan, *, log=sys.stderr, on_case_done=None,
            baseline: BaselineProcess | None = None) -> dict:
    """Every case of the plan on one device, plus the device's copy bandwidth: the report dict that
    `report.py` turns into Markdown and JSON. A case that raises is recorded under "failed" and the
    run goes on; `on_case_done(report_so_far)` is called after each case. `baseline`: time the op
    cases' eager and compiled baselines in that process (another torch build) instead."""
    device = torch.device(device)
    torch.manual_seed(0)
    started = time.perf_counter()
    copy_bytes_per_s = timing.copy_bandwidth(device, plan.copy_buffer_bytes)
    rotation_bytes = 4 * timing.last_level_cache_bytes(device)
    print(f"[bench] {device}: copy bandwidth {copy_bytes_per_s / 1e9:.1f} GB/s", file=log, flush=True)
    report = {
        "schema": SCHEMA_VERSION,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "machine": machine_description(device),
        "versions": {
            "vae_fast": vae_fast.__version__,
            "git": source_revision(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "baseline_torch": baseline.torch_version if baseline else torch.__version__,
            "baseline_python": baseline.python if baseline else None,  # None: in this process
        },
        "backend": vae_fast.backend_info()["devices"][device.type],
        "plan": plan.describe(),
        "implementations": [name for name in IMPLEMENTATIONS if plan.compile or name != "compiled"],
        "modes": list(plan.modes),
        "copy_bandwidth_gb_per_s": copy_bytes_per_s / 1e9,
        "rotation_bytes": rotation_bytes,
        "rows": [],
        "skipped": [],
        "failed": [],
        "wall_s": 0.0,
    }
    cases = list(_cases(plan, device, rotation_bytes))
    for index, (description, build) in enumerate(cases, 1):
        case_started = time.perf_counter()
        progress = f"[bench] {index}/{len(cases)} {description}:"
        try:
            case = build()
            if not plan.compile:
                for runs in case.modes.values():
                    del runs["compiled"]
            rows = _measure_modes(case, plan, baseline, copy_bytes_per_s)
            del case  # frees this case's input sets before the next case allocates its own
        except Unavailable as why:
            report["skipped"].append({"case": description, "reason": str(why)})
            print(f"{progress} skipped, {why}", file=log, flush=True)
        except Exception as error:  # noqa: BLE001  (one broken case must not cost the whole run)
            report["failed"].append({"case": description, "error": f"{type(error).__name__}: {error}"})
            print(f"{progress} FAILED", file=log, flush=True)
            traceback.print_exc(file=log)
        else:
            report["rows"] += rows
            speedups = "; ".join(
                f"{row['mode']} x{row['speedup_vs_eager']:.2f} vs eager"
                + ("" if row["speedup_vs_compiled"] is None else f", x{row['speedup_vs_compiled']:.2f} vs compiled")
                for row in rows
            )
            print(f"{progress} fused {speedups} ({time.perf_counter() - case_started:.1f} s)", file=log, flush=True)
        report["wall_s"] = time.perf_counter() - started
        if on_case_done is not None:
            on_case_done(report)
    return report


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def run_bench(
    device: str | None = None,
    *,
    quick: bool = False,
    out_dir: str | os.PathLike = DEFAULT_OUT,
    threads: int | None = None,
    selection: dict | None = None,
    baseline_python: str | None = None,
) -> int:
    """`vae-fast bench`: for each device, the Markdown table on stdout and the .md/.json/.png files
    in out_dir. `threads` sets torch's CPU threads (default: torch's choice); on a shared machine
    fewer threads than cores keeps parallel regions from stalling behind other processes.
    `selection` (keys batches, latents, dtypes, training_batches) restricts the plan to those sizes.
    `baseline_python`: another environment's interpreter that times the eager and compiled
    baselines of the op cases (CPU only; see baseline_process).
    Returns the process exit status: 1 when a case failed, 2 for an unusable device, thread count or
    baseline interpreter."""
    if device == "cuda" and not torch.cuda.is_available():
        print("vae-fast bench: --device cuda, but torch sees no CUDA device here", file=sys.stderr)
        return 2
    if threads is not None:
        if threads < 1:
            print(f"vae-fast bench: --threads must be at least 1, got {threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(threads)
    devices = [device] if device else default_devices()
    if baseline_python is not None and devices != ["cpu"]:
        print("vae-fast bench: --baseline-python times CPU cases only; add --device cpu", file=sys.stderr)
        return 2
    baseline = None
    if baseline_python is not None:
        try:
            baseline = BaselineProcess(baseline_python)
        except BaselineProcessError as error:
            print(f"vae-fast bench: {error}", file=sys.stderr)
            return 2
        print(f"[bench] baselines in {baseline.python}: torch {baseline.torch_version}", file=sys.stderr)
    try:
        return _run_devices(devices, quick, Path(out_dir), selection, baseline)
    finally:
        if baseline is not None:
            baseline.close()


def _run_devices(devices: list[str], quick: bool, out_dir: Path, selection: dict | None,
                 baseline: BaselineProcess | None) -> int:
    from .plot import write_plot
    from .report import result_stem, to_markdown, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for name in devices:
        plan = Plan.quick_run(torch.device(name)) if quick else Plan.full_run(torch.device(name))
        plan = plan.selected(**(selection or {}))

        def write_tables(report):
            # After every case, so a run cut short (a time limit, a crash) still leaves its rows.
            stem = out_dir / result_stem(report)
            stem.with_suffix(".md").write_text(to_markdown(report, plot_name=stem.with_suffix(".png").name))
            write_json(report, stem.with_suffix(".json"))

        report = measure(name, plan, on_case_done=write_tables, baseline=baseline)
        stem = out_dir / result_stem(report)
        write_plot(report, stem.with_suffix(".png"))
        print(to_markdown(report, plot_name=stem.with_suffix(".png").name), flush=True)
        print(f"[bench] wrote {stem}.md, .json and .png", file=sys.stderr)
        failures += len(report["failed"])
    return 1 if failures else 0
