// Vector overloads of the element-wise primitives used by csrc/vae_math.h, so that its formulas run
// on at::vec::Vectorized lanes in the CPU kernels. They must be declared before vae_math.h's
// templates, hence this header includes it last.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace vae_fast {
namespace math {
inline namespace VAE_FAST_ISA {

template <typename S>
using Vec = at::vec::Vectorized<S>;

template <typename S> inline Vec<S> exp_(const Vec<S>& v) { return v.exp(); }
template <typename S> inline Vec<S> expm1_(const Vec<S>& v) { return v.expm1(); }
template <typename S> inline Vec<S> exp_nonpos_(const Vec<S>& v) { return v.exp(); }
template <typename S> inline Vec<S> log_(const Vec<S>& v) { return v.log(); }
template <typename S> inline Vec<S> log1p_(const Vec<S>& v) { return v.log1p(); }
template <typename S> inline Vec<S> log1p_unit_(const Vec<S>& v) { return v.log1p(); }
template <typename S> inline Vec<S> sqrt_(const Vec<S>& v) { return v.sqrt(); }
template <typename S> inline Vec<S> sin_(const Vec<S>& v) { return v.sin(); }
template <typename S> inline Vec<S> cos_(const Vec<S>& v) { return v.cos(); }
template <typename S> inline Vec<S> abs_(const Vec<S>& v) { return v.abs(); }
template <typename S> inline Vec<S> recip_(const Vec<S>& v) { return v.reciprocal(); }
template <typename S>
inline Vec<S> clamp_below(const Vec<S>& v, const Vec<S>& lo) {
  return Vec<S>::blendv(v, lo, v < lo);  // a NaN compares false and stays
}
template <typename S>
inline Vec<S> sign_(const Vec<S>& v) {
  const Vec<S> zero(S(0)), one(S(1));
  return Vec<S>::blendv(zero, one, v > zero) - Vec<S>::blendv(zero, one, v < zero);  // NaN: 0, as the scalar
}
template <typename S>
inline bool any_negative_(const Vec<S>& v) {
  S lanes[Vec<S>::size()];
  v.store(lanes);
  bool any = false;
  for (int64_t i = 0; i < Vec<S>::size(); ++i) any |= lanes[i] < S(0);
  return any;
}
template <typename S>
inline Vec<S> select_nonneg(const Vec<S>& cond, const Vec<S>& if_nonneg, const Vec<S>& if_neg) {
  return Vec<S>::blendv(if_neg, if_nonneg, cond >= Vec<S>(S(0)));
}

}  // namespace VAE_FAST_ISA
}  // namespace math
}  // namespace vae_fast

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include "avx2_math.h"  // float32 overloads that replace the Sleef calls above
#endif

#include "../vae_math.h"
