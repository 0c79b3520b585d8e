// Standard normal noise for reparameterize, 64 elements at a time in AVX2 registers: Philox4x32-10
// for 8 subsequences at once (the same function as math::philox4x32_10), Box-Muller with an inline
// sin/cos of 2 pi u, and a 4 x 8 transpose into the elements' order. Element i takes its normal from
// Philox block i / 4 exactly as the scalar path does (math::kNormalsPerPhiloxBlock), so only the
// last bits of the vector lanes' sin, cos and log differ from the scalar tail's libm.
//
// Why not the scalar layout's steps one after the other (uniforms to memory, Box-Muller through
// at::vec's Sleef sin and cos, then a scalar interleave): at B = 65536, L = 64 that spent about half
// its time writing and re-reading 12 scratch arrays and calling Sleef twice per vector.
#pragma once

#include "avx2_math.h"

namespace vae_fast {
namespace math {
inline namespace VAE_FAST_ISA {
namespace avx2_detail {

// 32 x 32 -> 64-bit products of 8 lanes by the constant m: low and high halves.
inline void mulhilo(__m256i a, __m256i m, __m256i& lo, __m256i& hi) {
  const __m256i even = _mm256_mul_epu32(a, m);                      // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// math::uniform_open_closed (plus = 1) or uniform_closed_open (plus = 0) of 8 words, the same bits:
// the top 24 bits convert exactly, so the signed conversion instruction is right.
inline __m256 uniform_from_top24(__m256i bits, int plus) {
  const __m256i top = _mm256_add_epi32(_mm256_srli_epi32(bits, 8), _mm256_set1_epi32(plus));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(top), _mm256_set1_ps(5.9604644775390625e-8f));
}

// The key of each of Philox's 10 rounds, broadcast: the same for every block of a call, so they are
// made once per call instead of two additions per round and block group.
struct PhiloxRoundKeys {
  __m256i k0[10], k1[10];
  explicit PhiloxRoundKeys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round, a += 0x9E3779B9u, b += 0xBB67AE85u) {
      k0[round] = _mm256_set1_epi32(static_cast<int>(a));
      k1[round] = _mm256_set1_epi32(static_cast<int>(b));
    }
  }
};

// Philox4x32-10 of the 8 subsequences first .. first+7 at one offset: word w of lane j in c[w].
inline void philox_x8(const PhiloxRoundKeys& keys, uint64_t offset, uint64_t first, __m256i c[4]) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
  __m256i c2 = _mm256_add_epi32(base_lo, lanes);
  // a lane whose low word wrapped carries into the high word (unsigned compare via the sign flip)
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign), _mm256_xor_si256(c2, sign));
  __m256i c3 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32))), wrapped);
  __m256i c0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m256i lo0, hi0, lo1, hi1;
    mulhilo(c0, m0, lo0, hi0);
    mulhilo(c2, m1, lo1, hi1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), keys.k0[round]);
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), keys.k1[round]);
    c3 = lo0;
  }
  c[0] = c0, c[1] = c1, c[2] = c2, c[3] = c3;
}

// (pi/2)^k / k!, the k-th Taylor coefficient of sin and cos of (pi/2) r in powers of r.
constexpr float quarter_turn_term(int k) {
  double term = 1.0;
  for (int i = 1; i <= k; ++i) term *= 1.5707963267948966 / i;
  return static_cast<float>(term);
}

// sin and cos of 2 pi u for u in [0, 1) a multiple of 2^-24 (math::uniform_closed_open): 4u and its
// nearest whole number q are exact, so the quadrant reduction r = 4u - q in [-1/2, 1/2] loses
// nothing (no Cody-Waite constants, no large-argument path), and 2 pi u = (pi/2)(q + r). On
// |pi/2 r| <= pi/4 the Taylor series to degree 9 (sin) and 10 (cos) leave relative errors under 3e-9
// and 2e-10, below float's half ulp (6e-8); Horner in FMAs adds about an ulp.
inline void sincos_2pi(__m256 u, __m256& sine, __m256& cosine) {
  const __m256 t = _mm256_mul_ps(u, _mm256_set1_ps(4.0f));
  const __m256 q = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(t, q);
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 s = _mm256_mul_ps(r, poly(r2, {quarter_turn_term(9), -quarter_turn_term(7), quarter_turn_term(5),
                                               -quarter_turn_term(3), quarter_turn_term(1)}));
  const __m256 c = poly(r2, {-quarter_turn_term(10), quarter_turn_term(8), -quarter_turn_term(6), quarter_turn_term(4),
                             -quarter_turn_term(2), 1.0f});
  // quadrant q mod 4 (q = 4 is u just below 1, the same as 0): 1 and 3 swap sin and cos; sin is
  // negated in quadrants 2, 3 and cos in 1, 2.
  const __m256i quadrant = _mm256_cvtps_epi32(q);
  const __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(quadrant, 31));
  const __m256 sin_sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(quadrant, 1), 31));
  const __m256 cos_sign =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(_mm256_add_epi32(quadrant, _mm256_set1_epi32(1)), 1), 31));
  sine = _mm256_xor_ps(_mm256_blendv_ps(s, c, swap), sin_sign);
  cosine = _mm256_xor_ps(_mm256_blendv_ps(c, s, swap), cos_sign);
}

// Box-Muller (math::box_muller) of 8 word pairs: radius from the first word, angle from the second.
inline void box_muller_x8(__m256i radius_bits, __m256i angle_bits, __m256& first, __m256& second) {
  // u in (0, 1] is a normal float, so log_normal's fast path is exact enough and never sees 0.
  const __m256 log_u = log_normal(uniform_from_top24(radius_bits, 1), _mm256_setzero_ps());
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log_u));
  __m256 sine, cosine;
  sincos_2pi(uniform_from_top24(angle_bits, 0), sine, cosine);
  first = _mm256_mul_ps(radius, cosine);
  second = _mm256_mul_ps(radius, sine);
}

// Blocks j and j + 4 of a group of 8 (lane j of each normal's vector) side by side, in the order
// of their elements: a 4 x 8 transpose, first within each 128-bit half (pairs, then quads) ...
inline void store_in_element_order(__m256 a0, __m256 a1, __m256 b0, __m256 b1, float* out) {
  const __m256 ab_lo = _mm256_unpacklo_ps(a0, a1), ab_hi = _mm256_unpackhi_ps(a0, a1);  // a0_j a1_j a0_j+1 a1_j+1
  const __m256 cd_lo = _mm256_unpacklo_ps(b0, b1), cd_hi = _mm256_unpackhi_ps(b0, b1);
  const __m256 block0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab_lo), _mm256_castps_pd(cd_lo)));  // 0, 4
  const __m256 block1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab_lo), _mm256_castps_pd(cd_lo)));  // 1, 5
  const __m256 block2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab_hi), _mm256_castps_pd(cd_hi)));  // 2, 6
  const __m256 block3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab_hi), _mm256_castps_pd(cd_hi)));  // 3, 7
  // ... then the halves into order: blocks (0, 1), (2, 3), (4, 5), (6, 7).
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(block0, block1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(block2, block3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(block0, block1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(block2, block3, 0x31));
}

// The 64 normals of Philox blocks first .. first+15 in element order: block k's four normals are
// elements 4k .. 4k+3 (pair (0, 1), then pair (2, 3)). Two groups of 8 blocks at once: the log and
// sin/cos polynomials are chains of dependent FMAs, and a second group's gives the core other work
// while one waits.
inline void standard_normals_x64(const PhiloxRoundKeys& keys, uint64_t offset, uint64_t first, float* out) {
  __m256i c[4], d[4];
  philox_x8(keys, offset, first, c);
  philox_x8(keys, offset, first + 8, d);
  __m256 a0, a1, b0, b1, e0, e1, f0, f1;  // lane j: block j's normals 0, 1, 2, 3 (a, b; e, f: + 8)
  box_muller_x8(c[0], c[1], a0, a1);
  box_muller_x8(d[0], d[1], e0, e1);
  box_muller_x8(c[2], c[3], b0, b1);
  box_muller_x8(d[2], d[3], f0, f1);
  store_in_element_order(a0, a1, b0, b1, out);
  store_in_element_order(e0, e1, f0, f1, out + 32);
}

// The normals of n_blocks Philox blocks from `first` into out (4 per block), in groups of 16 blocks;
// returns how many blocks it filled (a multiple of 16): the caller draws the rest with the scalar path.
inline int64_t standard_normals(uint64_t seed, uint64_t offset, uint64_t first, int64_t n_blocks, float* out) {
  const PhiloxRoundKeys keys(seed);
  int64_t k = 0;
  for (; k + 16 <= n_blocks; k += 16) standard_normals_x64(keys, offset, first + static_cast<uint64_t>(k), out + 4 * k);
  return k;
}

}  // namespace avx2_detail
}  // namespace VAE_FAST_ISA
}  // namespace math
}  // namespace vae_fast
