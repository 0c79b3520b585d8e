"""The portable CPU path on a CPU without AVX2 (issue 9 item 6, issue 18).

kernels_avx2.cpp is compiled with -mavx2 -mfma -mf16c: inline functions it emits (std::, c10's
Half/BFloat16 helpers) are AVX-encoded COMDAT copies, and the linker keeps one copy of each. setup.py
links that object after every portable one, and GNU ld keeps the first copy, so the portable path
should never execute an instruction of those sets. This test checks it the only way that settles it:
the fwd+bwd of every kernel (reparameterize; the Bernoulli loss on probabilities and logits; the
Gaussian and Laplace losses with a fixed scale and a learned one of each layout; the three
reductions), in every dtype, under qemu-user emulating a Sandy Bridge (AVX, but no AVX2, FMA or
F16C), where such an instruction raises SIGILL (the first test proves the emulator does fault). The
results must equal the native portable path's (VAE_FAST_CPU_ISA=generic): bitwise, except float64,
where glibc's libm picks its FMA or SSE2 variant by CPU and last bits may differ.

Sandy Bridge rather than a CPU without AVX (Nehalem, before): numpy 2.4, which `import torch`
loads, was reported to fault under qemu's Nehalem in CI (it ran there on the development machine:
qemu 7.2, numpy 2.4.6). The price: AVX1 code in the portable path, which only a CPU without AVX
would notice, no longer faults here.
Needs qemu-x86_64 (Debian: qemu-user) and an x86-64 host; where the environment variable CI is set,
a missing qemu-x86_64 fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="runs x86-64 binaries under qemu-x86_64")

EMULATED_CPU = "SandyBridge"


@pytest.fixture(scope="module")
def qemu() -> str:
    path = shutil.which("qemu-x86_64")
    if path is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("qemu-x86_64 is missing, and CI must run the portable CPU test: install qemu-user")
        pytest.skip("needs qemu-x86_64 (apt-get install qemu-user)")
    return path


# One instruction of each set: AVX (which the emulated CPU has), and the three that
# kernels_avx2.cpp is compiled for (which it has not).
PROBE = r"""
#include <cstdio>
#include <cstring>
int main(int argc, char** argv) {
  float in[8] = {1, 2, 3, 4, 5, 6, 7, 8}, out[8] = {0};
  int lanes = argc;
  if (!std::strcmp(argv[1], "avx"))
    asm volatile("vmovups %1, %%ymm0\n\tvaddps %%ymm0, %%ymm0, %%ymm0\n\tvmovups %%ymm0, %0\n\tvzeroupper"
                 : "=m"(out) : "m"(in) : "xmm0");
  if (!std::strcmp(argv[1], "avx2"))
    asm volatile("vmovd %0, %%xmm0\n\tvpaddd %%ymm0, %%ymm0, %%ymm0\n\tvmovd %%xmm0, %0\n\tvzeroupper"
                 : "+r"(lanes) : : "xmm0");
  if (!std::strcmp(argv[1], "fma"))
    asm volatile("vmovups %1, %%ymm0\n\tvfmadd231ps %%ymm0, %%ymm0, %%ymm0\n\tvmovups %%ymm0, %0\n\tvzeroupper"
                 : "=m"(out) : "m"(in) : "xmm0");
  if (!std::strcmp(argv[1], "f16c"))
    asm volatile("vmovups %1, %%ymm0\n\tvcvtps2ph $0, %%ymm0, %%xmm1\n\tvcvtph2ps %%xmm1, %%ymm0\n\t"
                 "vmovups %%ymm0, %0\n\tvzeroupper" : "=m"(out) : "m"(in) : "xmm0", "xmm1");
  std::printf("%g %d\n", out[7], lanes);
}
"""


def test_the_emulated_cpu_runs_avx_and_faults_on_avx2_fma_and_f16c(tmp_path, qemu):
    source, binary = tmp_path / "probe.cpp", tmp_path / "probe"
    source.write_text(PROBE)
    subprocess.run([os.environ.get("CXX", "c++"), str(source), "-o", str(binary)], check=True)
    outcomes = {isa: subprocess.run([qemu, "-cpu", EMULATED_CPU, str(binary), isa], capture_output=True).returncode
                for isa in ("avx", "avx2", "fma", "f16c")}
    assert outcomes == {"avx": 0, "avx2": -signal.SIGILL, "fma": -signal.SIGILL, "f16c": -signal.SIGILL}


# Every kernel of the CPU extension, forward and backward, in one dtype: a loss per case, summed
# and scaled by 1.5 (so the backward scales every gradient by grad_output), and the gradients.
# B = 4 rows of D = 5000 features: two 4096-element blocks per row, the second with a tail.
RUN = r"""
import sys, torch, vae_fast
from vae_fast import _extension

B, D, L = 4, 5000, 20


def one_dtype(dtype):
    g = torch.Generator().manual_seed(0)

    def normal(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    def uniform(*shape):
        return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    def weighted(per_row):  # reduction="none": a gradient that differs by row
        return (per_row * torch.rand(B, generator=g, dtype=torch.float64).to(per_row.dtype)).sum()

    mu, lv = normal(B, L), normal(B, L)
    z = vae_fast.reparameterize(mu, lv, generator=torch.Generator().manual_seed(1))
    x01, logits, probabilities = uniform(B, D), normal(B, D, scale=3.0), uniform(B, D)
    mean, y = normal(B, D), normal(B, D, scale=2.0)
    shared, per_feature, per_element = normal(), normal(D, scale=0.3), normal(B, D, scale=0.3)
    losses = {
        "bernoulli logits": vae_fast.vae_loss(logits, x01, z, lv, logits=True, beta=0.5),
        "bernoulli probabilities": vae_fast.vae_loss(probabilities, x01, mu, lv),
        "gaussian, unit scale, mean": vae_fast.vae_loss(mean, y, mu, lv, likelihood="gaussian", reduction="mean"),
        "gaussian, shared learned scale": vae_fast.vae_loss(mean, y, z, lv, likelihood="gaussian", log_scale=shared, beta=2.0),
        "gaussian, per-feature learned scale, per row": weighted(vae_fast.vae_loss(
            mean, y, mu, lv, likelihood="gaussian", log_scale=per_feature, reduction="none")),
        "laplace, fixed scale": vae_fast.vae_loss(mean, y, mu, lv, likelihood="laplace", log_scale=0.3),
        "laplace, per-element learned scale": vae_fast.vae_loss(mean, y, mu, lv, likelihood="laplace", log_scale=per_element),
        "laplace, per-feature learned scale, per row": weighted(vae_fast.vae_loss(
            mean, y, z, lv, likelihood="laplace", log_scale=per_feature, reduction="none")),
    }
    (sum(losses.values()) * 1.5).backward()
    leaves = {"mu": mu, "logvar": lv, "x01": x01, "logits": logits, "probabilities": probabilities, "mean": mean, "y": y,
              "shared": shared, "per_feature": per_feature, "per_element": per_element}
    return {"z": z.detach(), **{name: loss.detach() for name, loss in losses.items()},
            **{"grad " + name: t.grad for name, t in leaves.items()}}


out = {"isa": _extension._C.cpu_isa()}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    out[str(dtype)] = one_dtype(dtype)
torch.save(out, sys.argv[1])
"""


def _run(tmp_path: Path, name: str, prefix: list[str], env_extra: dict) -> dict:
    script, result = tmp_path / "run.py", tmp_path / f"{name}.pt"
    script.write_text(RUN)
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(prefix + [sys.executable, str(script), str(result)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return torch.load(result)


def test_portable_kernels_run_without_avx2_and_match_the_native_portable_path(tmp_path, qemu):
    emulated = _run(tmp_path, "emulated", [qemu, "-cpu", EMULATED_CPU], {})
    native = _run(tmp_path, "native", [], {"VAE_FAST_CPU_ISA": "generic"})
    assert emulated["isa"] == "generic" and native["isa"] == "generic"
    for dtype in ("torch.float32", "torch.float64", "torch.bfloat16", "torch.float16"):
        assert emulated[dtype].keys() == native[dtype].keys()
        for name, a in emulated[dtype].items():
            b = native[dtype][name]
            assert a is not None and a.dtype == b.dtype, (dtype, name)
            if a.dim() == 0 and not name.startswith("grad "):  # a loss (float16 gradients may overflow: issue 9)
                assert torch.isfinite(a), (dtype, name)
            if dtype == "torch.float64":
                assert torch.allclose(a, b, rtol=1e-13, atol=0), (dtype, name)
            else:
                assert torch.equal(a, b), (dtype, name)
