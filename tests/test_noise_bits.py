"""reparameterize's noise, element by element, against Philox4x32-10 and Box-Muller written here in
numpy and float64 (not the kernels' code): the counter-based bits, which block and word each element
takes, and the float32 sin/cos/log of the vector path (avx2_noise.h: 64 elements at a time, its own
quadrant-reduced sin and cos of 2 pi u) and of the scalar tail. The statistical tests of
test_independent_checks.py would not see a wrong sign in one quadrant or two swapped elements."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vae_fast import _extension

pytestmark = pytest.mark.skipif(not _extension.serves(torch.device("cpu")), reason="the kernels' noise layout")

MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(seed: int, offset: int, subsequences: np.ndarray) -> list[np.ndarray]:
    """Salmon et al. (SC'11), counter (offset lo, offset hi, subsequence lo, subsequence hi), key
    (seed lo, seed hi): the four 32-bit words, as uint64 arrays."""
    sub = subsequences.astype(np.uint64)
    c0 = np.full_like(sub, offset & 0xFFFFFFFF)
    c1 = np.full_like(sub, (offset >> 32) & 0xFFFFFFFF)
    c2, c3 = sub & MASK32, sub >> np.uint64(32)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0  # both factors < 2^32: the product fits in 64 bits
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0 = (k0 + np.uint64(0x9E3779B9)) & MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & MASK32
    return [c0, c1, c2, c3]


def test_philox_here_is_philox():
    """Random123's known-answer vectors (kat_vectors, philox4x32 10): counter and key all zeros, all ones."""
    words = philox4x32_10(0, 0, np.array([0]))
    assert [int(w[0]) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    words = philox4x32_10(2**64 - 1, 2**64 - 1, np.array([2**64 - 1], dtype=np.uint64))
    assert [int(w[0]) for w in words] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def expected_noise(seed: int, offset: int, numel: int, float32_uniforms: bool) -> tuple[np.ndarray, np.ndarray]:
    """(eps, the radius r of each element's pair). Element 4k + j from block k: j = 0, 1 are r cos,
    r sin of words (0, 1); j = 2, 3 of words (2, 3). Uniforms as the kernels make them: the top 24
    bits for float32 data, all 32 for float64."""
    blocks = (numel + 3) // 4
    words = philox4x32_10(seed, offset, np.arange(blocks, dtype=np.uint64))
    if float32_uniforms:
        radius_u = lambda w: ((w >> np.uint64(8)) + 1).astype(np.float64) * 2.0**-24  # noqa: E731
        angle_u = lambda w: (w >> np.uint64(8)).astype(np.float64) * 2.0**-24  # noqa: E731
    else:
        radius_u = lambda w: (w.astype(np.float64) + 1) * 2.0**-32  # noqa: E731
        angle_u = lambda w: w.astype(np.float64) * 2.0**-32  # noqa: E731
    out, radii = np.empty((blocks, 4)), np.empty((blocks, 4))
    for pair, (r_word, a_word) in enumerate(((0, 1), (2, 3))):
        radius = np.sqrt(-2.0 * np.log(radius_u(words[r_word])))
        angle = 2.0 * np.pi * angle_u(words[a_word])
        out[:, 2 * pair] = radius * np.cos(angle)
        out[:, 2 * pair + 1] = radius * np.sin(angle)
        radii[:, 2 * pair] = radii[:, 2 * pair + 1] = radius
    return out.reshape(-1)[:numel], radii.reshape(-1)[:numel]


def drawn_noise(numel: int, dtype: torch.dtype, generator: torch.Generator) -> tuple[torch.Tensor, int, int]:
    logvar = torch.zeros(numel, dtype=dtype)
    _, state = torch.ops.vae_fast.reparameterize_sample(torch.zeros(numel, dtype=dtype), logvar, generator)
    eps = torch.ops.vae_fast.reparameterize_noise(logvar, state)
    seed, offset = (int(v) % 2**64 for v in state.tolist())
    return eps, seed, offset


# float32: sin, cos and log of either path are within a few ulp: measured up to 2.7 ulp of the
# radius r (the pair's largest |eps|) on the vector path, 5 on the scalar tail (at::vec's Sleef sin
# and cos are 3.5-ulp versions); the bound is 8. A wrong sign, quadrant, word or element is off by
# about r itself; the sin/cos series' accuracy has its own, tighter test below.
ULPS = 8
@pytest.mark.parametrize("numel", [4 * 1024 * 3 + 4 * 8 * 2 + 5, 29, 1024])
def test_float32_noise_is_philox_box_muller(numel):
    eps, seed, offset = drawn_noise(numel, torch.float32, torch.Generator().manual_seed(numel))
    expected, radius = expected_noise(seed, offset, numel, float32_uniforms=True)
    error = np.abs(eps.double().numpy() - expected)
    assert (error <= ULPS * 2.0**-24 * np.maximum(radius, 1e-3)).all(), error.max()


def test_float64_noise_is_philox_box_muller():
    numel = 4 * 1024 + 7
    eps, seed, offset = drawn_noise(numel, torch.float64, torch.Generator().manual_seed(3))
    expected, _ = expected_noise(seed, offset, numel, float32_uniforms=False)
    np.testing.assert_allclose(eps.numpy(), expected, rtol=0, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), numel=st.integers(1, 3000))
def test_every_element_takes_its_own_block_and_word(seed, numel):
    """Any seed and length (groups of 8 blocks, the chunk's tail, a tensor's last partial block)."""
    eps, seed_used, offset = drawn_noise(numel, torch.float32, torch.Generator().manual_seed(seed))
    expected, radius = expected_noise(seed_used, offset, numel, float32_uniforms=True)
    error = np.abs(eps.double().numpy() - expected)
    assert (error <= ULPS * 2.0**-24 * np.maximum(radius, 1e-3)).all(), error.max()


def test_the_vector_sin_cos_is_accurate_in_every_quadrant():
    """All 2^24 float32 angle uniforms are too many; 2^20 of them spread over [0, 1), each quadrant
    and its edges included, through the drawn noise of many blocks: |eps| / radius is the cos or sin,
    compared with float64's."""
    numel = 4 * 2**18
    eps, seed, offset = drawn_noise(numel, torch.float32, torch.Generator().manual_seed(11))
    expected, radius = expected_noise(seed, offset, numel, float32_uniforms=True)
    keep = radius > 0.1  # the angle's share of the error, not the radius's
    cos_sin_error = np.abs(eps.double().numpy()[keep] - expected[keep]) / radius[keep]
    # measured 2.7 ulp (of 1, float32's at 1: 2^-24); the sin series one term shorter leaves 3.1e-7
    # (5.2 ulp) at pi/4
    assert cos_sin_error.max() < 4 * 2.0**-24, cos_sin_error.max()
