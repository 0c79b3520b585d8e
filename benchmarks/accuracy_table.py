"""Accuracy table (issue 11): the largest relative error of vae_fast's float32 CPU loss and gradients
against a float64 oracle, one row per approximation the kernels make, per instruction set.

    python benchmarks/accuracy_table.py                       # benchmarks/results/accuracy-cpu-<date>.md
    python benchmarks/accuracy_table.py --points 500 --out /tmp/acc.md

Everything goes through the public op, `vae_fast.vae_loss(..., reduction="none")`, and its gradients
(torch.autograd.grad), on float32 inputs. The oracle is written here from the formulas with float64
torch ops and torch.distributions (not vae_fast.reference), evaluated on the same float32 inputs
converted exactly to float64. Error = |float32 result - oracle| / max(|oracle|, TINY), TINY = float32's
smallest normal number (below it float32 itself holds no relative precision, so the error there is
absolute, in units of TINY). Points whose oracle is beyond float32's largest finite value are left
out (counted in the notes): no float32 result can represent them.

Each row isolates one approximation by its inputs: one subject element per sample, every other input
neutral (mu = logvar = 0, whose KL is exactly 0, unless the KL is the subject). Two paths per
instruction set, because the kernels have two:
- "lanes": the subject is element 0 of a row of 16 features (or latents) whose other 15 are neutral
  padding (Bernoulli p = 1, x = 1; logit -200, x = 0; Gaussian/Laplace x = recon; mu = logvar = 0), so
  it runs in the vector body, with the AVX2 build's Cephes exp/log, Goldberg log1p, exp_nonpos,
  log1p_unit series and rcp+Newton reciprocal (csrc/cpu/avx2_math.h), at::vec's 512-bit (Sleef) lanes
  in the AVX-512 build, or at::vec's lanes in the generic build;
- "tail": one feature (recon [N, 1]), which the kernels finish in their scalar tail loop with libm's
  expf/logf/log1pf and a true division: a model whose width is not a multiple of 8 uses it for its
  last elements.
The other instruction sets are measured in subprocesses with VAE_FAST_CPU_ISA set to each (read once
per process); one this CPU lacks is left out of the table.

Where the quantity is a sum or difference of terms of opposite sign (d/dx = log(1-p) - log p near
p = 1/2; the Gaussian/Laplace loss, whose terms are the residual term, s and the constant, where s < 0
and they cancel; d/d log_scale = 1 - z^2 near z^2 = 1), its condition number kappa = sum |terms| /
|result| multiplies any rounding of the terms: float32 terms carry ~6e-8 relative each, so no float32
evaluation of the formula keeps 1e-5 once kappa passes ~100. Those points get their own rows
("cancellation"), so that a row's maximum says which of the two it measures; the failing list at the
end of the report gives kappa at the worst point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import vae_fast

F32 = torch.finfo(torch.float32)
TINY = F32.tiny
THRESHOLD = 1e-5
# Cancellation rows: error / kappa, 16 float32 unit roundoffs (2^-24 each): a few correctly rounded
# operations before the final sum or difference.
ROUNDING_BOUND = 16 * 2.0 ** -24
KAPPA_SPLIT = 100.0
LANES = 16  # a padded row: one AVX-512 float vector, two AVX2 ones, at::vec's generic lanes too
PATHS = ("lanes", "tail")
ISAS = ("avx512", "avx2", "generic")
LOG_CLAMP = -100.0  # torch's binary_cross_entropy clamps its logs here ...
DENOMINATOR_CLAMP = 1e-12  # ... and its gradient's p (1 - p) here
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
ULP_1 = 2.0**-24  # spacing of float32 just below 1 (and half the spacing just above 1/2)
# Factors that put a probe a few float32 steps to either side of a zero (one of the loss or of
# d/ds), where the cancellation rows are measured.
NEAR_ZERO = torch.tensor([1 + k * 2.0**-20 for k in range(-2, 3)], dtype=torch.float64)


@dataclass
class Quantity:
    """One measured quantity of one sweep: the float32 results, the oracle, the inputs to name the
    worst point, and optionally each point's condition number."""

    key: str
    approximation: str
    formula: str
    inputs: str
    actual: torch.Tensor
    oracle: torch.Tensor
    labels: dict
    kappa: torch.Tensor | None = None
    note: str = ""

    def __post_init__(self):
        self.actual, self.oracle = self.actual.detach(), self.oracle.detach()


def f32(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).to(torch.float32).flatten()


def unique_sorted(t: torch.Tensor) -> torch.Tensor:
    return torch.unique(t[torch.isfinite(t)])


def log_sweep(lo_exp: float, hi_exp: float, n: int) -> torch.Tensor:
    return torch.logspace(lo_exp, hi_exp, max(n, 2), dtype=torch.float64)


def padded(subject: torch.Tensor, pad: float, path: str) -> torch.Tensor:
    width = 1 if path == "tail" else LANES
    out = torch.full((subject.numel(), width), pad, dtype=torch.float32)
    out[:, 0] = subject
    return out


def call(recon, x, mu, logvar, wrt, **kwargs):
    """vae_fast.vae_loss(..., reduction="none") and the gradients of its [B] losses (grad_output 1)
    with respect to the tensors named in `wrt`."""
    leaves = {"recon": recon, "x": x, "mu": mu, "logvar": logvar}
    if isinstance(kwargs.get("log_scale"), torch.Tensor):
        leaves["log_scale"] = kwargs["log_scale"]
    for name in wrt:
        leaves[name].requires_grad_(True)
    loss = vae_fast.vae_loss(recon, x, mu, logvar, reduction="none", **kwargs)
    grads = torch.autograd.grad(loss, [leaves[n] for n in wrt], torch.ones_like(loss)) if wrt else ()
    return loss.detach(), dict(zip(wrt, grads))


def neutral_latents(n: int, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    zero = padded(torch.zeros(n), 0.0, path)
    return zero, zero.clone()


# ---- the float64 oracle ----

def clamped_log(v: torch.Tensor) -> torch.Tensor:
    return torch.log(v).clamp_min(LOG_CLAMP)


def clamped_log1m(v: torch.Tensor) -> torch.Tensor:
    return torch.log1p(-v).clamp_min(LOG_CLAMP)


def expm1_minus_x(lv: torch.Tensor) -> torch.Tensor:
    """e^lv - 1 - lv in float64: expm1(lv) - lv cancels below |lv| ~ 1e-3 even in float64, so there
    the Taylor series to lv^6 (truncation < 1e-15 relative)."""
    series = lv * lv * (1 / 2 + lv * (1 / 6 + lv * (1 / 24 + lv * (1 / 120 + lv * (1 / 720)))))
    return torch.where(lv.abs() < 1e-3, series, torch.expm1(lv) - lv)


def kl_oracle(mu: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mu * mu + expm1_minus_x(lv))


def softplus_minus_xr(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """softplus(r) - x r = max(r, 0) - x r + log1p(e^-|r|), the first part without cancellation."""
    return torch.where(r >= 0, (1 - x) * r, -x * r) + torch.log1p(torch.exp(-r.abs()))


def location_scale_nll(likelihood: str, m, x, s):
    scale = torch.exp(s)
    dist = torch.distributions.Normal(m, scale) if likelihood == "gaussian" else torch.distributions.Laplace(m, scale)
    return -dist.log_prob(x)


def location_scale_oracle(likelihood: str, m32, x32, s32, wrt=("recon", "log_scale")):
    """Row losses and gradients in float64 by autograd through torch.distributions."""
    m, x, s = (t.double().requires_grad_(True) for t in (m32, x32, s32))
    rows = location_scale_nll(likelihood, m, x, s.expand_as(m) if s.numel() == 1 else s).sum(dim=1)
    grads = torch.autograd.grad(rows.sum(), [{"recon": m, "log_scale": s}[n] for n in wrt])
    return rows.detach(), dict(zip(wrt, grads))


# ---- the sweeps ----

def bernoulli_probabilities(points: int, path: str) -> list[Quantity]:
    p = unique_sorted(torch.cat([
        f32(log_sweep(-45, 0, points)),
        f32(1 - ULP_1 * torch.arange(1, points // 8 + 2, dtype=torch.float64)),  # the last floats below 1
        f32(0.5 + ULP_1 * torch.arange(-64, 65, dtype=torch.float64)),  # around 1/2, where d/dx = 0
        f32([0.0, 1.0, math.exp(-100), 1e-12, 1 - 1e-7, 0.25, 0.75]),
    ]))
    n = p.numel()
    p2 = torch.cat([p, p])
    x2 = torch.cat([torch.ones(n), torch.zeros(n)])
    recon, target = padded(p2, 1.0, path), padded(x2, 1.0, path)
    mu, lv = neutral_latents(2 * n, path)
    loss, g = call(recon, target, mu, lv, ("recon", "x"))
    pd, xd = p2.double(), x2.double()
    ones = slice(0, n)
    zeros = slice(n, 2 * n)
    log_1mp, log_p = clamped_log1m(pd), clamped_log(pd)
    d_target = log_1mp - log_p
    labels = {"p": p2, "x": x2}
    clamp_note = ("p < e^-100 = 3.7e-44 (and p = 0): the log is clamped at -100 as in torch's "
                  "binary_cross_entropy; measured against the clamped formula there")
    sub = lambda labels_, s: {k: v[s] for k, v in labels_.items()}  # noqa: E731
    return [
        Quantity("bce_log", "Cephes log (log_prob_clamped_: AVX2 lanes specialized to p in [0, 1])", "x = 1: -max(log p, -100)", "p in [1e-45, 1] log-spaced, the floats next to 1, p = 0",
                 loss[ones], -log_p[ones], sub(labels, ones), note=clamp_note),
        Quantity("bce_log1p", "Goldberg log1p (log1m_prob_clamped_: AVX2 lanes specialized to p in [0, 1])", "x = 0: -max(log1p(-p), -100)", "p in [1e-45, 1] log-spaced, the floats next to 1, p = 1",
                 loss[zeros], -log_1mp[zeros], sub(labels, zeros), note="p = 1: log1p(-1) clamped at -100 (loss 100)"),
        Quantity("bce_recip", "rcp + Newton reciprocal (recip_)", "d/dp = (p - x) / max(p (1 - p), 1e-12)", "same p, x in {0, 1}",
                 g["recon"][:, 0], (pd - xd) / (pd * (1 - pd)).clamp_min(DENOMINATOR_CLAMP), labels,
                 note="p (1 - p) < 1e-12: the denominator is clamped at 1e-12 as in torch's backward; measured against the clamped formula"),
        Quantity("bce_dx", "log1m_prob_clamped_ - log_prob_clamped_", "d/dx = max(log1p(-p), -100) - max(log p, -100)", "same p, x in {0, 1}",
                 g["x"][:, 0], d_target, labels, kappa=(log_1mp.abs() + log_p.abs()) / d_target.abs()),
    ]


def bernoulli_logits(points: int, path: str) -> list[Quantity]:
    specials = [0.0, 20.0, 87.33654, 87.34, 88.0, 88.72, 89.0, 103.97, 104.0, 150.0, 200.0]
    r = unique_sorted(torch.cat([
        f32(torch.linspace(-200, 200, points, dtype=torch.float64)),
        f32(log_sweep(-30, 0, points // 4)), -f32(log_sweep(-30, 0, points // 4)),
        f32(specials), -f32(specials),
    ]))
    n = r.numel()
    r2 = torch.cat([r, r])
    x2 = torch.cat([torch.zeros(n), torch.ones(n)])
    recon, target = padded(r2, -200.0, path), padded(x2, 0.0, path)
    mu, lv = neutral_latents(2 * n, path)
    loss, g = call(recon, target, mu, lv, ("recon",), logits=True)
    rd, xd = recon.double(), target.double()
    oracle_loss = softplus_minus_xr(rd, xd).sum(dim=1)
    oracle_grad = (1 - xd[:, 0]) * torch.sigmoid(rd[:, 0]) - xd[:, 0] * torch.sigmoid(-rd[:, 0])
    labels = {"r": r2, "x": x2}
    return [
        Quantity("logits_loss", "exp_nonpos + log1p_unit series", "softplus(r) - x r = [r >= 0 ? (1 - x) r : -x r] + log1p(e^-|r|)",
                 "r in [-200, 200] linear, |r| in [1e-30, 1] log-spaced, +-88, +-104, x in {0, 1}", loss, oracle_loss, labels),
        Quantity("logits_grad", "exp_nonpos + rcp + Newton (sigmoid)", "d/dr = (1 - x) sigmoid(r) - x sigmoid(-r)",
                 "same r, x", g["recon"][:, 0], oracle_grad, labels),
    ]


def kl_sweeps(points: int, path: str) -> list[Quantity]:
    lv = unique_sorted(torch.cat([
        f32(torch.linspace(-80, 88, points, dtype=torch.float64)),
        f32(log_sweep(-30, 0, points // 2)), -f32(log_sweep(-30, 0, points // 2)),
        f32([0.0, 0.1, -0.1, 0.09999999, -0.09999999, 0.10000001, -0.10000001, 88.0, -80.0]),
    ]))
    mu_sweep = unique_sorted(torch.cat([f32(log_sweep(-30, 19, points)), -f32(log_sweep(-30, 19, points)), f32([0.0])]))
    n_lv, n_mu = lv.numel(), mu_sweep.numel()
    mu = padded(torch.cat([torch.zeros(n_lv), mu_sweep]), 0.0, path)
    logvar = padded(torch.cat([lv, torch.zeros(n_mu)]), 0.0, path)
    n = n_lv + n_mu
    recon, target = torch.ones(n, 1), torch.ones(n, 1)  # Bernoulli p = 1, x = 1: exactly 0
    loss, g = call(recon, target, mu, logvar, ("mu", "logvar"))
    md, ld = mu.double(), logvar.double()
    oracle = kl_oracle(md, ld).sum(dim=1)
    a, b = slice(0, n_lv), slice(n_lv, n)
    lv_labels = {"logvar": lv}
    mu_labels = {"mu": mu_sweep}
    return [
        Quantity("kl_logvar", "expm1 - lv, Taylor series below |lv| = 0.1", "mu = 0: 0.5 (e^lv - 1 - lv)",
                 "logvar in [-80, 88] linear, |logvar| in [1e-30, 1] log-spaced", loss[a], oracle[a], lv_labels),
        Quantity("kl_dlogvar", "expm1 (expm1_)", "d/dlogvar = 0.5 (e^lv - 1)", "same logvar",
                 g["logvar"][a, 0], 0.5 * torch.expm1(ld[a, 0]), lv_labels),
        Quantity("kl_mu", "(none: mu^2)", "logvar = 0: 0.5 mu^2", "|mu| in [1e-30, 1e19] log-spaced, 0",
                 loss[b], oracle[b], mu_labels),
        Quantity("kl_dmu", "(none: mu)", "d/dmu = mu", "same mu", g["mu"][b, 0], md[b, 0], mu_labels),
    ]


def location_scale_sweep_values(likelihood: str, points: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s in [-20, 20] and residuals +-[1e-30, 1e30] (with 1 and 0), on a grid of about `points`
    (s, u) pairs per sign; plus the residuals next to the zeros of the loss at s = -1 (where
    s + constant < 0) and of d/ds at s = 0 and -1 (z^2 or |z| = the row's width), where cancellation
    is worst; and the residual whose z^2 overflows float32 though 0.5 z^2 does not."""
    n_s = max(5, int(math.sqrt(points / 2)))
    constant = HALF_LOG_2PI if likelihood == "gaussian" else math.log(2.0)
    s = unique_sorted(torch.cat([f32(torch.linspace(-20, 20, n_s, dtype=torch.float64)), f32([0.0, -constant, -1.0])]))
    mags = f32(log_sweep(-30, 30, max(4, points // (2 * n_s))))
    # |z| (= |u| e^-s) where the loss (at s = -1) and d/ds cross zero, for a row of this width and
    # for a single element (the per-element d/ds_i)
    z_zero = []
    for w in sorted({1, width}):
        if likelihood == "gaussian":
            z_zero += [math.sqrt(2 * w * (1 - constant)), math.sqrt(w)]
        else:
            z_zero += [w * (1 - constant), float(w)]
    probes = torch.cat([f32(z * math.exp(s0) * NEAR_ZERO) for z in z_zero for s0 in (0.0, -1.0)])
    # z = sqrt(1.5 FLT_MAX): z^2 overflows float32 while the Gaussian's 0.5 z^2 does not
    probes = torch.cat([probes, f32([math.sqrt(1.5 * F32.max) * math.exp(s0) for s0 in (0.0, -1.0)])])
    u = unique_sorted(torch.cat([mags, -mags, f32([0.0, 1.0, -1.0]), probes]))
    return s, u


def location_scale(likelihood: str, points: int, path: str) -> list[Quantity]:
    """Shared log_scale tensor s of shape (1,): the loss and d/drecon of every residual with one call
    per s, d/ds (a sum over the whole batch) with one call per (s, residual)."""
    constant = HALF_LOG_2PI if likelihood == "gaussian" else math.log(2.0)
    width = 1 if path == "tail" else LANES
    s_values, u = location_scale_sweep_values(likelihood, points, width)
    loss_a, loss_o, dm_a, dm_o, ds_a, ds_o, lab_s, lab_u = ([] for _ in range(8))
    loss_k, ds_k = [], []
    for s in s_values.tolist():
        m = padded(torch.zeros(u.numel()), 0.0, path)
        x = padded(u, 0.0, path)  # residual x - m = u in element 0, 0 elsewhere
        log_scale = torch.tensor([s], dtype=torch.float32)
        mu, lv = neutral_latents(u.numel(), path)
        loss, g = call(m, x, mu, lv, ("recon",), likelihood=likelihood, log_scale=log_scale)
        o_loss, o_g = location_scale_oracle(likelihood, m, x, log_scale, wrt=("recon",))
        loss_a.append(loss)
        loss_o.append(o_loss)
        dm_a.append(g["recon"][:, 0])
        dm_o.append(o_g["recon"][:, 0])
        ud = u.double()
        term = (ud * math.exp(-s)) ** 2 / 2 if likelihood == "gaussian" else ud.abs() * math.exp(-s)
        loss_k.append((term + width * (abs(s) + constant)) / o_loss.abs())
        for j in range(u.numel()):
            scale_j = log_scale.clone()
            loss_j, g_j = call(m[j:j + 1], x[j:j + 1], mu[j:j + 1], lv[j:j + 1], ("log_scale",),
                               likelihood=likelihood, log_scale=scale_j)
            _, o_j = location_scale_oracle(likelihood, m[j:j + 1], x[j:j + 1], log_scale, wrt=("log_scale",))
            ds_a.append(g_j["log_scale"].reshape(1))
            ds_o.append(o_j["log_scale"].reshape(1))
        ds_term = 2 * term if likelihood == "gaussian" else term  # |d term / ds|
        ds_k.append((width + ds_term) / (width - ds_term).abs())
        lab_s.append(torch.full_like(u, s))
        lab_u.append(u)
    labels = {"s": torch.cat(lab_s), "u": torch.cat(lab_u)}
    name = "Gaussian" if likelihood == "gaussian" else "Laplace"
    key = likelihood
    nll = "0.5 (u e^-s)^2 + s + 0.5 log(2 pi)" if likelihood == "gaussian" else "|u| e^-s + s + log 2"
    dm = "-u e^-2s" if likelihood == "gaussian" else "-sign(u) e^-s"
    ds = "1 - (u e^-s)^2" if likelihood == "gaussian" else "1 - |u| e^-s"
    ranges = "s in [-20, 20], u = x - recon in +-[1e-30, 1e30] log-spaced, 0, +-1"
    exp_note = "shared s: r = e^-s is hoisted, computed once per call with the scalar expf"
    return [
        Quantity(f"{key}_loss", f"{name}: inverse_scale e^-s (scalar expf), float32 products", f"row sum of {nll}", ranges,
                 torch.cat(loss_a), torch.cat(loss_o), labels, kappa=torch.cat(loss_k), note=exp_note),
        Quantity(f"{key}_drecon", f"{name}: inverse_scale", f"d/drecon = {dm}", "same", torch.cat(dm_a), torch.cat(dm_o), labels),
        Quantity(f"{key}_dlogscale", f"{name}: inverse_scale, summed over the row", f"d/ds = sum over the row of {ds}", "same, one call per (s, u)",
                 torch.cat(ds_a), torch.cat(ds_o), labels, kappa=torch.cat(ds_k)),
    ]


def per_element_loss_zero(likelihood: str, width: int) -> tuple[float, float]:
    """(s, |z|) of a zero of the row loss with a per-element log_scale, s on element 0 only: the
    width - 1 padding elements (s = 0, u = 0) add the constant each, unlike a shared s, so the row
    term + s + width * constant crosses zero only below s = -width * constant. At s = -1 - width *
    constant that is where the residual term is 1."""
    constant = HALF_LOG_2PI if likelihood == "gaussian" else math.log(2.0)
    return -1.0 - width * constant, math.sqrt(2.0) if likelihood == "gaussian" else 1.0


def location_scale_per_element(likelihood: str, points: int, path: str) -> list[Quantity]:
    """log_scale of recon's shape: e^-s is taken per element in the vector body (the AVX2 build's
    Cephes exp, the only place the loss uses it), d/ds per element. The grid of the shared-s sweep,
    plus the residuals next to the loss's zero (per_element_loss_zero), which that grid misses in a
    padded row."""
    width = 1 if path == "tail" else LANES
    s_values, u = location_scale_sweep_values(likelihood, points, width)
    s_zero, z_zero = per_element_loss_zero(likelihood, width)
    u_zero = f32(z_zero * math.exp(s_zero) * NEAR_ZERO)
    s_values = unique_sorted(torch.cat([s_values, f32([s_zero])]))
    u = unique_sorted(torch.cat([u, u_zero, -u_zero]))
    s_grid = s_values.repeat_interleave(u.numel())
    u_grid = u.repeat(s_values.numel())
    m = padded(torch.zeros(u_grid.numel()), 0.0, path)
    x = padded(u_grid, 0.0, path)
    log_scale = padded(s_grid, 0.0, path)
    mu, lv = neutral_latents(u_grid.numel(), path)
    loss, g = call(m, x, mu, lv, ("log_scale",), likelihood=likelihood, log_scale=log_scale)
    o_loss, o_g = location_scale_oracle(likelihood, m, x, log_scale, wrt=("log_scale",))
    constant = HALF_LOG_2PI if likelihood == "gaussian" else math.log(2.0)
    ud, sd = u_grid.double(), s_grid.double()
    term = (ud * torch.exp(-sd)) ** 2 / 2 if likelihood == "gaussian" else ud.abs() * torch.exp(-sd)
    ds_term = 2 * term if likelihood == "gaussian" else term
    name = "Gaussian" if likelihood == "gaussian" else "Laplace"
    labels = {"s": s_grid, "u": u_grid}
    ds = "1 - (u e^-s)^2" if likelihood == "gaussian" else "1 - |u| e^-s"
    return [
        Quantity(f"{likelihood}_elem_loss", f"{name}, per-element s: exp (exp_) per element", "row sum, per-element s",
                 "same grid", loss, o_loss, labels, kappa=(term + sd.abs() + width * constant) / o_loss.abs()),
        Quantity(f"{likelihood}_elem_dlogscale", f"{name}, per-element s: exp (exp_) per element", f"d/ds_i = {ds}", "same grid",
                 g["log_scale"][:, 0], o_g["log_scale"][:, 0], labels, kappa=(1 + ds_term) / (1 - ds_term).abs()),
    ]


def summed_losses() -> list[Quantity]:
    """B = 4096, D = 784, L = 20 random inputs, reduction "sum": the relative error of the sum."""
    gen = torch.Generator().manual_seed(11)
    B, D, L = 4096, 784, 20
    mu = torch.randn(B, L, generator=gen)
    lv = torch.randn(B, L, generator=gen)
    kl = kl_oracle(mu.double(), lv.double()).sum()
    out = []
    cases = {
        "bernoulli": (torch.rand(B, D, generator=gen).clamp(1e-6, 1 - 1e-6), torch.rand(B, D, generator=gen), {}),
        "bernoulli logits": (3 * torch.randn(B, D, generator=gen), torch.rand(B, D, generator=gen), {"logits": True}),
        "gaussian": (torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen), {"likelihood": "gaussian", "log_scale": torch.tensor([-1.0])}),
        "laplace": (torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen), {"likelihood": "laplace", "log_scale": torch.tensor([-1.0])}),
    }
    for name, (recon, x, kwargs) in cases.items():
        with torch.no_grad():
            actual = vae_fast.vae_loss(recon, x, mu, lv, reduction="sum", **kwargs).reshape(1)
        rd, xd = recon.double(), x.double()
        if name == "bernoulli":
            rec = -(xd * clamped_log(rd) + (1 - xd) * clamped_log1m(rd)).sum()
        elif name == "bernoulli logits":
            rec = softplus_minus_xr(rd, xd).sum()
        else:
            rec = location_scale_nll(name, rd, xd, kwargs["log_scale"].double().expand_as(rd)).sum()
        out.append(Quantity(f"sum_{name.replace(' ', '_')}", "all, summed", f"{name}: sum over the batch of NLL + KL",
                            f"B = {B}, D = {D}, L = {L} random", actual, (rec + kl).reshape(1), {"seed": torch.tensor([11.0])}))
    return out


# ---- measuring ----

def relative_errors(actual: torch.Tensor, oracle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point: the error and whether the point is kept (oracle finite in float32)."""
    actual = actual.double().flatten()
    oracle = oracle.double().flatten()
    keep = oracle.abs() <= F32.max
    err = (actual - oracle).abs() / oracle.abs().clamp_min(TINY)
    err = torch.where(torch.isnan(err) | torch.isinf(actual), torch.full_like(err, math.inf), err)
    err = torch.where(oracle == actual, torch.zeros_like(err), err)  # inf == inf, 0 == -0
    return err, keep


def describe(labels: dict, index: int) -> str:
    return ", ".join(f"{k}={float(v[index]):.9g}" for k, v in labels.items())


def summarize(q: Quantity, mask: torch.Tensor | None) -> dict:
    err, keep = relative_errors(q.actual, q.oracle)
    if mask is not None:
        keep = keep & mask
    n_out = int((~(q.oracle.double().flatten().abs() <= F32.max)).sum())
    if not bool(keep.any()):
        return {"max": None, "at": "", "points": 0, "beyond_float32": n_out}
    masked = torch.where(keep, err, torch.full_like(err, -1.0))
    i = int(masked.argmax())
    summary = {"max": float(err[i]), "at": describe(q.labels, i), "actual": float(q.actual.flatten()[i]),
               "oracle": float(q.oracle.flatten()[i]), "kappa": None if q.kappa is None else float(q.kappa.flatten()[i]),
               "points": int(keep.sum()), "beyond_float32": n_out, "max_over_kappa": None}
    if q.kappa is not None:
        # error / kappa: what the rounding of the terms contributed, whatever the cancellation did after
        kappa = q.kappa.double().flatten().nan_to_num(nan=1.0).clamp_min(1.0)
        summary["max_over_kappa"] = float(torch.where(keep, err / kappa, torch.zeros_like(err)).max())
    return summary


def measure(points: int = 2000) -> dict:
    """Every row on this process's instruction set, both paths: {"isa": ..., "rows": [...]}, each row
    with its text columns and {path: summary}."""
    isa = vae_fast.backend_info()["extension"]["cpu_isa"]
    rows: dict[str, dict] = {}
    order: list[str] = []

    def add(q: Quantity, path: str):
        splits = [("", None)]
        if q.kappa is not None:
            well = ~(q.kappa.flatten() > KAPPA_SPLIT)  # NaN kappa (0 / 0: both terms 0) is well-conditioned
            splits = [("", well), ("_cancel", ~well)]
        for suffix, mask in splits:
            key = q.key + suffix
            if key not in rows:
                inputs = q.inputs + (f" (kappa > {KAPPA_SPLIT:g}: cancellation)" if suffix else
                                     (f" (kappa <= {KAPPA_SPLIT:g})" if q.kappa is not None else ""))
                rows[key] = {"key": key, "approximation": q.approximation, "formula": q.formula, "inputs": inputs,
                             "note": q.note, "paths": {}}
                order.append(key)
            rows[key]["paths"][path] = summarize(q, mask)

    for path in PATHS:
        for sweep in (bernoulli_probabilities, bernoulli_logits, kl_sweeps):
            for q in sweep(points, path):
                add(q, path)
        for likelihood in ("gaussian", "laplace"):
            for q in location_scale(likelihood, points, path):
                add(q, path)
            for q in location_scale_per_element(likelihood, points, path):
                add(q, path)
    for q in summed_losses():
        add(q, "lanes")
    return {"isa": isa, "rows": [rows[k] for k in order]}


def measure_isa(isa: str, points: int) -> dict:
    """measure() on `isa`: in this process if it runs that instruction set, else in a subprocess with
    VAE_FAST_CPU_ISA=isa. RuntimeError if this CPU (or build) lacks it."""
    if vae_fast.backend_info()["extension"]["cpu_isa"] == isa:
        return measure(points)
    env = dict(os.environ, VAE_FAST_CPU_ISA=isa)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json", "--points", str(points)],
                          env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    if result["isa"] != isa:
        raise RuntimeError(f"asked for the {isa} kernels, the subprocess ran {result['isa']} (CPU without {isa}?)")
    return result


def passes(summary: dict, cancellation: bool = False) -> bool:
    """Within THRESHOLD relative; in a cancellation row (kappa > KAPPA_SPLIT), whose relative error no
    float32 evaluation can bound, within ROUNDING_BOUND times kappa (the terms rounded correctly,
    cancelled exactly: a backward-stable evaluation). A row that measured no point fails: its sweep
    missed what the row is for."""
    if summary["max"] is None:
        return False
    if cancellation:
        return summary["max_over_kappa"] <= ROUNDING_BOUND
    return summary["max"] <= THRESHOLD


# ---- report ----

def cell(summary: dict | None, cancellation: bool = False) -> str:
    if summary is None:
        return "-"
    if summary["max"] is None:
        return "(no points) **!**"
    mark = "" if passes(summary, cancellation) else " **!**"
    over = f" (error/kappa {summary['max_over_kappa']:.1e})" if cancellation else ""
    return f"{summary['max']:.2e}{over}{mark} at {summary['at']}"


def failing_cells(results: dict[str, dict]) -> int:
    """How many (instruction set, row, path) cells of `results` fail their bound: the exit status's."""
    return sum(1 for isa in results for row in results[isa]["rows"] for summary in row["paths"].values()
               if summary and not passes(summary, row["key"].endswith("_cancel")))


def to_markdown(results: dict[str, dict], points: int) -> str:
    """The report of `results` ({isa: measure()}), one column pair per instruction set measured."""
    isas = [isa for isa in ISAS if isa in results]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"# Accuracy of vae_fast's float32 CPU loss and gradients ({datetime.date.today().isoformat()})",
        "",
        f"`python benchmarks/accuracy_table.py --points {points}`: vae_fast {vae_fast.__version__}, torch {torch.__version__}, {cpu}.",
        "",
        "Error = |float32 result - float64 oracle| / max(|oracle|, tiny), **tiny = 2^-126 = 1.18e-38** (float32's smallest "
        "normal number: below it the error is absolute, in units of tiny). The oracle is written from the formulas with "
        "float64 torch ops / torch.distributions (not vae_fast.reference), on the same float32 inputs. Results through "
        "`vae_fast.vae_loss(..., reduction=\"none\")` and torch.autograd.grad. **!** marks a maximum above "
        f"{THRESHOLD:g}, or a cell whose sweep measured no point (a failure too). Each cell: the maximum and the input "
        "where it happens (u = x - recon, s = log_scale).",
        "",
        "Paths: *lanes* = the subject element in the vector body (a row of 16, 15 neutral padding elements); *tail* = "
        "one feature (recon [N, 1]), computed by the scalar tail loop with libm. avx512 = the AVX-512 build (at::vec's "
        "Sleef lanes); avx2 = the AVX2 build (Cephes exp/log, Goldberg log1p, exp_nonpos, log1p_unit, rcp + Newton; "
        "Sleef expm1); generic = the portable build; each but this process's own through VAE_FAST_CPU_ISA in a "
        f"subprocess. kappa = sum |terms| / |result| (condition number of the final sum or difference); rows split at "
        f"kappa = {KAPPA_SPLIT:g}. Near a zero of the result (kappa above that) no float32 evaluation keeps a relative "
        f"bound: those *cancellation* rows pass when error / kappa <= {ROUNDING_BOUND:.2g} (16 float32 roundoffs, "
        "the terms rounded correctly and cancelled exactly).",
        "",
        "| approximation | formula | inputs | " + " | ".join(f"{isa} {path}" for isa in isas for path in PATHS)
        + " | passes |",
        "|---|---|---|" + "---|" * (len(isas) * len(PATHS)) + "---|",
    ]
    base = results[isas[0]]["rows"]
    by_isa = {isa: {r["key"]: r for r in results[isa]["rows"]} for isa in isas}
    notes = []
    for row in base:
        cells = []
        ok = True
        for isa in isas:
            for path in PATHS:
                summary = by_isa[isa][row["key"]]["paths"].get(path)
                cancellation = row["key"].endswith("_cancel")
                cells.append(cell(summary, cancellation))
                ok = ok and (summary is None or passes(summary, cancellation))
        lines.append(f"| {row['approximation']} | {row['formula']} | {row['inputs']} | " + " | ".join(cells)
                     + f" | {'yes' if ok else '**no**'} |")
        if row["key"].endswith("_cancel"):
            continue  # its notes are the well-conditioned row's
        beyond = max(s.get("beyond_float32", 0) for isa in isas for s in by_isa[isa][row["key"]]["paths"].values())
        extra = [row["note"]] if row["note"] else []
        if beyond:
            extra.append(f"{beyond} points whose true value exceeds float32's range left out")
        if extra:
            notes.append(f"- `{row['key']}`: " + "; ".join(extra) + ".")
    lines += ["", "Notes:", ""] + notes
    failing = [(isa, path, by_isa[isa][r["key"]]) for r in base for isa in isas for path in PATHS
               if by_isa[isa][r["key"]]["paths"].get(path)
               and not passes(by_isa[isa][r["key"]]["paths"][path], r["key"].endswith("_cancel"))]
    if failing:
        lines += ["", "Rows that fail (float32 result vs oracle at the worst input):", ""]
        for isa, path, r in failing:
            s = r["paths"][path]
            if s["max"] is None:
                lines.append(f"- `{r['key']}` {isa} {path}: no points (the sweep measured nothing)")
                continue
            kappa = "" if s["kappa"] is None else f", kappa {s['kappa']:.3g} (error / kappa = {s['max'] / s['kappa']:.2g})"
            lines.append(f"- `{r['key']}` {isa} {path}: {s['at']}: float32 {s['actual']:.9g}, oracle {s['oracle']:.17g}, "
                         f"error {s['max']:.3g}{kappa} ({s['points']} points)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="Markdown path (default benchmarks/results/accuracy-cpu-<date>.md)")
    parser.add_argument("--points", type=int, default=2000, help="points per sweep (default 2000)")
    parser.add_argument("--json", action="store_true", help="print this process's measure() as JSON (used for the subprocess)")
    args = parser.parse_args(argv)
    if args.json:
        json.dump(measure(args.points), sys.stdout)
        return 0
    results = {}
    for isa in ISAS:
        try:
            results[isa] = measure_isa(isa, args.points)
        except RuntimeError as e:
            print(f"left out: {e}", file=sys.stderr)
    out = args.out or Path(__file__).resolve().parent / "results" / f"accuracy-cpu-{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(results, args.points))
    print(out)
    failures = failing_cells(results)
    if failures:
        print(f"{failures} cells above their bound (marked **!** in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
