"""benchmarks/accuracy_table.py (issue 11's accuracy table) at a small --points: every row of the
table, for each instruction set's kernels this CPU runs (avx512, avx2, generic; all but this process's
own in a subprocess), within 1e-5
relative of the float64 oracle, the cancellation rows within the rounding bound (the full run's
report, benchmarks/results/accuracy-cpu-*.md, has the figures)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import vae_fast

TABLE_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_table.py"
POINTS = 60

# Every row the script reports, in its order.
ROWS = [
    "bce_log", "bce_log1p", "bce_recip", "bce_dx", "bce_dx_cancel",
    "logits_loss", "logits_grad",
    "kl_logvar", "kl_dlogvar", "kl_mu", "kl_dmu",
    *(f"{lik}_{q}" for lik in ("gaussian", "laplace")
      for q in ("loss", "loss_cancel", "drecon", "dlogscale", "dlogscale_cancel",
                "elem_loss", "elem_loss_cancel", "elem_dlogscale", "elem_dlogscale_cancel")),
    "sum_bernoulli", "sum_bernoulli_logits", "sum_gaussian", "sum_laplace",
]

def cases():
    out = []
    for isa in ("avx512", "avx2", "generic"):
        for path in ("lanes", "tail"):
            for key in ROWS:
                if key.startswith("sum_") and path == "tail":
                    continue
                out.append(pytest.param(isa, path, key, id=f"{isa}-{path}-{key}"))
    return out


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("vae_fast_accuracy_table", TABLE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(table):
    if vae_fast.backend_info()["extension"]["cpu_isa"] is None:
        pytest.skip("the extension is not loaded: the table measures its kernels")
    out = {}
    for isa in ("avx512", "avx2", "generic"):
        try:
            out[isa] = {row["key"]: row for row in table.measure_isa(isa, POINTS)["rows"]}
        except RuntimeError as e:  # a CPU without AVX-512 (or AVX2) runs a narrower set under its name
            out[isa] = e
    return out


def measured(results):
    """The instruction sets this CPU ran (generic always)."""
    return {isa: rows for isa, rows in results.items() if not isinstance(rows, Exception)}


def test_rows_are_the_listed_ones(results):
    for isa, rows in results.items():
        if not isinstance(rows, Exception):
            assert list(rows) == ROWS, isa


@pytest.mark.parametrize("isa,path,key", cases())
def test_row_within_bound(results, table, isa, path, key):
    """1e-5 relative; a cancellation row (kappa > 100, a zero of the Gaussian/Laplace loss or of
    d/dlog_scale, where no float32 evaluation keeps a relative bound) within 16 roundoffs times kappa."""
    if isinstance(results[isa], Exception):
        pytest.skip(str(results[isa]))
    summary = results[isa][key]["paths"][path]
    assert summary["points"] > 0, f"{key} {isa} {path}: the sweep measured no point"
    assert table.passes(summary, key.endswith("_cancel")), (
        f"{key} {isa} {path}: {summary['max']:.3g} relative (error/kappa {summary['max_over_kappa']}) at {summary['at']} "
        f"(float32 {summary['actual']!r}, oracle {summary['oracle']!r})")


def test_a_row_that_measured_nothing_fails(table, results):
    """A sweep that misses a row's inputs must not read as a pass (the lanes cells of both per-element
    cancellation rows measured nothing, on both instruction sets, at this --points, and the Laplace
    one at 2000 in the committed table): passes() is False, the table says no and lists it."""
    assert not table.passes({"max": None, "at": "", "points": 0, "beyond_float32": 0})
    assert not table.passes({"max": None, "at": "", "points": 0, "beyond_float32": 0}, cancellation=True)
    as_measured = {isa: {"isa": isa, "rows": [dict(row, paths=dict(row["paths"])) for row in rows.values()]}
                   for isa, rows in measured(results).items()}
    emptied = next(row for row in as_measured["generic"]["rows"] if row["key"] == "laplace_elem_loss_cancel")
    emptied["paths"]["lanes"] = {"max": None, "at": "", "points": 0, "beyond_float32": 0}
    text = table.to_markdown(as_measured, POINTS)
    assert text.count(" | **no** |") == 1 and text.count(" | yes |") == len(ROWS) - 1
    assert "- `laplace_elem_loss_cancel` generic lanes: no points (the sweep measured nothing)" in text
    assert table.failing_cells(as_measured) == 1  # main()'s exit status is 1 then


def test_former_defects_stay_fixed(table):
    """The two defects the table found, at the inputs where it found them: a logit of -87.34 (AVX2's
    exp_nonpos flushed e^r below FLT_MIN to 0: softplus and sigmoid came out 0, not ~1.17e-38), and a
    Gaussian z whose square overflows float32 but whose half square does not (the loss was +inf)."""
    if vae_fast.backend_info()["extension"]["cpu_isa"] is None:
        pytest.skip("the extension is not loaded")
    r = torch.full((1, 16), -87.3399963, dtype=torch.float32, requires_grad=True)
    x = torch.zeros(1, 16)
    zeros = torch.zeros(1, 1)
    loss = vae_fast.vae_loss(r, x, zeros, zeros, logits=True)
    (grad,) = torch.autograd.grad(loss, [r])
    expected = torch.nn.functional.softplus(r.detach().double()).sum()
    assert abs(loss.item() - float(expected)) <= 1e-6 * float(expected)
    torch.testing.assert_close(grad.double(), torch.sigmoid(r.detach().double()), rtol=1e-6, atol=0)
    z = 2.2e19  # z^2 = 4.8e38 > FLT_MAX, z^2 / 2 = 2.4e38 < FLT_MAX
    m = torch.zeros(1, 16)
    x = torch.full((1, 16), z) * torch.tensor([1.0] + [0.0] * 15)
    loss = vae_fast.vae_loss(m, x, zeros, zeros, likelihood="gaussian")
    expected = 0.5 * z * z + 16 * 0.5 * math.log(2 * math.pi)
    assert math.isfinite(float(loss)) and abs(float(loss) - expected) <= 1e-6 * expected


def test_markdown_names_every_row(table, results, tmp_path):
    as_measured = {isa: {"isa": isa, "rows": list(rows.values())} for isa, rows in measured(results).items()}
    text = table.to_markdown(as_measured, POINTS)
    assert "tiny = 2^-126" in text
    assert all(f" {isa} lanes | {isa} tail |" in text for isa in as_measured)  # a column pair per set
    assert text.count("\n| ") == 1 + len(ROWS)  # header + one line per row
    assert text.count(" | yes |") == len(ROWS)  # every row passes, and says so
    assert "Rows that fail" not in text
    assert table.failing_cells(as_measured) == 0
    assert table.main(["--points", "8", "--out", str(tmp_path / "acc.md")]) == 0
    assert (tmp_path / "acc.md").read_text().startswith("# Accuracy of vae_fast")
