"""The CPU kernels of each instruction set this CPU runs (avx2, avx512; VAE_FAST_CPU_ISA picks one per
process) against the portable build (VAE_FAST_CPU_ISA=generic): every likelihood, probabilities and
logits, the scale layouts, the three reductions, four dtypes, and reparameterize, forward and backward.

The builds differ in their math (hand-written AVX2 exp/log, at::vec's Sleef lanes, libm in the
portable lanes) and in their lane width (the order of the partial sums), so the comparison is within a
bound, not bitwise: float32 within a few times the accuracy table's 1e-5 per element (two results each
within 1e-5 of the float64 oracle), float64 within 1e-12, half types within their own rounding. The
tolerances are relative to the largest magnitude of each result, since the per-sample losses of the
Gaussian and Laplace likelihoods are sums of terms of both signs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Per dtype: bound on |isa - generic| / max |generic| of one result tensor.
TOLERANCE = {torch.float32: 5e-5, torch.float64: 1e-12, torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11}

# Runs in a subprocess (the instruction set is read once per process): every case's results into the
# file named by argv[1], with the instruction set the process ran.
SCRIPT = r"""
import sys
import torch
import vae_fast

B, D, L = 6, 37, 20  # 37 = two AVX-512 / four AVX2 float vectors and a tail; 20 latents likewise
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def loss_cases(gen):
    def u(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    def n(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s
    binary_and_soft = torch.cat([(u(B // 2, D) > 0.5).double(), u(B - B // 2, D)])
    counts = torch.poisson(u(B, D, hi=8.0), generator=gen)
    counts[0, :5] = 0.0
    yield "bernoulli-probs", dict(recon=u(B, D, lo=1e-3, hi=1 - 1e-3), x=binary_and_soft), {}
    yield "bernoulli-logits", dict(recon=n(B, D, s=4.0), x=binary_and_soft), dict(logits=True)
    for likelihood in ("gaussian", "laplace"):
        x = n(B, D)
        yield f"{likelihood}-shared", dict(recon=x + n(B, D, s=0.5), x=x), dict(likelihood=likelihood, log_scale=0.3)
        yield f"{likelihood}-per-element", dict(recon=x + n(B, D, s=0.5), x=x, log_scale=n(B, D, s=0.5)), dict(likelihood=likelihood)
    yield "poisson", dict(recon=n(B, D), x=counts), dict(likelihood="poisson")
    yield "nb", dict(recon=n(B, D), x=counts, log_theta=n(D)), dict(likelihood="nb")
    yield "zinb", dict(recon=n(B, D), x=counts, log_theta=n(D), zi_logits=n(B, D, s=2.0)), dict(likelihood="zinb")


def run_loss(tensors, kwargs, dtype, reduction, latents):
    leaves = {k: v.to(dtype).requires_grad_(k != "x") for k, v in {**tensors, **latents}.items()}
    extra = {k: leaves[k] for k in ("log_scale", "log_theta", "zi_logits") if k in leaves}
    loss = vae_fast.vae_loss(leaves["recon"], leaves["x"], leaves["mu"], leaves["logvar"], reduction=reduction,
                             **extra, **kwargs)
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], torch.ones_like(loss))
    return {"loss": loss.detach(), **{f"d_{k}": g for k, g in zip(names, grads)}}


def run_reparameterize(dtype, gen):
    mu = torch.randn(B, L, generator=gen).to(dtype).requires_grad_()
    logvar = torch.randn(B, L, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(B, L, generator=gen).to(dtype)
    z = vae_fast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(7))
    d_mu, d_logvar = torch.autograd.grad(z, [mu, logvar], weight)
    return {"z": z.detach(), "d_mu": d_mu, "d_logvar": d_logvar}


gen = torch.Generator().manual_seed(0)
latents = dict(mu=torch.randn(B, L, generator=gen, dtype=torch.float64),
               logvar=torch.randn(B, L, generator=gen, dtype=torch.float64))
results = {}
for name, tensors, kwargs in list(loss_cases(gen)):
    for dtype in DTYPES:
        for reduction in ("none", "sum", "mean"):
            results[(name, dtype, reduction)] = run_loss(tensors, kwargs, dtype, reduction, latents)
for dtype in DTYPES:
    results[("reparameterize", dtype, "")] = run_reparameterize(dtype, torch.Generator().manual_seed(1))
torch.save({"isa": vae_fast.backend_info()["extension"]["cpu_isa"], "results": results}, sys.argv[1])
"""


def run_on(isa: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{isa}.pt"
    env = dict(os.environ, VAE_FAST_CPU_ISA=isa)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def generic(tmp_path_factory):
    import vae_fast

    if vae_fast.backend_info()["extension"]["cpu_isa"] is None:
        pytest.skip("the extension is not loaded: this compares its kernels")
    ran = run_on("generic", tmp_path_factory.mktemp("generic"))
    assert ran["isa"] == "generic"
    return ran["results"]


def differences(results: dict, reference: dict) -> list[str]:
    """One line per result tensor beyond its dtype's bound (or differing in shape, dtype or NaNs)."""
    out = []
    for case, tensors in reference.items():
        for name, expected in tensors.items():
            actual = results[case][name]
            label = f"{case[0]} {str(case[1])[6:]} {case[2]} {name}"
            if actual.shape != expected.shape or actual.dtype != expected.dtype:
                out.append(f"{label}: {actual.shape} {actual.dtype} vs {expected.shape} {expected.dtype}")
                continue
            a, e = actual.double(), expected.double()
            if not torch.equal(a.isnan(), e.isnan()):
                out.append(f"{label}: NaN in one build only")
                continue
            scale = e.nan_to_num().abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
            error = float(((a - e).nan_to_num().abs() / scale).max())
            if error > TOLERANCE[expected.dtype]:
                out.append(f"{label}: {error:.3g} of the largest magnitude (bound {TOLERANCE[expected.dtype]:.3g})")
    return out


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_isa_matches_the_portable_build(isa, generic, tmp_path):
    ran = run_on(isa, tmp_path)
    if ran["isa"] != isa:
        pytest.skip(f"this CPU (or build) runs {ran['isa']} when asked for {isa}")
    assert set(ran["results"]) == set(generic)
    assert differences(ran["results"], generic) == []
