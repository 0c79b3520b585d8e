"""A measured report (see runner.measure) as Markdown and JSON, with the foundation targets checked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

COLUMNS = (
    "op",
    "pass",
    "B",
    "L",
    "dtype",
    "mode",
    "fused ms",
    "eager ms",
    "compiled ms",
    "vs eager",
    "vs compiled",
    "fused GB/s",
    "% of copy",
    "compile s",
)


@dataclass(frozen=True)
class Target:
    """What the fused path must reach on the CPU, in every mode measured: a speedup over a baseline
    ("eager" or "compiled"), or with baseline "copy" a fraction of the copy bandwidth."""

    op: str
    pass_: str
    baseline: str  # "eager", "compiled" or "copy"
    minimum: float
    batch: int = 4096
    latent: int = 20
    dtype: str = "float32"

    @property
    def description(self) -> str:
        size = f"{self.op} {self.pass_} B={self.batch} L={self.latent} {self.dtype}"
        if self.baseline == "copy":
            return f"{size}: fused >= {100 * self.minimum:g}% of the copy bandwidth"
        return f"{size}: fused vs {self.baseline} >= {self.minimum:g}x"

    def measured(self, row: dict) -> float | None:
        if self.baseline == "copy":
            return row["impls"]["fused"].get("copy_fraction")
        return row["speedup_vs_eager" if self.baseline == "eager" else "speedup_vs_compiled"]


CPU_TARGETS = (
    Target("loss_probs", "fwd+bwd", "eager", 5.0),
    Target("reparameterize", "fwd+bwd", "eager", 1.0),
    # issue 10: Gaussian with a learned shared scale
    Target("loss_gaussian", "fwd+bwd", "eager", 4.0),
    # issue 21: against the fastest CPU compiler (torch 2.13's CPU build, --baseline-python)
    *(Target(op, "fwd+bwd", "compiled", 2.0, batch=batch) for op in ("loss_probs", "loss_logits") for batch in (4096, 65536)),
    *(Target(op, "fwd+bwd", "compiled", minimum, batch=batch) for op in ("loss_gaussian", "loss_laplace")
      for batch, minimum in ((4096, 2.0), (65536, 1.0))),
    Target("reparameterize", "fwd+bwd", "copy", 0.4, batch=65536, latent=64),
)


def result_stem(report: dict) -> str:
    """`<device>-<date>`, with `-quick` or `-selected` for partial runs so they never overwrite a full one."""
    stem = f"{report['device']}-{report['date'][:10]}"
    label = report["plan"].get("label", "quick" if report["plan"]["quick"] else "full")
    return stem if label == "full" else f"{stem}-{label}"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def table_row(row: dict) -> list[str]:
    impls = row["impls"]
    fused = impls["fused"]
    return [
        row["op"],
        row["pass"],
        str(row["batch"]),
        str(row["latent"]),
        row["dtype"],
        row["mode"],
        _ms(fused["median_s"]),
        _ms(impls["eager"]["median_s"]),
        _ms(impls["compiled"]["median_s"]) if "compiled" in impls else "—",
        _ratio(row["speedup_vs_eager"]),
        _ratio(row["speedup_vs_compiled"]),
        f"{fused['gb_per_s']:.1f}" if "gb_per_s" in fused else "—",
        f"{100 * fused['copy_fraction']:.0f}%" if "copy_fraction" in fused else "—",
        f"{row['compile_s']:.1f}" if row.get("compile_s") is not None else "—",
    ]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i < 6 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(table_row(row)) + " |" for row in rows]
    return "\n".join(lines)


def find_rows(report: dict, op: str, pass_: str, batch: int, latent: int, dtype: str) -> list[dict]:
    """The case's rows, one per mode measured."""
    return [row for row in report["rows"]
            if (row["op"], row["pass"], row["batch"], row["latent"], row["dtype"]) == (op, pass_, batch, latent, dtype)]


def check_targets(report: dict) -> list[dict]:
    """The CPU targets whose case was measured in this report, with the measured value per mode; a
    target is met only when it is met in every mode measured."""
    if report["device"] != "cpu":
        return []
    checked = []
    for target in CPU_TARGETS:
        rows = find_rows(report, target.op, target.pass_, target.batch, target.latent, target.dtype)
        measured = {row["mode"]: target.measured(row) for row in rows if target.measured(row) is not None}
        if not measured:
            continue
        checked.append({"target": target.description, "copy": target.baseline == "copy", "measured": measured,
                        "met": all(value >= target.minimum for value in measured.values())})
    return checked


def _measured_text(checked: dict) -> str:
    return ", ".join(f"{mode} {100 * value:.0f}%" if checked["copy"] else f"{mode} {value:.2f}x"
                     for mode, value in checked["measured"].items())


# Rows measured while other processes used more than this share of the cores are named in the
# report's warning: a 2-thread parallel region then waits for time slices.
BUSY_SHARE = 0.05


def busy_machine_warning(report: dict) -> str | None:
    """Other processes on the cores make parallel CPU kernels straggle; say so, naming the rows
    measured while others used more than BUSY_SHARE of the cores (or, for reports without that
    figure, when the load average exceeded what this run's own threads account for)."""
    if report["device"] != "cpu":
        return None
    busy = [row for row in report["rows"] if (row.get("others_cpu_share") or 0.0) > BUSY_SHARE]
    if busy:
        named = ", ".join(f"{row['op']} {row['pass']} B={row['batch']} L={row['latent']} {row['mode']} "
                          f"({100 * row['others_cpu_share']:.0f}%)" for row in busy)
        return (f"other processes used more than {100 * BUSY_SHARE:.0f}% of the cores while these rows were measured, "
                f"so their timings are noisier than usual: {named}.")
    loads = [row["load_average"] for row in report["rows"] if row.get("load_average") is not None]
    own_threads = report["machine"]["torch_threads"]
    if any("others_cpu_share" in row for row in report["rows"]) or not loads or max(loads) <= own_threads + 1:
        return None
    return (
        f"the load average reached {max(loads):.1f} on {report['machine']['cpu_cores']} cores while this run used "
        f"{own_threads} thread{'s' if own_threads != 1 else ''}: other processes competed for the CPU, so these "
        "timings are noisier than usual."
    )


def _baseline_line(report: dict) -> str:
    """Which torch produced the eager and compiled baselines (another environment's with --baseline-python)."""
    versions = report["versions"]
    baseline_torch = versions.get("baseline_torch", versions["torch"])
    if versions.get("baseline_python") is None:
        return f"Baselines (eager, compiled): torch {baseline_torch}, in this process."
    return (f"Baselines (eager, compiled) of the op rows: **torch {baseline_torch}**, timed in "
            f"`{versions.get('baseline_python')}` side by side (same seeded inputs, rounds interleaved, 50 ms idle "
            f"before each sample); fused and the training-step rows: torch {versions['torch']}.")


def _header(report: dict) -> list[str]:
    machine = report["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_cores']} cores"
    backend = report["backend"]
    threads = machine["torch_threads"]
    lines = [
        f"# vae_fast benchmark: {report['device']} ({where})",
        "",
        f"{report['date']}; vae_fast {report['versions']['vae_fast']}"
        + (f" ({report['versions']['git']})" if report["versions"].get("git") else "")
        + f", torch {report['versions']['torch']}, "
        f"{threads} torch thread{'s' if threads != 1 else ''}; {report['plan']['label']} run in {report['wall_s']:.0f} s.",
        _baseline_line(report),
        f"Copy bandwidth (`dst.copy_(src)`, {report['plan']['copy_buffer_bytes'] // 2**20} MiB, same run): "
        f"**{report['copy_bandwidth_gb_per_s']:.1f} GB/s**.",
        "",
        "Median time per call over interleaved rounds (fused, eager, compiled take turns on the same inputs). "
        "Mode `warm`: one input set, the same every call, as a training step sees it; `cold`: input sets that "
        f"rotate, {report['rotation_bytes'] // 2**20} MiB of them or more per case. A backward sets the inputs' "
        "`.grad` to None first and leaves its gradients there, as a training step does. `vs eager` and `vs compiled` "
        "are how many times faster the fused path is. `fused GB/s` is the ideal bytes (each input read once, "
        "each output written once) over the fused time, `% of copy` that against the copy bandwidth. "
        "`compile s` is torch.compile's first call (compile and run) in this process, excluded from the "
        "timings; inductor's on-disk caches are on, as by default, so a repeated run compiles faster. "
        "Times are in milliseconds.",
    ]
    busy = busy_machine_warning(report)
    if busy:
        lines += ["", f"**Warning: {busy}**"]
    if backend["implementation"] != "extension":
        lines += ["", f"**Warning: `fused` here is the pure-torch reference, not the kernels: {backend.get('reason')}.**"]
    return lines


def to_markdown(report: dict, *, plot_name: str | None = None) -> str:
    lines = _header(report) + ["", markdown_table(report["rows"])]
    for skipped in report["skipped"]:
        lines += ["", f"Not measured: {skipped['case']}: {skipped['reason']}."]
    for failed in report.get("failed", []):
        lines += ["", f"**FAILED: {failed['case']}: {failed['error']}**"]
    targets = check_targets(report)
    if targets:
        lines += ["", "## Targets (met only when met in every mode measured)", ""]
        lines += [f"- {'met' if t['met'] else 'MISSED'}: {t['target']} (measured {_measured_text(t)})" for t in targets]
    if plot_name:
        lines += ["", f"![speedup vs batch size]({plot_name})"]
    return "\n".join(lines) + "\n"


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps({**report, "targets": check_targets(report)}, indent=1) + "\n")
