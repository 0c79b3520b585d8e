// Inline AVX2 double-precision log and log1p for the count kernels, which evaluate Loader's
// decomposition in double (vae_math.h's count section): through at::vec these were Sleef calls
// (Sleef_finz_logd4_u10 / log1pd4_u10, double-double arithmetic for a 1-ulp bound), half of the NB
// loss's time. This is fdlibm's __ieee754_log (Sun, 1993) on four lanes: one division and a degree-14
// polynomial in s = f / (2 + f), error below 1 ulp; the count formulas need ~1e-15, not the last bit.
// Special values as the C library's: log(0) = -inf, log(x < 0) = NaN, log(inf) = inf, NaN stays
// NaN, denormals scaled into the normal range first.
// Only <immintrin.h>: tests/test_log_double.py compiles this header alone against mpmath.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace vae_fast {
namespace avx2_log_double {

inline __m256d splat(double v) { return _mm256_set1_pd(v); }

// 2^52 + e as a double, minus 2^52: the small non-negative integer e (a biased exponent) of each
// 64-bit lane as a double (AVX2 has no 64-bit integer to double conversion).
inline __m256d small_int_to_double(__m256i e) {
  const __m256d two52 = splat(4503599627370496.0);
  return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(e, _mm256_castpd_si256(two52))), two52);
}

// log(x) for finite x > 0 that is normal, plus k_adjust * ln 2.
inline __m256d log_normal(__m256d x, __m256d k_adjust) {
  const __m256i bits = _mm256_castpd_si256(x);
  // x = 2^k m, m in [1, 2); m above sqrt(2) is halved (k + 1) so that f = m - 1 is in
  // [sqrt(1/2) - 1, sqrt(2) - 1] and exact.
  __m256d k = _mm256_sub_pd(small_int_to_double(_mm256_srli_epi64(bits, 52)), splat(1023.0));
  __m256d m = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi64x(0x000FFFFFFFFFFFFFLL)),
                                                  _mm256_castpd_si256(splat(1.0))));
  const __m256d big = _mm256_cmp_pd(m, splat(1.4142135623730951), _CMP_GT_OQ);
  m = _mm256_blendv_pd(m, _mm256_mul_pd(m, splat(0.5)), big);
  k = _mm256_add_pd(_mm256_add_pd(k, _mm256_and_pd(big, splat(1.0))), k_adjust);
  const __m256d f = _mm256_sub_pd(m, splat(1.0));
  // log(1 + f) = 2 atanh(s) = 2s + s R(s^2), s = f / (2 + f); fdlibm's Lg1..Lg7 in two chains.
  const __m256d s = _mm256_div_pd(f, _mm256_add_pd(splat(2.0), f));
  const __m256d z = _mm256_mul_pd(s, s);
  const __m256d w = _mm256_mul_pd(z, z);
  const __m256d t1 = _mm256_mul_pd(w, _mm256_fmadd_pd(w, _mm256_fmadd_pd(w, splat(1.531383769920937332e-01),
                                                                           splat(2.222219843214978396e-01)),
                                                      splat(3.999999999940941908e-01)));
  const __m256d t2 = _mm256_mul_pd(
      z, _mm256_fmadd_pd(w, _mm256_fmadd_pd(w, _mm256_fmadd_pd(w, splat(1.479819860511658591e-01),
                                                               splat(1.818357216161805012e-01)),
                                            splat(2.857142874366239149e-01)),
                         splat(6.666666666666735130e-01)));
  const __m256d R = _mm256_add_pd(t2, t1);
  const __m256d hfsq = _mm256_mul_pd(splat(0.5), _mm256_mul_pd(f, f));
  // k ln2_hi - ((hfsq - (s (hfsq + R) + k ln2_lo)) - f): ln 2 in two parts, so k ln2_hi is exact.
  const __m256d inner = _mm256_fmadd_pd(s, _mm256_add_pd(hfsq, R), _mm256_mul_pd(k, splat(1.90821492927058770002e-10)));
  return _mm256_fmsub_pd(k, splat(6.93147180369123816490e-01), _mm256_sub_pd(_mm256_sub_pd(hfsq, inner), f));
}

inline __m256d log(__m256d x) {
  const __m256d zero = _mm256_setzero_pd();
  // Denormals: times 2^54 into the normal range, 54 taken off the exponent.
  const __m256d denormal = _mm256_cmp_pd(x, splat(2.2250738585072014e-308), _CMP_LT_OQ);
  const __m256d xs = _mm256_blendv_pd(x, _mm256_mul_pd(x, splat(18014398509481984.0)), denormal);
  __m256d result = log_normal(xs, _mm256_and_pd(denormal, splat(-54.0)));
  result = _mm256_blendv_pd(result, splat(-INFINITY), _mm256_cmp_pd(x, zero, _CMP_EQ_OQ));
  result = _mm256_blendv_pd(result, x, _mm256_cmp_pd(x, splat(INFINITY), _CMP_EQ_OQ));
  return _mm256_blendv_pd(result, splat(NAN), _mm256_cmp_pd(x, zero, _CMP_NGE_UQ));  // x < 0 or NaN
}

// log1p(v) = log(u) + (v - (u - 1)) / u with u = 1 + v rounded (Goldberg): the correction restores
// the digits of v that rounding 1 + v dropped. It is 0 wherever u is 0 (v = -1) or not finite, and
// left out there (0/0 and inf - inf would make it NaN); log(u) alone is then right.
inline __m256d log1p(__m256d v) {
  const __m256d one = splat(1.0);
  const __m256d u = _mm256_add_pd(one, v);
  const __m256d lost = _mm256_sub_pd(v, _mm256_sub_pd(u, one));
  const __m256d correction = _mm256_and_pd(_mm256_cmp_pd(lost, _mm256_setzero_pd(), _CMP_NEQ_OQ), _mm256_div_pd(lost, u));
  return _mm256_add_pd(log(u), correction);
}

}  // namespace avx2_log_double
}  // namespace vae_fast
