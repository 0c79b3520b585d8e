// The scalar math of vae_fast, written once and used by every kernel.
//
// Each formula is a template over T, which is a float/double on CUDA and in the CPU tails, and an
// at::vec::Vectorized<float|double> in the CPU bodies: the element-wise primitives below have
// scalar overloads here and vector overloads in csrc/cpu/vec_primitives.h. Formulas are branch-free
// (select_nonneg instead of ?:) so that the same text works for both.
#pragma once

#include "likelihood.h"
#include "noise_use.h"

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define VAE_HD __host__ __device__ __forceinline__
#else
#define VAE_HD inline
#endif

// The CPU kernels are compiled once per instruction set (csrc/cpu/kernels_*.cpp); the inline
// namespace keeps each copy's symbols apart so the linker never mixes an AVX2 body into the
// generic path.
#ifndef VAE_FAST_ISA
#define VAE_FAST_ISA generic
#endif

namespace vae_fast {
namespace math {
inline namespace VAE_FAST_ISA {

// ---- scalar primitives (float and double overloads, host and device) ----
VAE_HD float exp_(float v) { return ::expf(v); }
VAE_HD double exp_(double v) { return ::exp(v); }
VAE_HD float expm1_(float v) { return ::expm1f(v); }
VAE_HD double expm1_(double v) { return ::expm1(v); }
VAE_HD float log_(float v) { return ::logf(v); }
VAE_HD double log_(double v) { return ::log(v); }
VAE_HD float log1p_(float v) { return ::log1pf(v); }
VAE_HD double log1p_(double v) { return ::log1p(v); }
// exp of an argument known to be <= 0 (or NaN); vector builds may flush results below FLT_MIN to 0.
VAE_HD float exp_nonpos_(float v) { return ::expf(v); }
VAE_HD double exp_nonpos_(double v) { return ::exp(v); }
// 1 / v; vector builds may use a reciprocal estimate refined to ~1 ulp (never for v = 0 or inf).
VAE_HD float recip_(float v) { return 1.0f / v; }
VAE_HD double recip_(double v) { return 1.0 / v; }
// log1p of an argument known to lie in [0, 1]; vector builds may use a cheaper series there.
VAE_HD float log1p_unit_(float v) { return ::log1pf(v); }
VAE_HD double log1p_unit_(double v) { return ::log1p(v); }
VAE_HD float sqrt_(float v) { return ::sqrtf(v); }
VAE_HD double sqrt_(double v) { return ::sqrt(v); }
VAE_HD float sin_(float v) { return ::sinf(v); }
VAE_HD double sin_(double v) { return ::sin(v); }
VAE_HD float cos_(float v) { return ::cosf(v); }
VAE_HD double cos_(double v) { return ::cos(v); }
VAE_HD float abs_(float v) { return ::fabsf(v); }
VAE_HD double abs_(double v) { return ::fabs(v); }
// `v < lo ? lo : v` keeps a NaN v (fmax would replace it by lo and hide it).
template <typename S>
VAE_HD S clamp_below(S v, S lo) { return v < lo ? lo : v; }
template <typename S>
VAE_HD S select_nonneg(S cond, S if_nonneg, S if_neg) { return cond >= S(0) ? if_nonneg : if_neg; }
// -1, 0 or +1 (0 for 0 and NaN), as torch.sign.
template <typename S>
VAE_HD S sign_(S v) { return static_cast<S>((v > S(0)) - (v < S(0))); }

// max(log p, -100) and max(log1p(-p), -100) for a probability p (binary_cross_entropy's clamp);
// the AVX2 build replaces them with logarithms specialized to p in [0, 1] (a value outside, which
// the loss refuses, may come out anything). NaN stays NaN.
template <typename T>
VAE_HD T log_prob_clamped_(T p) { return clamp_below(log_(p), T(-100)); }
template <typename T>
VAE_HD T log1m_prob_clamped_(T p) { return clamp_below(log1p_(-p), T(-100)); }

// max(log p, -100) where x = 1 and max(log1p(-p), -100) where x = 0, for a target x that is exactly
// 0 or 1 (binarized data); the AVX2 build takes one logarithm per lane instead of both.
template <typename T>
VAE_HD T log_binary_likelihood_clamped_(T p, T x) {
  return select_nonneg(x - T(0.5), log_prob_clamped_(p), log1m_prob_clamped_(p));
}

// ---- Bernoulli reconstruction term, one element ----
template <typename T>
struct BceTerm {
  T loss;      // -[x log p + (1 - x) log(1 - p)]
  T d_recon;   // d loss / d recon (recon = p or logit r)
  T d_target;  // d loss / d x
};

// From probabilities p, with log terms clamped at -100 and the gradient's denominator at 1e-12,
// exactly as torch.nn.functional.binary_cross_entropy and its backward do.
template <typename T>
VAE_HD BceTerm<T> bce_from_probs(T p, T x) {
  const T one(1), min_denominator(1e-12);
  const T log_p = log_prob_clamped_(p);
  const T log_1mp = log1m_prob_clamped_(p);
  BceTerm<T> t;
  t.loss = -(x * log_p + (one - x) * log_1mp);
  t.d_recon = (p - x) * recip_(clamp_below(p * (one - p), min_denominator));
  t.d_target = log_1mp - log_p;
  return t;
}

// bce_from_probs's loss and d_recon, bit for bit, for a target x that is exactly 0 or 1: then
// x log p + (1 - x) log(1 - p) is one of the two logarithms. d_target, which needs both, is NaN: a
// caller that wants it takes bce_from_probs.
template <typename T>
VAE_HD BceTerm<T> bce_from_probs_binary_target(T p, T x) {
  const T one(1), min_denominator(1e-12);
  BceTerm<T> t;
  t.loss = T(0) - log_binary_likelihood_clamped_(p, x);
  t.d_recon = (p - x) * recip_(clamp_below(p * (one - p), min_denominator));
  t.d_target = T(NAN);
  return t;
}

// From logits r. loss = softplus(r) - x r, written as [(1-x) r if r >= 0 else -x r] + log1p(e^-|r|)
// so that nothing cancels for saturated logits. The gradient sigmoid(r) - x is computed as
// (1 - x) sigmoid(r) - x sigmoid(-r): the naive difference loses all digits of sigmoid(-r) when
// sigmoid(r) rounds to 1 (e.g. r = 20, x = 1 gives ~1e-3 relative error in float32).
template <typename T>
VAE_HD BceTerm<T> bce_from_logits(T r, T x) {
  const T one(1);
  const T e = exp_nonpos_(-abs_(r));
  const T big = recip_(one + e);  // sigmoid(|r|), 1 + e in [1, 2]
  const T small = e * big;        // sigmoid(-|r|)
  BceTerm<T> t;
  t.loss = select_nonneg(r, (one - x) * r, -(x * r)) + log1p_unit_(e);
  t.d_recon = (one - x) * select_nonneg(r, big, small) - x * select_nonneg(r, small, big);
  t.d_target = -r;
  return t;
}

// ---- Gaussian and Laplace reconstruction terms, one element ----
// Both are location-scale families: recon m is the mean (location), s = log_scale the log of the
// standard deviation sigma (Gaussian) or of the scale b (Laplace). The element's NLL is
//   gaussian: 0.5 ((x - m) / sigma)^2 + s + 0.5 log(2 pi)
//   laplace:  |x - m| / b + s + log 2
// The functions below take r = exp(-s) (hoisted per feature, or per call for one shared scale, by
// the callers) and return only the part that depends on x: the `s + constant` part is the same for
// every sample and is added by the caller (once per row where s is shared).
template <typename T>
struct LocationScaleTerm {
  T loss;         // the NLL without s + constant
  T d_recon;      // d NLL / d m
  T d_target;     // d NLL / d x
  T d_log_scale;  // d NLL / d s (including the +1 of the s term)
};

// NLL constants: 0.5 log(2 pi) and log 2.
constexpr double kHalfLog2Pi = 0.91893853320467274178;
constexpr double kLog2 = 0.69314718055994530942;

// A NaN or infinite residual must not leave a finite loss or gradient (with x = inf the Laplace
// gradient would be the finite -1/b): u - u is 0 for finite u and NaN otherwise, and is added to
// every output.
template <typename T>
VAE_HD LocationScaleTerm<T> poisoned(LocationScaleTerm<T> t, T u) {
  const T poison = u - u;
  t.loss = t.loss + poison;
  t.d_recon = t.d_recon + poison;
  t.d_target = t.d_target + poison;
  t.d_log_scale = t.d_log_scale + poison;
  return t;
}

// z = (x - m) / sigma; loss 0.5 z^2, d/dm = -z / sigma, d/ds = 1 - z^2. (z times r again rather
// than (x - m) r^2: r^2 would overflow float32 for s < -44, r itself only for s < -88.) The loss is
// (0.5 z) z, halved before the product: z^2 overflows float32 for |z| > 1.84e19 while 0.5 z^2 fits
// up to 2.6e19; z^2 is then 2 loss, the same bits as z * z (scaling by 2 is exact).
template <typename T>
VAE_HD LocationScaleTerm<T> gaussian_term(T m, T x, T r) {
  const T u = x - m;
  const T z = u * r;
  LocationScaleTerm<T> t;
  t.loss = (T(0.5) * z) * z;
  t.d_target = z * r;
  t.d_recon = T(0) - t.d_target;
  t.d_log_scale = T(1) - (t.loss + t.loss);
  return poisoned(t, u);
}

// a = |x - m| / b; loss a, d/dm = -sign(x - m) / b (0 at x == m, torch.abs's subgradient), d/ds = 1 - a.
template <typename T>
VAE_HD LocationScaleTerm<T> laplace_term(T m, T x, T r) {
  const T u = x - m;
  const T a = abs_(u) * r;
  LocationScaleTerm<T> t;
  t.loss = a;
  t.d_target = sign_(u) * r;
  t.d_recon = T(0) - t.d_target;
  t.d_log_scale = T(1) - a;
  return poisoned(t, u);
}

template <Likelihood kLik, typename T>
VAE_HD LocationScaleTerm<T> location_scale_term(T m, T x, T r) {
  static_assert(kLik != Likelihood::bernoulli, "Bernoulli has no scale: bce_from_probs / bce_from_logits");
  if constexpr (kLik == Likelihood::gaussian) {
    return gaussian_term(m, x, r);
  } else {
    return laplace_term(m, x, r);
  }
}

// The NLL's constant per element.
template <Likelihood kLik>
VAE_HD double location_scale_constant() {
  return kLik == Likelihood::gaussian ? kHalfLog2Pi : kLog2;
}

// r = exp(-s), NaN for a NaN or infinite s (whose exp is 0 or inf and would otherwise give a
// finite or 0 * inf loss): a non-finite scale must make the loss and gradients NaN.
template <typename T>
VAE_HD T inverse_scale(T s) {
  return exp_(T(0) - s) + (s - s);
}

// ---- KL(N(mu, exp(logvar)) || N(0, 1)), one latent ----
template <typename T>
struct KlTerm {
  T kl;
  T d_mu;
  T d_logvar;
};

// expm1(lv) - lv = lv^2/2 + lv^3/6 + ..., >= 0. Computed as that difference it cancels for small
// |lv| (float32: relative error 1e-4 at lv = 1e-3, total at 1e-12), so below |lv| = 0.1 the Taylor
// series to lv^8 is used instead: its truncation error there is < 6e-13 relative, and the
// difference above 0.1 loses at most ~20 ulp.
template <typename T>
VAE_HD T expm1_minus_x(T lv, T em1) {
  const T series = lv * lv *
                   (T(1.0 / 2) + lv * (T(1.0 / 6) + lv * (T(1.0 / 24) + lv * (T(1.0 / 120) +
                   lv * (T(1.0 / 720) + lv * (T(1.0 / 5040) + lv * T(1.0 / 40320)))))));
  // NaN lv: 0.1 - |NaN| is NaN, not >= 0, so the (NaN) difference is taken.
  return select_nonneg(T(0.1) - abs_(lv), series, em1 - lv);
}

// kl = -0.5 (1 + lv - mu^2 - e^lv) = 0.5 (mu^2 + (expm1(lv) - lv)): two non-negative terms, so
// nothing cancels once expm1(lv) - lv is accurate (above). A logvar that overflows exp gives +inf,
// never NaN.
template <typename T>
VAE_HD KlTerm<T> kl_standard_normal(T mu, T lv) {
  const T half(0.5);
  const T em1 = expm1_(lv);
  KlTerm<T> t;
  t.kl = half * (mu * mu + expm1_minus_x(lv, em1));
  t.d_mu = mu;
  t.d_logvar = half * em1;
  return t;
}

// With beta = 0 the KL has no weight, yet 0 * (the +inf KL of a finite logvar whose exp overflows)
// is NaN. So a weight-0 KL is evaluated at this logvar instead: a finite lv > 0 becomes 0 (any
// finite KL times 0 is 0), while NaN and +inf stay as they are, so NaN/inf inputs still give NaN.
template <typename S>
VAE_HD S logvar_for_zero_weight(S lv) {
  const bool finite = lv - lv == S(0);  // false for NaN and +-inf
  return (finite && lv > S(0)) ? S(0) : lv;
}

// ---- reparameterization ----
template <typename T>
VAE_HD T reparameterize_sample(T mu, T lv, T eps) {
  return mu + exp_(T(0.5) * lv) * eps;
}

// d z / d logvar = 0.5 exp(0.5 lv) eps, with eps drawn again from the forward's Philox counters
// (not 0.5 (z - mu) from the stored z: where sigma * eps is small next to the spacing of mu's dtype
// that difference cancels, e.g. bfloat16 mu = 1, logvar = -8 gave 0 or +42%).
template <typename T>
VAE_HD T reparameterize_grad_logvar(T grad_z, T lv, T eps) {
  return T(0.5) * grad_z * exp_(T(0.5) * lv) * eps;
}

template <NoiseUse kUse, typename T>
VAE_HD T apply_noise(T a, T b, T eps) {
  if constexpr (kUse == NoiseUse::sample) {
    return reparameterize_sample(a, b, eps);
  } else if constexpr (kUse == NoiseUse::grad_logvar) {
    return reparameterize_grad_logvar(a, b, eps);
  } else {
    return eps;
  }
}

// ---- counter-based normal numbers ----
// Philox4x32-10 (Salmon et al., SC'11): a pure function of (counter, key), so every element's
// noise depends only on (seed, offset, its index), never on thread count or launch shape.
struct Philox4 {
  uint32_t v[4];
};

VAE_HD Philox4 philox4x32_10(uint64_t seed, uint64_t offset, uint64_t subsequence) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = static_cast<uint32_t>(subsequence), c3 = static_cast<uint32_t>(subsequence >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Uniforms from 32 random bits: (0, 1] for the logarithm (never log 0), [0, 1) for the angle.
// float keeps the top 24 bits so that the value is exact (no rounding up to 1 from below), which
// also lets the CPU's SIMD path convert with a signed integer instruction and get the same bits.
VAE_HD float uniform_open_closed(uint32_t bits, float) { return static_cast<float>((bits >> 8) + 1u) * 5.9604644775390625e-8f; }
VAE_HD float uniform_closed_open(uint32_t bits, float) { return static_cast<float>(bits >> 8) * 5.9604644775390625e-8f; }
VAE_HD double uniform_open_closed(uint32_t bits, double) { return (static_cast<double>(bits) + 1.0) * 2.3283064365386963e-10; }
VAE_HD double uniform_closed_open(uint32_t bits, double) { return static_cast<double>(bits) * 2.3283064365386963e-10; }
template <typename S>
VAE_HD S uniform_open_closed(uint32_t bits) { return uniform_open_closed(bits, S()); }
template <typename S>
VAE_HD S uniform_closed_open(uint32_t bits) { return uniform_closed_open(bits, S()); }

// Box-Muller: two uniforms give two independent standard normals.
template <typename T>
VAE_HD void box_muller(T u_radius, T u_angle, T& first, T& second) {
  const T radius = sqrt_(T(-2) * log_(u_radius));
  const T angle = T(6.283185307179586) * u_angle;
  first = radius * cos_(angle);
  second = radius * sin_(angle);
}

// Element i of a draw takes its noise from Philox block i / 4 (subsequence) at the call's offset:
// word pair (0,1) gives elements 4k and 4k+1, pair (2,3) elements 4k+2 and 4k+3.
constexpr int64_t kNormalsPerPhiloxBlock = 4;

}  // namespace VAE_FAST_ISA
}  // namespace math
}  // namespace vae_fast
