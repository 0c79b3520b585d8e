"""vae_fast's ops called from 8 Python threads at once (forward and backward; the ops release the
GIL, so the kernels really overlap) give the bits of the same calls made one after another, and
draws from torch's global generator stay consistent: none lost, none repeated, and the generator
seeded afterwards draws what a fresh process draws."""

import collections
import os
import subprocess
import sys
import threading

import pytest
import torch

import vae_fast
from conftest import DEVICES

THREADS = 8
ROUNDS = 6
# (batch, features, latents): a single row; the training shape; rows of three 4096-feature blocks;
# and sizes above the kernels' 32768-element threading grain, so that each Python thread also
# fans out to the intra-op pool while the others do
LOSS_SIZES = [(1, 7, 3), (16, 784, 20), (3, 9000, 64), (64, 1000, 32)]
REPARAMETERIZE_SIZES = [(1, 3), (128, 20), (300, 130)]


def run_in_threads(jobs):
    """Run each job in its own thread, all released at once by a barrier; their results in order."""
    barrier = threading.Barrier(len(jobs))
    results = [None] * len(jobs)
    errors = []

    def worker(i, job):
        try:
            barrier.wait()
            results[i] = job()
        except BaseException as exc:  # noqa: BLE001  (reported in the main thread)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def loss_calls(device):
    """Forward + backward of vae_loss over sizes, modes and reductions, as closures over fixed inputs
    (shared, read-only, by all threads: autograd.grad, so nothing accumulates into a shared .grad)."""
    calls = []
    g = torch.Generator().manual_seed(0)
    for batch, features, latents in LOSS_SIZES:
        for logits, reduction, grad_output in ((False, "sum", 1.0), (True, "mean", 0.5), (True, "none", -2.0)):
            recon = torch.randn(batch, features, generator=g) * 3
            if not logits:
                recon = torch.sigmoid(recon)
            inputs = [t.to(device).requires_grad_() for t in (
                recon,
                torch.rand(batch, features, generator=g).round(),
                torch.randn(batch, latents, generator=g),
                torch.randn(batch, latents, generator=g),
            )]

            def call(inputs=inputs, logits=logits, reduction=reduction, grad_output=grad_output):
                loss = vae_fast.vae_loss(*inputs, logits=logits, beta=0.7, reduction=reduction)
                # grad_output != 1 also runs the in-place scaling of the saved gradients
                grads = torch.autograd.grad(loss, inputs, torch.full_like(loss, grad_output))
                return (loss.detach(), *grads)

            calls.append(call)
    return calls


def reparameterize_calls(device):
    calls = []
    g = torch.Generator().manual_seed(1)
    for i, shape in enumerate(REPARAMETERIZE_SIZES):
        mu = torch.randn(shape, generator=g).to(device).requires_grad_()
        logvar = torch.randn(shape, generator=g).to(device).requires_grad_()
        grad_z = torch.randn(shape, generator=g).to(device)

        def call(mu=mu, logvar=logvar, grad_z=grad_z, seed=100 + i):
            z = vae_fast.reparameterize(mu, logvar, generator=torch.Generator(device).manual_seed(seed))
            return (z.detach(), *torch.autograd.grad(z, (mu, logvar), grad_z))

        calls.append(call)
    return calls


def assert_same_bits(got, expected, what):
    assert len(got) == len(expected), what
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        assert torch.equal(a, b), f"{what}, output {i}: {(a != b).sum().item()} elements differ"


@pytest.mark.parametrize("device", DEVICES)
def test_threads_give_the_bits_of_serial_calls(device):
    calls = loss_calls(device) + reparameterize_calls(device)
    serial = [call() for call in calls]
    for round_ in range(ROUNDS):
        # every thread runs every call, each from another starting point, so that at any moment
        # different ops and sizes run side by side
        def job(t):
            order = [(t + k) % len(calls) for k in range(len(calls))]
            return {k: calls[k]() for k in order}

        for t, results in enumerate(run_in_threads([lambda t=t: job(t) for t in range(THREADS)])):
            for k, result in results.items():
                assert_same_bits(result, serial[k], f"round {round_}, thread {t}, call {k}")


def _draw_global(shape, device):
    zeros = torch.zeros(shape, device=device)
    return vae_fast.reparameterize(zeros, zeros)  # mu = 0, sigma = 1: the noise itself


def _key(t):
    return t.cpu().numpy().tobytes()


@pytest.mark.parametrize("device", DEVICES)
def test_global_generator_is_not_corrupted_by_threads(device):
    shape, seed, per_thread = (64, 20), 2024, 4
    torch.manual_seed(seed)
    serial = [_draw_global(shape, device) for _ in range(THREADS * per_thread)]
    assert len({_key(z) for z in serial}) == len(serial)  # successive draws differ

    for _ in range(ROUNDS):
        torch.manual_seed(seed)
        drawn = run_in_threads([lambda: [_draw_global(shape, device) for _ in range(per_thread)]] * THREADS)
        # Each call takes its share of the generator atomically: the threaded draws are the serial ones
        # in some order, none lost and none drawn twice.
        threaded = collections.Counter(_key(z) for draws in drawn for z in draws)
        assert threaded == collections.Counter(_key(z) for z in serial)

    # The generator, seeded again after all that, draws what a fresh process draws, and so does torch's
    # own sampling after it.
    torch.manual_seed(seed)
    after = _draw_global(shape, device)
    after_randn = torch.randn(5, device=device)
    assert torch.equal(after, serial[0])
    script = (
        "import sys, torch, vae_fast\n"
        f"torch.manual_seed({seed})\n"
        f"z = vae_fast.reparameterize(torch.zeros({shape}, device='{device}'), torch.zeros({shape}, device='{device}'))\n"
        f"r = torch.randn(5, device='{device}')\n"
        "sys.stdout.write(z.cpu().numpy().tobytes().hex() + ' ' + r.cpu().numpy().tobytes().hex())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(vae_fast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    z_hex, randn_hex = fresh.stdout.split()
    assert after.cpu().numpy().tobytes().hex() == z_hex
    assert after_randn.cpu().numpy().tobytes().hex() == randn_hex


@pytest.mark.parametrize("device", DEVICES)
def test_threads_with_their_own_generators_draw_the_serial_sequences(device):
    shape, per_thread = (33, 17), 5
    seeds = [7 + 1000 * t for t in range(THREADS)]
    mu = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device)
    logvar = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(device)

    def sequence(seed):
        gen = torch.Generator(device).manual_seed(seed)
        return [vae_fast.reparameterize(mu, logvar, generator=gen) for _ in range(per_thread)]

    serial = [sequence(s) for s in seeds]
    for _ in range(ROUNDS):
        threaded = run_in_threads([lambda s=s: sequence(s) for s in seeds])
        for t in range(THREADS):
            assert_same_bits(threaded[t], serial[t], f"thread {t}")
