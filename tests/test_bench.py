"""`vae-fast bench` machinery on tiny sizes: the right rows and columns in the Markdown, JSON and PNG,
the ideal-bytes formulas, and the interleaving. No timing assertions: timings are the report's job."""

import json
import os

import pytest
import torch

import vae_fast
from vae_fast.baselines import ExampleVAE
from vae_fast.bench import Plan, measure, runner, timing
from vae_fast.bench.cases import loss_ideal_bytes, reparameterize_ideal_bytes
from vae_fast.bench.plot import write_plot
from vae_fast.bench.report import COLUMNS, result_stem, to_markdown, write_json
from vae_fast.cli import build_parser

TINY = dict(min_sample_s=1e-4, budget_s=0.05, min_rounds=3, max_rounds=3, copy_buffer_bytes=2**24)


@pytest.fixture(scope="module")
def tiny_report():
    # The training-step row needs vae_fast.VAE; the example's model stands in where it has not landed.
    had_vae = hasattr(vae_fast, "VAE")
    if not had_vae:
        vae_fast.VAE = ExampleVAE
    try:
        plan = Plan(batches=(8, 16), latents=(4,), dtypes=(torch.float32,), training_batches=(8,),
                    training_logits=(False,), compile=False, **TINY)
        yield measure("cpu", plan)
    finally:
        if not had_vae:
            del vae_fast.VAE


def test_report_has_a_row_per_case_and_mode(tiny_report):
    cases = [(row["op"], row["pass"], row["batch"], row["mode"]) for row in tiny_report["rows"]]
    expected = {(op, pass_, batch, mode) for op, pass_ in runner.OP_PASSES for batch in (8, 16) for mode in ("warm", "cold")}
    expected |= {("train_step", "step", 8, "cold")}  # a training step reads a new batch each time
    assert sorted(cases) == sorted(expected)
    for row in tiny_report["rows"]:
        assert set(row["impls"]) == {"fused", "eager"}
        assert row["speedup_vs_eager"] > 0 and row["speedup_vs_compiled"] is None
        assert row["rounds"] == 3 and all(entry["samples"] == 3 for entry in row["impls"].values())
        if row["op"] != "train_step":
            assert row["impls"]["fused"]["gb_per_s"] > 0 and row["impls"]["fused"]["copy_fraction"] > 0
    assert tiny_report["copy_bandwidth_gb_per_s"] > 0


def test_outputs_are_written(tiny_report, tmp_path):
    stem = tmp_path / result_stem(tiny_report)
    assert stem.name.startswith("cpu-")
    markdown = to_markdown(tiny_report, plot_name=stem.with_suffix(".png").name)
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(COLUMNS) + " |"
    assert len(table) == 1 + len(tiny_report["rows"])
    mode_column = COLUMNS.index("mode")
    assert {line.split(" | ")[mode_column] for line in table[1:]} == {"warm", "cold"}
    assert "![speedup vs batch size](" in markdown

    write_json(tiny_report, stem.with_suffix(".json"))
    loaded = json.loads(stem.with_suffix(".json").read_text())
    assert loaded["device"] == "cpu" and len(loaded["rows"]) == len(tiny_report["rows"])
    assert {"median_s", "gb_per_s", "copy_fraction"} <= set(loaded["rows"][0]["impls"]["fused"])
    assert loaded["targets"] == []  # the targets' size (B=4096) was not measured

    write_plot(tiny_report, stem.with_suffix(".png"))
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compiled_baseline_is_measured_and_compile_time_kept_apart():
    plan = Plan(batches=(8,), latents=(4,), dtypes=(torch.float32,), op_passes=(("reparameterize", "fwd"),), **TINY)
    report = measure("cpu", plan)
    assert [row["mode"] for row in report["rows"]] == ["warm", "cold"]
    for row in report["rows"]:
        assert set(row["impls"]) == {"fused", "eager", "compiled"}
        assert row["speedup_vs_compiled"] > 0 and row["compile_s"] > 0


def test_missing_vae_skips_the_training_row_with_a_reason(monkeypatch):
    monkeypatch.delattr(vae_fast, "VAE", raising=False)
    plan = Plan(batches=(), latents=(4,), dtypes=(torch.float32,), training_batches=(8,), compile=False, **TINY)
    report = measure("cpu", plan)
    assert report["rows"] == []
    assert [s["case"] for s in report["skipped"]] == ["train_step B=8", "train_step_logits B=8"]
    assert "vae_fast.VAE" in report["skipped"][0]["reason"]
    assert "Not measured: train_step B=8" in to_markdown(report)


def test_a_failing_case_is_recorded_and_the_run_goes_on(monkeypatch):
    build = runner.op_case

    def broken_for_logits(op, *args, **kwargs):
        if op == "loss_logits":
            raise RuntimeError("kernel exploded")
        return build(op, *args, **kwargs)

    monkeypatch.setattr(runner, "op_case", broken_for_logits)
    plan = Plan(batches=(8,), latents=(4,), dtypes=(torch.float32,), compile=False, **TINY)
    report = measure("cpu", plan)
    logits_passes = [p for op, p in runner.OP_PASSES if op == "loss_logits"]
    assert len(report["failed"]) == len(logits_passes) == 2
    assert len(report["rows"]) == 2 * (len(runner.OP_PASSES) - 2)
    assert "kernel exploded" in report["failed"][0]["error"]
    assert "FAILED: loss_logits fwd B=8" in to_markdown(report)


def test_ideal_bytes():
    # B=2, D=784, L=3, float32: recon, x are 2*784, mu, logvar 2*3 elements.
    reads = (2 * 2 * 784 + 2 * 2 * 3) * 4
    assert loss_ideal_bytes(2, 3, 4, backward=False) == reads
    assert loss_ideal_bytes(2, 3, 4, backward=True) == reads + (2 * 784 + 2 * 2 * 3) * 4
    assert reparameterize_ideal_bytes(2, 3, 2, backward=False) == 3 * 6 * 2
    assert reparameterize_ideal_bytes(2, 3, 2, backward=True) == 7 * 6 * 2


def test_rounds_interleave_and_rotate_the_starting_implementation():
    order = []

    class CountingClock:
        def seconds_per_call(self, run, calls):
            run()
            return 1.0

    runs = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    samples = timing.interleaved_samples(runs, CountingClock(), timing.Repetitions(calls_per_sample=1, rounds=3))
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(s) == 3 for s in samples.values())
    # With a settle pause (two processes), each sample starts with one untimed call of its own.
    order.clear()
    timing.interleaved_samples(runs, CountingClock(), timing.Repetitions(calls_per_sample=1, rounds=2), settle_s=1e-4)
    assert order == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a"]
    # With a warm-up after the pause, each sample starts after that long of untimed calls.
    import time

    stamps = []
    runs = {"a": lambda: stamps.append(time.perf_counter())}
    timing.interleaved_samples(runs, CountingClock(), timing.Repetitions(calls_per_sample=1, rounds=1), settle_s=1e-4,
                               warmup_s=0.02)
    assert len(stamps) > 2 and stamps[-1] - stamps[0] >= 0.02


def test_cli_parses_bench():
    args = build_parser().parse_args(["bench", "--quick", "--device", "cpu", "--out", "somewhere", "--threads", "1"])
    assert (args.quick, args.device, args.out, args.threads) == (True, "cpu", "somewhere", 1)
    defaults = build_parser().parse_args(["bench"])
    assert defaults.device is None and defaults.threads is None


def test_selected_plan_keeps_only_the_given_sizes_and_is_labelled():
    full = Plan.full_run(torch.device("cpu"))
    assert full.selected() is full
    chosen = full.selected(batches=(128,), dtypes=(torch.float32,))
    assert chosen.batches == (128,) and chosen.latents == full.latents and chosen.label == "selected"
    report = {"device": "cuda", "date": "2026-11-26 10:00 UTC", "plan": chosen.describe()}
    assert result_stem(report) == "cuda-2026-11-26-selected"
    assert result_stem({**report, "plan": full.describe()}) == "cuda-2026-11-26"


def test_bench_size_options_parse_and_reject_bad_values(capsys):
    args = build_parser().parse_args(["bench", "--batches", "128,65536", "--latents", "64", "--dtypes", "float32,bfloat16"])
    assert args.batches == (128, 65536) and args.latents == (64,) and args.dtypes == (torch.float32, torch.bfloat16)
    assert build_parser().parse_args(["bench", "--modes", "warm"]).modes == ("warm",)
    assert build_parser().parse_args(["bench", "--ops", "loss_probs:fwd+bwd,reparameterize:fwd"]).ops == (
        ("loss_probs", "fwd+bwd"), ("reparameterize", "fwd"))
    for bad in (["--batches", "12x"], ["--latents", "0"], ["--dtypes", "float64"], ["--modes", "hot"],
                ["--ops", "loss_probs:bwd"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", *bad])
        assert bad[0] in capsys.readouterr().err


def test_baselines_timed_in_another_interpreter(monkeypatch):
    """--baseline-python: the op cases' eager and compiled calls run in a server process (here this
    same interpreter, started anew), on inputs whose checksum matches ours; the report names it."""
    import sys

    from vae_fast.bench.baseline_process import BaselineProcess, RemoteRun

    seen = []
    measure_case = runner.measure_case

    def spying(case, mode, plan, remote=False):
        result = measure_case(case, mode, plan, remote)
        seen.append((case.op, type(case.modes["warm"]["eager"]).__name__, type(case.modes["cold"]["compiled"]).__name__))
        return result

    monkeypatch.setattr(runner, "measure_case", spying)
    plan = Plan(batches=(8,), latents=(4,), dtypes=(torch.float32,), training_batches=(), compile=True,
                op_passes=(("loss_gaussian", "fwd+bwd"), ("reparameterize", "fwd")), **TINY)
    with BaselineProcess(sys.executable) as baseline:
        assert baseline.torch_version == torch.__version__
        report = measure("cpu", plan, baseline=baseline)
    assert not report["failed"], report["failed"]
    assert [op for op, _, _ in seen] == ["loss_gaussian", "loss_gaussian", "reparameterize", "reparameterize"]
    assert all(eager == compiled == RemoteRun.__name__ for _, eager, compiled in seen)
    assert all(row["baseline_torch"] == torch.__version__ and row["speedup_vs_compiled"] > 0 for row in report["rows"])
    assert report["versions"]["baseline_python"] == sys.executable
    assert "side by side" in to_markdown(report)


def test_baseline_process_refuses_other_inputs_and_bad_interpreters(tmp_path):
    import sys

    from vae_fast.bench.baseline_process import BaselineProcess, BaselineProcessError

    with pytest.raises(BaselineProcessError, match="no such executable file"):
        BaselineProcess(tmp_path / "python")
    with BaselineProcess(sys.executable) as baseline:
        with pytest.raises(BaselineProcessError, match="built other inputs"):
            baseline.build("loss_logits", "fwd", 4, 2, "float32", 2**20, 1, checksum=12345.0)
        with pytest.raises(BaselineProcessError, match="KeyError"):
            baseline.build("loss_poisson", "fwd", 4, 2, "float32", 2**20, 1, checksum=None)
    assert main_exit_status(["bench", "--device", "cpu", "--baseline-python", str(tmp_path / "python")]) == 2


def main_exit_status(argv):
    from vae_fast.cli import main

    return main(argv)


class CountingCall:
    """Stands in for an implementation: records the inputs of every call."""

    def __init__(self):
        self.seen = []

    def __call__(self, *inputs):
        self.seen.append(inputs)


def test_warm_reuses_one_input_set_and_cold_rotates_distinct_ones():
    from vae_fast.bench.cases import in_both_modes

    input_sets = [(torch.full((2,), float(i)),) for i in range(3)]
    warm_call, cold_call = CountingCall(), CountingCall()
    warm = in_both_modes({"fused": warm_call}, input_sets)["warm"]["fused"]
    cold = in_both_modes({"fused": cold_call}, input_sets)["cold"]["fused"]
    for _ in range(6):
        warm()
        cold()
    assert all(inputs[0] is input_sets[0][0] for inputs in warm_call.seen)
    assert [inputs[0] for inputs in cold_call.seen] == [s[0] for s in input_sets] * 2


@pytest.mark.parametrize("op", ["loss_logits", "reparameterize"])
def test_cases_have_both_modes_on_their_own_input_sets(op):
    """A real case has every implementation in both modes, each callable, and more than one cold set."""
    case = runner.op_case(op, "fwd+bwd", 64, 4, dtype=torch.float32, device=torch.device("cpu"), rotation_bytes=2**20)
    assert set(case.modes) == {"warm", "cold"}
    assert set(case.modes["warm"]) == set(case.modes["cold"]) == {"fused", "eager", "compiled"}
    assert case.input_sets >= 2
    case.modes["warm"]["fused"]()
    case.modes["cold"]["fused"]()


def test_forward_backward_sets_grads_to_none_first():
    """As zero_grad(set_to_none=True) then backward: no accumulation across calls."""
    from vae_fast.bench.cases import forward_backward

    x = torch.ones(3, requires_grad=True)
    step = forward_backward(lambda t: (2 * t).sum())
    step(x)
    step(x)
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    grad_z = torch.tensor([1.0, 2.0, 3.0])
    forward_backward(lambda t: 3 * t, grad_output_arg=True)(x, grad_z)
    assert torch.equal(x.grad, 3 * grad_z)


def test_targets_hold_only_when_met_in_both_modes():
    from vae_fast.bench.report import check_targets

    def row(mode, vs_compiled):
        return {"op": "loss_logits", "pass": "fwd+bwd", "batch": 4096, "latent": 20, "dtype": "float32", "mode": mode,
                "speedup_vs_eager": 9.0, "speedup_vs_compiled": vs_compiled, "impls": {"fused": {}}}

    report = {"device": "cpu", "rows": [row("warm", 1.5), row("cold", 2.5)]}
    (logits,) = [t for t in check_targets(report) if t["target"].startswith("loss_logits fwd+bwd B=4096")]
    assert logits["measured"] == {"warm": 1.5, "cold": 2.5} and not logits["met"]
    report["rows"][0]["speedup_vs_compiled"] = 2.0
    (logits,) = [t for t in check_targets(report) if t["target"].startswith("loss_logits fwd+bwd B=4096")]
    assert logits["met"]


def test_others_cpu_share_sees_another_process_and_not_ours():
    """A busy child process counts as others' use of the cores unless its pid is among ours."""
    import subprocess
    import sys

    import time

    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass\ntime.sleep(60)"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        others = timing.OthersCpuShare([])
        ours = timing.OthersCpuShare([spinner.pid])
        others.start()
        ours.start()
        time.sleep(2.0)  # the spin, then the spinner idles (alive, so its CPU time can be read)
        # 1.5 s of one busy core out of os.cpu_count(); allow for the rest of the machine
        assert others.share() > 0.5 / os.cpu_count()
        assert ours.share() < others.share() - 0.3 / os.cpu_count()
    finally:
        spinner.kill()


def test_busy_rows_are_named_in_the_warning(tiny_report):
    from vae_fast.bench.report import busy_machine_warning

    report = {**tiny_report, "rows": [dict(row, others_cpu_share=0.0) for row in tiny_report["rows"]]}
    assert busy_machine_warning(report) is None
    report["rows"][0]["others_cpu_share"] = 0.4
    warning = busy_machine_warning(report)
    first = report["rows"][0]
    assert f"{first['op']} {first['pass']} B={first['batch']}" in warning and "(40%)" in warning
