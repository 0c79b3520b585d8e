// Inline AVX2 float32 exp, log and log1p for the loss kernels' hot loop (the AVX-512 build's too, a
// half vector at a time; the double log and log1p of avx2_log_double.h likewise). at::vec's versions call
// out to Sleef (a function call plus special-case handling per vector), which made them most of
// the kernel's time; these are the Cephes polynomials (Moshier), ~1 ulp in the range that matters,
// with the special values the loss relies on: log(0) = -inf, NaN in -> NaN out, denormals handled,
// exp underflowing gradually to 0.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include "avx2_log_double.h"  // the double log/log1p of the count kernels

namespace vae_fast {
namespace math {
inline namespace VAE_FAST_ISA {

namespace avx2_detail {

inline __m256 poly(__m256 x, std::initializer_list<float> coefficients) {
  auto it = coefficients.begin();
  __m256 y = _mm256_set1_ps(*it++);
  for (; it != coefficients.end(); ++it) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(*it));
  return y;
}

// 2^n for integer-valued float n in [-252, 128], as the product of two normal powers of two so
// that results below FLT_MIN come out denormal instead of wrapping.
inline __m256 scale_by_pow2(__m256 y, __m256 n) {
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i rest = _mm256_sub_epi32(ni, half);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, p1), p2);
}

// exp(xc) = y * 2^n with y from the Cephes polynomial on xc - n ln2 (ln2 split in two parts so
// the reduction is exact); the callers clamp xc and build 2^n for their own ranges.
inline __m256 exp_mantissa(__m256 xc, __m256& n) {
  n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 p = poly(r, {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                            1.6666665459e-1f, 5.0000001201e-1f});
  return _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
}

inline __m256 exp(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.72283935546875f);  // above: +inf
  const __m256 lo = _mm256_set1_ps(-103.97208f);          // below: 0
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n;
  const __m256 y = exp_mantissa(xc, n);
  __m256 result = scale_by_pow2(y, n);
  result = _mm256_blendv_ps(result, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  result = _mm256_blendv_ps(result, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN stays NaN
}

// 1 / v from the 12-bit hardware estimate and one Newton step (~2 ulp), a third of a division's cost.
// Only for finite non-zero v: the callers' denominators are in [1e-12, 3].
inline __m256 recip(__m256 v) {
  const __m256 r = _mm256_rcp_ps(v);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(v, r, _mm256_set1_ps(2.0f)));
}

// exp(x) for x <= 0 (the softplus tail exp(-|r|)): no overflow side, so a third fewer instructions
// than exp when every lane is above ln(FLT_MIN) = -87.34 (2^n is then one normal power of two). A
// vector with a lane below takes exp's path, whose 2^n is built in two halves so that results
// below FLT_MIN come out denormal (the softplus and sigmoid of a logit beyond -87.34 keep their
// relative accuracy): such saturated logits are rare, so the branch costs a compare and a test.
inline __m256 exp_nonpos(__m256 x) {
  const __m256 normal_lo = _mm256_set1_ps(-87.33654f);  // ln(FLT_MIN)
  if (_mm256_movemask_ps(_mm256_cmp_ps(x, normal_lo, _CMP_LT_OQ)) != 0) return exp(x);
  __m256 n;
  const __m256 y = exp_mantissa(x, n);
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256 result = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
  return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN stays NaN
}

// log(x) for a normal, finite, positive x, plus e_adjust (a whole number) times ln 2: the Cephes
// polynomial on the mantissa in [sqrt(1/2), sqrt(2)), ln 2 split in two parts so that the exponent's
// share is exact. No special values: the callers handle denormals, 0, inf and NaN as they need.
inline __m256 log_normal(__m256 xs, __m256 e_adjust) {
  const __m256i bits = _mm256_castps_si256(xs);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  e = _mm256_add_ps(e, e_adjust);
  // mantissa m in [0.5, 1)
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                 _mm256_set1_epi32(0x3F000000)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = poly(m, {7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f,
                      1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f,
                      3.3333331174e-1f});
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_add_ps(_mm256_add_ps(m, y), _mm256_mul_ps(e, _mm256_set1_ps(0.693359375f)));
}

// Denormal x scaled by 2^23 into the normal range, with -23 for log_normal's e_adjust.
inline __m256 scale_denormal(__m256 x, __m256& e_adjust) {
  const __m256 is_denormal = _mm256_cmp_ps(x, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  e_adjust = _mm256_and_ps(is_denormal, _mm256_set1_ps(-23.0f));
  return _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), is_denormal);
}

inline __m256 log(__m256 x) {
  // Denormals are scaled into the normal range first (their log is above the loss's -100 clamp).
  __m256 e_adjust;
  const __m256 xs = scale_denormal(x, e_adjust);
  __m256 result = log_normal(xs, e_adjust);
  result = _mm256_blendv_ps(result, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
  result = _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  // negative or NaN input: NaN
  return _mm256_blendv_ps(result, _mm256_set1_ps(NAN), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NGE_UQ));
}

// max(log p, -100) for a probability p in [0, 1] (NaN stays NaN; outside [0, 1], which the loss
// refuses, anything): cheaper than log, whose zero and infinity cases the clamp makes moot. p below
// the largest float under e^-100 is raised to it first (its log, -100.02, clamps as log(0) would).
inline __m256 log_prob_clamped(__m256 p) {
  const __m256 floor = _mm256_castsi256_ps(_mm256_set1_epi32(26));  // 26 * 2^-149 = 3.64e-44 < e^-100
  const __m256 pc = _mm256_max_ps(p, floor);  // a NaN p gives the floor here...
  __m256 e_adjust;
  const __m256 xs = scale_denormal(pc, e_adjust);
  const __m256 result = _mm256_max_ps(log_normal(xs, e_adjust), _mm256_set1_ps(-100.0f));
  return _mm256_blendv_ps(result, p, _mm256_cmp_ps(p, p, _CMP_UNORD_Q));  // ...and gets its NaN back here
}

// max(log1p(-p), -100) for a probability p, as log_prob_clamped: u = 1 - p is exact for p >= 0.5
// and in (0.5, 1] below, so never denormal; Goldberg's correction ((1 - u) - p) / u restores the
// digits of a small p that 1 - p rounded away (the reciprocal's 2 ulp are far below them). p = 1
// (u = 0) gives -100.
inline __m256 log1m_prob_clamped(__m256 p) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 u = _mm256_sub_ps(one, p);
  const __m256 u_safe = _mm256_max_ps(u, _mm256_set1_ps(1.17549435e-38f));
  const __m256 correction = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(one, u), p), recip(u_safe));
  __m256 result = _mm256_max_ps(_mm256_add_ps(log_normal(u_safe, _mm256_setzero_ps()), correction), _mm256_set1_ps(-100.0f));
  result = _mm256_blendv_ps(result, _mm256_set1_ps(-100.0f), _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_EQ_OQ));
  return _mm256_blendv_ps(result, p, _mm256_cmp_ps(p, p, _CMP_UNORD_Q));
}

// For a target x that is exactly 0 or 1: log_prob_clamped(p) in the lanes where x = 1 and
// log1m_prob_clamped(p) where x = 0, bit for bit, from one logarithm (of p or of 1 - p) instead of
// both. Every lane goes through exactly the operations of its function.
inline __m256 log_binary_likelihood_clamped(__m256 p, __m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 take_p = _mm256_cmp_ps(x, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  const __m256 u = _mm256_sub_ps(one, p);
  const __m256 u_safe = _mm256_max_ps(u, _mm256_set1_ps(1.17549435e-38f));
  const __m256 p_floored = _mm256_max_ps(p, _mm256_castsi256_ps(_mm256_set1_epi32(26)));
  __m256 e_adjust;  // 0 in the 1 - p lanes: u_safe is normal
  const __m256 xs = scale_denormal(_mm256_blendv_ps(u_safe, p_floored, take_p), e_adjust);
  const __m256 log = log_normal(xs, e_adjust);
  const __m256 correction = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(one, u), p), recip(u_safe));
  __m256 result = _mm256_max_ps(_mm256_blendv_ps(_mm256_add_ps(log, correction), log, take_p), _mm256_set1_ps(-100.0f));
  const __m256 u_zero = _mm256_andnot_ps(take_p, _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_EQ_OQ));
  result = _mm256_blendv_ps(result, _mm256_set1_ps(-100.0f), u_zero);
  return _mm256_blendv_ps(result, p, _mm256_cmp_ps(p, p, _CMP_UNORD_Q));
}

// Whether every lane of x is exactly 0 or 1.
inline bool all_binary(__m256 x) {
  const __m256 zero_or_one = _mm256_or_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ),
                                          _mm256_cmp_ps(x, _mm256_set1_ps(1.0f), _CMP_EQ_OQ));
  return _mm256_movemask_ps(zero_or_one) == 0xFF;
}

// log1p(v) = log(u) + (v - (u - 1)) / u with u = 1 + v rounded: the correction restores the digits
// of v that the rounding of 1 + v dropped (Goldberg's trick).
inline __m256 log1p(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 u = _mm256_add_ps(one, v);
  __m256 correction = _mm256_mul_ps(_mm256_sub_ps(v, _mm256_sub_ps(u, one)), _mm256_div_ps(one, u));
  // u = 0 or inf make the correction NaN; the logarithm alone is then exact (-inf, inf).
  correction = _mm256_blendv_ps(correction, _mm256_setzero_ps(), _mm256_cmp_ps(correction, correction, _CMP_UNORD_Q));
  return _mm256_add_ps(log(u), correction);
}

// log1p(e) for e in [0, 1] (the softplus tail log1p(exp(-|r|))): with s = e / (2 + e) in [0, 1/3],
// log1p(e) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...); seven terms leave < 2e-8 relative error,
// accurate down to e -> 0 and far cheaper than a general logarithm.
inline __m256 log1p_unit(__m256 e) {
  const __m256 s = _mm256_mul_ps(e, recip(_mm256_add_ps(_mm256_set1_ps(2.0f), e)));
  const __m256 w = _mm256_mul_ps(s, s);
  const __m256 series = poly(w, {1.0f / 13, 1.0f / 11, 1.0f / 9, 1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f});
  return _mm256_mul_ps(_mm256_add_ps(s, s), series);
}

}  // namespace avx2_detail

#if defined(CPU_CAPABILITY_AVX2)
inline Vec<float> exp_(const Vec<float>& v) { return Vec<float>(avx2_detail::exp(v)); }
inline Vec<float> log_(const Vec<float>& v) { return Vec<float>(avx2_detail::log(v)); }
inline Vec<float> log1p_(const Vec<float>& v) { return Vec<float>(avx2_detail::log1p(v)); }
inline Vec<float> log1p_unit_(const Vec<float>& v) { return Vec<float>(avx2_detail::log1p_unit(v)); }
inline Vec<float> exp_nonpos_(const Vec<float>& v) { return Vec<float>(avx2_detail::exp_nonpos(v)); }
inline Vec<float> recip_(const Vec<float>& v) { return Vec<float>(avx2_detail::recip(v)); }
inline Vec<float> log_prob_clamped_(const Vec<float>& v) { return Vec<float>(avx2_detail::log_prob_clamped(v)); }
inline Vec<float> log1m_prob_clamped_(const Vec<float>& v) { return Vec<float>(avx2_detail::log1m_prob_clamped(v)); }
inline Vec<float> log_binary_likelihood_clamped_(const Vec<float>& p, const Vec<float>& x) {
  return Vec<float>(avx2_detail::log_binary_likelihood_clamped(p, x));
}
inline bool all_binary_(const Vec<float>& x) { return avx2_detail::all_binary(x); }
inline Vec<double> log_(const Vec<double>& v) { return Vec<double>(avx2_log_double::log(v)); }
inline Vec<double> log1p_(const Vec<double>& v) { return Vec<double>(avx2_log_double::log1p(v)); }
#elif defined(CPU_CAPABILITY_AVX512)
// The AVX-512 build's 16 float lanes run these primitives one 256-bit half at a time: per element
// the same bits as the AVX2 build (so the same accuracy table), without at::vec's Sleef call per
// vector, which made its probabilities and logits losses 3.5x slower than the AVX2 build's.
namespace avx512_detail {
inline __m256 low_half(__m512 v) { return _mm512_castps512_ps256(v); }
inline __m256 high_half(__m512 v) { return _mm512_extractf32x8_ps(v, 1); }
inline __m512 join(__m256 low, __m256 high) { return _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1); }

template <__m256 (*F)(__m256)>
inline Vec<float> by_halves(const Vec<float>& v) {
  const __m512 w = v;
  return Vec<float>(join(F(low_half(w)), F(high_half(w))));
}

template <__m256d (*F)(__m256d)>
inline Vec<double> by_halves(const Vec<double>& v) {
  const __m512d w = v;
  return Vec<double>(_mm512_insertf64x4(_mm512_castpd256_pd512(F(_mm512_castpd512_pd256(w))), F(_mm512_extractf64x4_pd(w, 1)), 1));
}
}  // namespace avx512_detail

inline Vec<float> exp_(const Vec<float>& v) { return avx512_detail::by_halves<avx2_detail::exp>(v); }
inline Vec<float> log_(const Vec<float>& v) { return avx512_detail::by_halves<avx2_detail::log>(v); }
inline Vec<float> log1p_(const Vec<float>& v) { return avx512_detail::by_halves<avx2_detail::log1p>(v); }
inline Vec<float> log1p_unit_(const Vec<float>& v) { return avx512_detail::by_halves<avx2_detail::log1p_unit>(v); }
inline Vec<float> exp_nonpos_(const Vec<float>& v) { return avx512_detail::by_halves<avx2_detail::exp_nonpos>(v); }
inline Vec<float> recip_(const Vec<float>& v) { return avx512_detail::by_halves<avx2_detail::recip>(v); }
inline Vec<float> log_prob_clamped_(const Vec<float>& v) {
  return avx512_detail::by_halves<avx2_detail::log_prob_clamped>(v);
}
inline Vec<float> log1m_prob_clamped_(const Vec<float>& v) {
  return avx512_detail::by_halves<avx2_detail::log1m_prob_clamped>(v);
}
inline Vec<float> log_binary_likelihood_clamped_(const Vec<float>& p, const Vec<float>& x) {
  using namespace avx512_detail;
  const __m512 pw = p, xw = x;
  return Vec<float>(join(avx2_detail::log_binary_likelihood_clamped(low_half(pw), low_half(xw)),
                         avx2_detail::log_binary_likelihood_clamped(high_half(pw), high_half(xw))));
}
inline bool all_binary_(const Vec<float>& x) {
  const __m512 w = x;
  return avx2_detail::all_binary(avx512_detail::low_half(w)) && avx2_detail::all_binary(avx512_detail::high_half(w));
}
inline Vec<double> log_(const Vec<double>& v) { return avx512_detail::by_halves<avx2_log_double::log>(v); }
inline Vec<double> log1p_(const Vec<double>& v) { return avx512_detail::by_halves<avx2_log_double::log1p>(v); }
#endif

}  // namespace VAE_FAST_ISA
}  // namespace math
}  // namespace vae_fast
