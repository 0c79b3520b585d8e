"""Eager and torch.compile baselines timed in another Python environment (`vae-fast bench
--baseline-python PATH`), side by side with the fused kernels in one run.

torch.compile's CPU speed depends a lot on the torch build (compiled by the CPU build of torch 2.13
the eager formulas run about 3x faster than compiled by the CUDA build 2.14.1 this project pins), so
the honest ratio is against the fastest compiler a user could have, which may live in another
environment. That interpreter runs this module as a server: it builds each case from the same code
(`vae_fast.bench.cases`, imported from this source tree; its compiled extension is not needed there)
and the same seeded inputs, whose checksum the parent compares, and times its eager and compiled
calls when asked, so that its samples interleave with the fused ones round by round.

Before every sample of every contender the parent leaves the machine idle for SETTLE_S
(`timing.interleaved_samples`): an OpenMP pool
spin-waits for a while after its work, and the other interpreter's spinning threads would take the
cores from whichever contender runs next (measured: the fused Gaussian loss 3.36 ms right after the
other process's turn, 2.72 ms with idle pools); then the contender runs untimed for
WARMUP_AFTER_SETTLE_S, so that its threads and cores are awake again when the sample starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SETTLE_S = 0.05  # longer than libgomp's default spin-wait
# Untimed calls after the pause, before the sample (timing.interleaved_samples): long enough that
# the first calls' wake-up cost is gone (benchmarks/small_batch_probe.py).
WARMUP_AFTER_SETTLE_S = 0.02
# The source tree that holds the vae_fast package, put on the server's path.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


class BaselineProcessError(RuntimeError):
    """The baseline interpreter is missing, cannot run vae_fast's benchmark code, or disagrees about the inputs."""


class BaselineProcess:
    """The server in the other environment. Use as a context manager; `python` is its interpreter."""

    def __init__(self, python: str | os.PathLike):
        self.python = str(python)
        if not Path(self.python).is_file() or not os.access(self.python, os.X_OK):
            raise BaselineProcessError(f"--baseline-python {self.python}: no such executable file")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONWARNINGS"] = "ignore"  # "extension not available" is expected there
        self._child = subprocess.Popen(
            [self.python, "-m", "vae_fast.bench.baseline_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(SOURCE_ROOT),
        )
        hello = self._ask({"cmd": "hello"})
        self.torch_version = hello["torch"]
        self.python_version = hello["python"]

    def _ask(self, request: dict) -> dict:
        try:
            self._child.stdin.write(json.dumps(request) + "\n")
            self._child.stdin.flush()
            line = self._child.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self._child.wait(timeout=10)
            raise BaselineProcessError(
                f"the baseline interpreter {self.python} exited (status {self._child.returncode}); its error is printed above"
            )
        reply = json.loads(line)
        if "error" in reply:
            raise BaselineProcessError(f"baseline interpreter {self.python}: {reply['error']}")
        return reply

    def build(self, op: str, pass_: str, batch: int, latent: int, dtype: str, rotation_bytes: int, threads: int,
              checksum: float | None) -> dict:
        """Builds the case there (inputs, eager and compiled callables, their warm-up) and returns
        {"compile_s": ...}. Raises BaselineProcessError when its inputs are not ours."""
        reply = self._ask({"cmd": "build", "op": op, "pass": pass_, "batch": batch, "latent": latent, "dtype": dtype,
                           "rotation_bytes": rotation_bytes, "threads": threads})
        if checksum is not None and abs(reply["checksum"] - checksum) > 1e-6 * max(1.0, abs(checksum)):
            raise BaselineProcessError(
                f"baseline interpreter {self.python} built other inputs for {op} {pass_} B={batch} "
                f"(checksum {reply['checksum']!r}, ours {checksum!r})"
            )
        return reply

    @property
    def pid(self) -> int:
        return self._child.pid

    def seconds_per_call(self, name: str, mode: str, calls: int) -> float:
        return self._ask({"cmd": "time", "name": name, "mode": mode, "calls": calls})["seconds"]

    def warm_for(self, name: str, mode: str, seconds: float) -> None:
        self._ask({"cmd": "warm", "name": name, "mode": mode, "seconds": seconds})

    def close(self) -> None:
        if self._child.poll() is None:
            try:
                self._child.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self._child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._child.kill()

    def __enter__(self) -> BaselineProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteRun:
    """One implementation of the current case, in one mode, in the baseline process. The bench's
    clock asks it for its own timing (`seconds_per_call`), so the pipe's latency is never counted;
    calling it runs one call there (warm-ups)."""

    def __init__(self, process: BaselineProcess, name: str, mode: str):
        self.process = process
        self.name = name
        self.mode = mode

    def seconds_per_call(self, calls: int) -> float:
        return self.process.seconds_per_call(self.name, self.mode, calls)

    def warm_for(self, seconds: float) -> None:
        """Untimed calls there for `seconds` (at least one)."""
        self.process.warm_for(self.name, self.mode, seconds)

    def __call__(self) -> None:
        self.process.seconds_per_call(self.name, self.mode, 1)


def serve() -> None:
    """The server loop (runs in the baseline interpreter): one JSON request per line on stdin, one
    JSON reply per line on stdout."""
    import platform

    import torch

    from vae_fast.bench import cases, timing

    case = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "hello":
                reply = {"torch": torch.__version__, "python": platform.python_version()}
            elif request["cmd"] == "build":
                case = None  # free the previous case's inputs first
                torch.set_num_threads(request["threads"])
                case = cases.op_case(request["op"], request["pass"], request["batch"], request["latent"],
                                     dtype=getattr(torch, request["dtype"]), device=torch.device("cpu"),
                                     rotation_bytes=request["rotation_bytes"])
                compile_s = timing.first_call_seconds(case.modes["cold"]["compiled"], case.device)
                reply = {"checksum": case.checksum, "compile_s": compile_s}
            elif request["cmd"] == "time":
                with torch._dynamo.config.patch(error_on_recompile=True):
                    run = case.modes[request["mode"]][request["name"]]
                    seconds = timing.HostClock().seconds_per_call(run, request["calls"])
                reply = {"seconds": seconds}
            elif request["cmd"] == "warm":
                timing.warm_for(case.modes[request["mode"]][request["name"]], request["seconds"])
                reply = {}
            else:
                reply = {"error": f"unknown request {request['cmd']!r}"}
        except Exception as error:  # noqa: BLE001  (reported to the parent, which raises it there)
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
