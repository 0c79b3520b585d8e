"""The portable CPU path on a CPU without AVX (issue 9 item 6).

kernels_avx2.cpp is compiled with -mavx2 -mfma -mf16c: inline functions it emits (std::, c10's
Half/BFloat16 helpers) are AVX-encoded COMDAT copies, and the linker keeps one copy of each. setup.py
links that object after every portable one, and GNU ld keeps the first copy, so the portable path
should never execute an AVX instruction. This test checks it the only way that settles it: the whole
fwd+bwd of both ops, in every dtype, under qemu-user emulating a Nehalem (SSE4.2, no AVX), where an
AVX instruction raises SIGILL (the first test proves the emulator does fault). The results must
equal the native portable path's (VAE_FAST_CPU_ISA=generic): bitwise, except float64, where glibc's
libm picks its FMA or SSE2 variant by CPU and last bits may differ.
Needs qemu-x86_64 (Debian: qemu-user; .ci/run installs it) and an x86-64 host.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(
    QEMU is None or platform.machine() != "x86_64", reason="needs qemu-x86_64 (apt-get install qemu-user) on x86-64"
)

RUN = r"""
import sys, torch, vae_fast
from vae_fast import _extension
g = torch.Generator().manual_seed(0)
out = {"isa": _extension._C.cpu_isa()}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    r = (torch.randn(4, 5000, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    p = torch.rand(4, 5000, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    x = torch.rand(4, 5000, generator=g, dtype=torch.float64).to(dtype)
    mu = torch.randn(4, 20, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    lv = torch.randn(4, 20, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    z = vae_fast.reparameterize(mu, lv, generator=torch.Generator().manual_seed(1))
    loss = vae_fast.vae_loss(r, x, z, lv, logits=True, beta=0.5) + vae_fast.vae_loss(p, x, mu, lv)
    (loss * 1.5).backward()
    out[str(dtype)] = [t.detach() for t in (loss, z, r.grad, p.grad, mu.grad, lv.grad)]
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


def test_the_emulated_cpu_faults_on_avx2(tmp_path):
    source, binary = tmp_path / "avx2.cpp", tmp_path / "avx2"
    source.write_text('#include <cstdio>\nint main(int argc, char**) { int out = 0;\n'
                      'asm volatile("vmovd %1, %%xmm0\\n\\tvpaddd %%ymm0, %%ymm0, %%ymm0\\n\\tvmovd %%xmm0, %0\\n\\tvzeroupper"'
                      ' : "=r"(out) : "r"(argc) : "xmm0");\nstd::printf("%d\\n", out); }\n')
    subprocess.run([os.environ.get("CXX", "c++"), str(source), "-o", str(binary)], check=True)
    assert subprocess.run([QEMU, "-cpu", "Nehalem", str(binary)], capture_output=True).returncode != 0


def test_portable_kernels_run_without_avx_and_match_the_native_portable_path(tmp_path):
    emulated = _run(tmp_path, "nehalem", [QEMU, "-cpu", "Nehalem"], {})
    native = _run(tmp_path, "native", [], {"VAE_FAST_CPU_ISA": "generic"})
    assert emulated["isa"] == "generic" and native["isa"] == "generic"
    for dtype in ("torch.float32", "torch.float64", "torch.bfloat16", "torch.float16"):
        assert torch.isfinite(emulated[dtype][0]), dtype  # the loss (float16 gradients may overflow: issue 9)
        for i, (a, b) in enumerate(zip(emulated[dtype], native[dtype])):
            if dtype == "torch.float64":
                assert torch.allclose(a, b, rtol=1e-13, atol=0), (dtype, i)
            else:
                assert torch.equal(a, b), (dtype, i)
