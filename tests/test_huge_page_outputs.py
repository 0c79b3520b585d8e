"""Large CPU outputs (>= 32 MiB) of the ops live in memory mapped for 2 MiB pages
(csrc/cpu/huge_page_output.cpp): the same values as any other allocation, back to the system when
the tensor dies, resizable and saveable like an at::empty tensor; VAE_FAST_HUGE_PAGES=0 turns it off."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vae_fast
from vae_fast import _extension

pytestmark = pytest.mark.skipif(not _extension.serves(torch.device("cpu")), reason="the extension's allocation")

HUGE_PAGE = 2 << 20
ROWS, FEATURES, LATENT = 11_000, 784, 20  # recon's gradient: 34.5 MB, over the 32 MiB threshold


def _inputs(rows: int = ROWS):
    g = torch.Generator().manual_seed(0)
    recon = torch.rand(rows, FEATURES, generator=g).clamp_(0.01, 0.99).requires_grad_()
    x = torch.rand(rows, FEATURES, generator=g)
    mu = torch.randn(rows, LATENT, generator=g).requires_grad_()
    logvar = torch.randn(rows, LATENT, generator=g).requires_grad_()
    return recon, x, mu, logvar


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mmap and /proc are Linux's")
def test_large_gradient_is_on_a_huge_page_boundary_and_right():
    recon, x, mu, logvar = _inputs()
    vae_fast.vae_loss(recon, x, mu, logvar, reduction="sum").backward()
    assert recon.grad.data_ptr() % HUGE_PAGE == 0
    # Per element the gradient depends on its own inputs: each half computed alone (17 MB, at::empty)
    # gives the same bits.
    half = ROWS // 2
    for rows in (slice(0, half), slice(half, ROWS)):
        r = recon.detach()[rows].clone().requires_grad_()
        vae_fast.vae_loss(r, x[rows], mu.detach()[rows], logvar.detach()[rows], reduction="sum").backward()
        assert torch.equal(r.grad, recon.grad[rows])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mmap and /proc are Linux's")
def test_large_output_memory_goes_back_when_the_tensor_dies():
    recon, x, mu, logvar = _inputs()
    before = _resident_bytes()
    grad = torch.autograd.grad(vae_fast.vae_loss(recon, x, mu, logvar), recon)[0]
    grown = _resident_bytes() - before
    assert grown > 30e6, grown  # the 34.5 MB gradient, written by the kernel
    del grad
    assert _resident_bytes() - before < 4e6


def test_large_output_resizes_accumulates_and_saves(tmp_path):
    recon, x, mu, logvar = _inputs()
    vae_fast.vae_loss(recon, x, mu, logvar).backward()
    first = recon.grad.clone()
    vae_fast.vae_loss(recon, x, mu, logvar).backward()  # accumulated in place into the same memory
    assert torch.equal(recon.grad, first + first)
    torch.save(recon.grad, tmp_path / "grad.pt")
    assert torch.equal(torch.load(tmp_path / "grad.pt"), first + first)
    grad = recon.grad
    grad.resize_(ROWS + 1000, FEATURES)  # into new memory, the old contents kept
    assert torch.equal(grad[:ROWS], first + first)


def test_reparameterize_large_sample_is_the_small_path_s():
    mu = torch.randn(2**17, 64)  # z: 33.6 MB
    logvar = torch.randn(2**17, 64)
    z = vae_fast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(3))
    assert z.data_ptr() % HUGE_PAGE == 0
    # the noise is a pure function of (seed, element): the first rows drawn alone (a small output) agree
    small = vae_fast.reparameterize(mu[:1000], logvar[:1000], generator=torch.Generator().manual_seed(3))
    assert torch.equal(small, z[:1000])


def _thp_available() -> bool:
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in setting


@pytest.mark.skipif(not _thp_available(), reason="the kernel has transparent huge pages off")
def test_the_kernel_backs_it_with_huge_pages():
    def anon_huge_bytes() -> int:
        text = Path("/proc/self/smaps_rollup").read_text()
        return int(re.search(r"AnonHugePages:\s+(\d+) kB", text).group(1)) * 1024

    recon, x, mu, logvar = _inputs()
    before = anon_huge_bytes()
    grad = torch.autograd.grad(vae_fast.vae_loss(recon, x, mu, logvar), recon)[0]
    assert anon_huge_bytes() - before >= 16 * HUGE_PAGE  # most of the 34.5 MB (the kernel may fall back for some)
    del grad


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is Linux's")
def test_vae_fast_huge_pages_0_turns_it_off():
    code = (
        "import torch, vae_fast\n"
        "recon = torch.rand(11000, 784).clamp_(0.01, 0.99).requires_grad_()\n"
        "vae_fast.vae_loss(recon, torch.rand(11000, 784), torch.zeros(11000, 20), torch.zeros(11000, 20)).backward()\n"
        "print(recon.grad.data_ptr() % (2 << 20))\n"
    )
    env = {**os.environ, "VAE_FAST_HUGE_PAGES": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out) != 0  # glibc's mmapped block starts after its header, never on a 2 MiB boundary


def test_large_output_under_inference_mode_and_no_grad():
    mu, logvar = torch.randn(2**17, 64), torch.randn(2**17, 64)
    with torch.inference_mode():
        z = vae_fast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(5))
    assert z.is_inference() and z.data_ptr() % HUGE_PAGE == 0
    with torch.no_grad():
        again = vae_fast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(5))
    assert torch.equal(z, again)
