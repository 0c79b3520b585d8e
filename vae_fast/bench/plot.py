"""The report's plot: fused speedup vs batch size, one panel per op and pass; colour is the baseline
(eager or torch.compile), line style the mode (warm or cold) and latent size, marker the dtype. Above
the grey line at 1x the fused path is faster."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

BASELINE_COLORS = {"speedup_vs_eager": ("tab:blue", "vs eager"), "speedup_vs_compiled": ("tab:orange", "vs torch.compile")}
LABEL_OFFSETS = {"speedup_vs_eager": (4, 4), "speedup_vs_compiled": (4, -10)}  # eager's above, compile's below
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = {"float32": "o", "bfloat16": "s", "float16": "^"}
PANEL_TITLES = {
    "reparameterize": "reparameterize",
    "loss_probs": "loss, probabilities",
    "loss_logits": "loss, logits",
    "loss_gaussian": "loss, Gaussian (learned shared scale)",
    "loss_laplace": "loss, Laplace (learned shared scale)",
    "train_step": "training step, drop-in VAE",
    "train_step_logits": "training step, VAE logits path",
}


def _panels(rows: list[dict]) -> list[tuple[str, str]]:
    seen = []
    for row in rows:
        if (row["op"], row["pass"]) not in seen:
            seen.append((row["op"], row["pass"]))
    return seen


def write_plot(report: dict, path: Path) -> None:
    rows = report["rows"]
    panels = _panels(rows)
    latents = sorted({row["latent"] for row in rows})
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    # One line style per (mode, latent size): the warm lines first.
    styles = {(mode, latent): LINE_STYLES[i % len(LINE_STYLES)]
              for i, (mode, latent) in enumerate((m, lat) for m in modes for lat in latents)}
    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    columns = 4
    grid_rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4.2 * columns, 3.4 * grid_rows + 0.6), squeeze=False)
    axes = axes.ravel()
    # Values next to the points of one line per baseline only (the first mode, latent size and
    # dtype); labels of lines that run close together would print over each other.
    labelled = (modes[0], latents[0], dtypes[0]) if latents else None
    for ax, (op, pass_) in zip(axes, panels):
        for key, (color, _) in BASELINE_COLORS.items():
            for (mode, latent), style in styles.items():
                for dtype in dtypes:
                    points = sorted(
                        (row["batch"], row[key])
                        for row in rows
                        if (row["op"], row["pass"], row["mode"], row["latent"], row["dtype"]) == (op, pass_, mode, latent, dtype)
                        and row[key] is not None
                    )
                    if points:
                        xs, ys = zip(*points)
                        ax.plot(xs, ys, color=color, linestyle=style, marker=MARKERS.get(dtype, "x"), markersize=5)
                        if (mode, latent, dtype) == labelled:
                            for x, y in points:
                                ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=LABEL_OFFSETS[key],
                                            fontsize=7, color=color)
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.set_xscale("log", base=2)
        batches = sorted({row["batch"] for row in rows if (row["op"], row["pass"]) == (op, pass_)})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlim(batches[0] / 1.6, batches[-1] * 1.6)
        ax.set_yscale("log")
        speedups = [row[key] for row in rows if (row["op"], row["pass"]) == (op, pass_)
                    for key in BASELINE_COLORS if row[key] is not None]
        # 1x always in view, and room for the value labels above and below the points.
        ax.set_ylim(min(speedups + [1.0]) / 1.4, max(speedups + [1.0]) * 1.5)
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.set_title(PANEL_TITLES.get(op, op) + ("" if pass_ == "step" else f": {pass_}"), fontsize=10)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("fused speedup")
        ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=color, label=label) for color, label in BASELINE_COLORS.values()]
    handles += [Line2D([], [], color="black", linestyle=style, label=f"{mode}, L={latent}")
                for (mode, latent), style in styles.items()]
    handles += [Line2D([], [], color="black", marker=MARKERS.get(d, "x"), linestyle="", label=d) for d in dtypes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    for ax in axes[len(panels):]:
        ax.axis("off")
    machine = report["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_cores']} cores"
    threads = machine["torch_threads"]
    if report["device"] == "cpu":
        where += f", {threads} torch thread{'s' if threads != 1 else ''}"
    numbers = f"numbers for {labelled[0]} L={labelled[1]} {labelled[2]}" if labelled else ""
    versions = report.get("versions", {})
    torches = f"fused: torch {versions['torch']}, baselines: torch {versions.get('baseline_torch', versions['torch'])}" \
        if "torch" in versions else ""
    fig.suptitle(f"vae_fast speedup vs batch size: {report['device']} ({where}), {report['date']}, D=784; {numbers}\n{torches}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # the bottom strip is the legend's
    fig.savefig(path, dpi=110)
    plt.close(fig)
