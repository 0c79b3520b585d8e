"""benchmarks/soak.py (the leak soak of issue 9) on tiny counts: every case and the training run
report their rows, the Markdown has them, a leak is caught and makes the exit status 1. No memory
assertion on the real cases: with a few hundred calls the resident size is allocator noise; the
full run's report (benchmarks/results/soak-*.md) is where the figures are."""

import importlib.util
import mmap
from pathlib import Path

import pytest

SOAK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("vae_fast_soak", SOAK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_report(soak):
    return soak.run(calls=100, warmup=10, epochs=3, warmup_epochs=1, device="cpu", checkpoints=2,
                    data_dir=None, train_size=256, test_size=64, log=None)


def test_memory_is_read(soak):
    source, read = soak.rss_source()
    assert source == "/proc/self/statm"  # Linux
    assert read() > 10 * soak.MB
    reading = soak.Meter(__import__("torch").device("cpu")).read()
    assert set(reading) == {"rss", "gc_objects"}


def test_every_case_and_the_training_run_report(tiny_report):
    names = [row["case"] for row in tiny_report["rows"]]
    assert names[:5] == ["reparameterize (global generator)", "reparameterize (torch.Generator)", "vae_loss probs, sum",
                         "vae_loss logits, none, grad_output != 1", "vae_loss domain error (fwd only)"]
    assert len(names) == 6 and names[5].startswith("training (digits, 256 train / 64 held out")
    for row in tiny_report["rows"][:5]:
        assert row["unit"] == "calls" and row["count"] == 100
        assert [r["calls"] for r in row["readings"]] == [0, 50, 100]
        assert row["rss_start_mb"] > 10 and isinstance(row["passed"], bool)
    training = tiny_report["rows"][5]
    assert training["unit"] == "epochs" and training["count"] == 2
    assert [r["calls"] for r in training["all_readings"]] == [1, 2, 3]  # a reading after every epoch
    assert [r["calls"] for r in training["readings"]] == [1, 2, 3]  # from the end of the warm-up epoch
    assert tiny_report["passed"] == all(row["passed"] for row in tiny_report["rows"])


def test_markdown_report(soak, tiny_report):
    markdown = soak.to_markdown(tiny_report)
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(soak.COLUMNS) + " |"
    assert len(table) == 1 + len(tiny_report["rows"])
    for line, row in zip(table[1:], tiny_report["rows"]):
        assert line.startswith(f"| {row['case']} | ")
        assert line.endswith("| pass |" if row["passed"] else "| **FAIL** |")
    machine = tiny_report["machine"]
    for fact in (machine["torch"], machine["vae_fast"], machine["revision"], machine["date"], "/proc/self/statm",
                 machine["allocator"]):
        assert fact in markdown
    assert "RSS (MB) by epoch, training" in markdown


def test_a_leak_fails_the_soak_and_the_exit_status(soak, monkeypatch, tmp_path, capsys):
    kept = []

    def leak():
        # fresh pages, written: a heap block could reuse memory the process freed earlier (still
        # resident, so invisible in RSS: after the 32 MB arrays of other tests, tens of MB of it)
        block = mmap.mmap(-1, 1 << 20)
        block.write(b"x" * (1 << 20))
        kept.append(block)

    monkeypatch.setattr(soak, "make_cases", lambda device: {"leaks 1 MiB a call": leak, "leaks nothing": lambda: None})
    out = tmp_path / "soak.md"
    status = soak.main(["--calls", "100", "--warmup", "5", "--epochs", "0", "--checkpoints", "2", "--out", str(out)])
    assert status == 1
    markdown = out.read_text()
    (leak_line,) = [line for line in markdown.splitlines() if line.startswith("| leaks 1 MiB a call | 100 calls | 5 calls |")]
    assert float(leak_line.split(" | ")[4]) >= 50 and leak_line.endswith("| **FAIL** |")  # 100 MiB kept
    assert "| leaks nothing |" in markdown
    assert "**FAIL**: some case grew" in markdown
    assert "wrote" in capsys.readouterr().out
    assert "Command: `python benchmarks/soak.py --calls 100 --warmup 5 --epochs 0 --checkpoints 2 --out " in markdown


def test_bad_arguments_are_refused(soak):
    for argv in (["--calls", "0"], ["--warmup", "-1"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as error:
            soak.main(argv)
        assert error.value.code == 2


def test_the_report_names_the_allocator_setting(soak, monkeypatch):
    monkeypatch.delenv("VAE_FAST_SOAK_MMAP_THRESHOLD", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert soak.allocator_description() == "malloc with its default, dynamic mmap threshold"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert "fixed mmap threshold of 131,072 bytes" in soak.allocator_description()
