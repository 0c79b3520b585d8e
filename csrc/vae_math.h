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
// Whether v (any lane of a vector) is negative: lets a branch-free formula skip a part that no lane
// selects (NaN counts as not negative).
template <typename S>
VAE_HD bool any_negative_(S v) { return v < S(0); }
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

// ---- count likelihoods: Poisson, negative binomial (NB) and zero-inflated NB ----
// Per element: l = recon = log mu, x >= 0 a count (any real >= 0), t = log theta (theta the
// inverse dispersion), z = zi_logits (pi = sigmoid(z)). The NLL of
//   Poisson: mu - x l + lgamma(x + 1)
//   NB:      -[lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) + theta log(theta / (theta + mu))
//             + x log(mu / (theta + mu))]
//   ZINB:    x = 0: -log(pi + (1 - pi) NB(0)),  x > 0: -log(1 - pi) - log NB(x).
// Written as above, the NB cancels catastrophically: lgamma(x + theta) - lgamma(theta) ~ x log theta
// against x log(mu / (theta + mu)) ~ x (l - t) loses every digit once theta >> x (scvi-tools issue
// 2965), and lgamma(x + 1) against x l - mu loses them once x ~ mu is large (Poisson at x = mu =
// 1e6 is 7.9 out of terms of 1.3e7). So the NLL is taken apart as in Loader's binomial algorithm
// (Loader 2000, "Fast and accurate computation of binomial probabilities"; R's dnbinom_mu):
// with J(y) = lgamma(y) - (y - 1/2) log y + y - log(2 pi) / 2 (Binet's function, Loader's
// stirlerr; small and positive) and the deviance bd0(a, m) = a log(a / m) + m - a >= 0,
//   lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
//     = J(n) - J(theta) - J(x) + theta log(n / theta) + x log(n / x) - log(2 pi x theta / n) / 2,
// n = x + theta, and adding the last two terms of log NB leaves, for x > 0,
//   NLL = log(2 pi) / 2 + J(x) + log(x) / 2 + J(theta) - J(n) + log1p(x / theta) / 2
//         + bd0(x, M) + bd0(theta, n - M),   M = n sigmoid(a), a = l - t
// (M and n - M are the means of x and theta in the binomial that NB(x) is a ratio of). Each
// deviance is a non-negative -c log1pmx(w) with log1pmx(w) = log(1 + w) - w:
//   bd0(x, M) = -x log1pmx(d / x),  bd0(theta, n - M) = -theta log1pmx(-d / theta),
// d = M - x = theta sigmoid(a) - x sigmoid(-a), which is also d NLL / d l. The sigmoids and
// softplus of a never overflow, so a mu whose exp overflows still gives the right (large) NLL. As
// theta -> inf this is, term by term, Poisson's NLL = log(2 pi)/2 + J(x) + log(x)/2 + bd0(x, mu),
// which the Poisson kernel uses. At x = 0 both are theta softplus(a) (mu for Poisson).
// Gradients: d/dt = -theta [E + log1pmx(-d / theta)] with E = psit(n) - psit(theta), psit(y) =
// digamma(y) - log y: the digamma difference of the textbook form minus log1p(x / theta), both of
// which tend to x / theta and cancel; E comes from the difference of psit's asymptotic series term
// by term (p^k - q^k = (p - q)(...), p - q = x p q: nothing cancels) for theta >= 8.
// d/dx = digamma(x + 1) - l + softplus(a) - log1p(x / theta) - psit(n) (the Poisson limit:
// digamma(x + 1) - l).
// The kernels evaluate all of this in double for every input dtype: the shifted lgamma/digamma
// forms below y = 8 subtract terms of ~40 to leave ~1 (fine in double, ~4e-6 in float), and the
// result is rounded once to the gradient's dtype.

// Small-argument threshold of the asymptotic series: at y >= 8 the series below, to y^-15 and
// y^-14, are exact to < 1e-15 relative; smaller arguments are shifted up by 8 (recurrences).
constexpr double kSeriesMin = 8.0;
// The smallest positive double: x - it is negative exactly for x = 0 (and -0).
constexpr double kSmallestDouble = 4.9406564584124654e-324;

// sigmoid(+-a) from e = exp(-|a|), which never overflows; e is kept for a softplus of a later.
template <typename T>
struct Sigmoids {
  T sig;      // sigmoid(a)
  T sig_neg;  // sigmoid(-a) = 1 - sigmoid(a), without the cancellation
  T e;        // exp(-|a|)
};

template <typename T>
VAE_HD Sigmoids<T> sigmoids(T a) {
  const T one(1);
  const T e = exp_(T(0) - abs_(a));
  const T big = one / (one + e);
  const T small = e * big;
  return {select_nonneg(a, big, small), select_nonneg(a, small, big), e};
}

// softplus(a) = log(1 + e^a) from the e = exp(-|a|) of sigmoids(a).
template <typename T>
VAE_HD T softplus_of(T a, const Sigmoids<T>& s) {
  const T tail = log1p_(s.e);
  return select_nonneg(a, a + tail, tail);
}

// sigmoid(+-a) and softplus(+-a).
template <typename T>
struct Logistic {
  T sig;      // sigmoid(a)
  T sig_neg;  // sigmoid(-a)
  T sp;       // softplus(a) = log(1 + e^a)
  T sp_neg;   // softplus(-a) = softplus(a) - a
};

template <typename T>
VAE_HD Logistic<T> logistic(T a) {
  const Sigmoids<T> s = sigmoids(a);
  const T tail = log1p_(s.e);
  Logistic<T> g;
  g.sig = s.sig;
  g.sig_neg = s.sig_neg;
  g.sp = select_nonneg(a, a + tail, tail);
  g.sp_neg = select_nonneg(a, tail, tail - a);
  return g;
}

// log(1 + u) - u. `log1p_u` is log(1 + u) as the caller computes it from exact pieces; below
// |u| = 1/4 the atanh series is used instead: with s = u / (2 + u), log(1 + u) = 2 atanh(s) and
// u = 2 s / (1 - s), so log(1 + u) - u = -s u + 2 s^3 (1/3 + s^2/5 + s^4/7 + ...), where nothing
// cancels (|s| < 1/7: the terms to s^19 leave < 1e-17 relative).
template <typename T>
VAE_HD T log1pmx_(T u, T log1p_u) {
  const T s = u / (T(2) + u);
  const T s2 = s * s;
  const T tail = T(1.0 / 3) + s2 * (T(1.0 / 5) + s2 * (T(1.0 / 7) + s2 * (T(1.0 / 9) + s2 * (T(1.0 / 11) +
                 s2 * (T(1.0 / 13) + s2 * (T(1.0 / 15) + s2 * (T(1.0 / 17) + s2 * T(1.0 / 19))))))));
  const T series = T(2) * s * s2 * tail - s * u;
  return select_nonneg(T(0.25) - abs_(u), series, log1p_u - u);  // NaN u: the NaN difference
}

// Binet's function J(y) = lgamma(y) - (y - 1/2) log y + y - log(2 pi) / 2 by Stirling's series,
// y >= 8: 1/(12y) - 1/(360y^3) + ... (Bernoulli numbers B_2k / (2k (2k - 1) y^(2k-1))).
template <typename T>
VAE_HD T binet_series(T y) {
  const T r = T(1) / y, r2 = r * r;
  return r * (T(1.0 / 12) - r2 * (T(1.0 / 360) - r2 * (T(1.0 / 1260) - r2 * (T(1.0 / 1680) - r2 * (T(1.0 / 1188) -
         r2 * (T(691.0 / 360360) - r2 * (T(1.0 / 156) - r2 * T(3617.0 / 122400))))))));
}

// J(y) for any y > 0: below 8 from J(y + 8) and lgamma(y) = lgamma(y + 8) - log(y (y+1) ... (y+7)).
template <typename T>
VAE_HD T binet(T y) {
  if (!any_negative_(y - T(kSeriesMin))) return binet_series(y);
  const T shift(kSeriesMin);
  const T w = y + shift;
  T q = y + T(1);  // (y+1) ... (y+7); y * q is the product
  for (int i = 2; i < 8; ++i) q = q * (y + T(i));
  const T correction = (y + T(7.5)) * log_(w) - (y + T(0.5)) * log_(y) - log_(q) - shift;
  const T small = y - shift;  // < 0: shifted
  return binet_series(select_nonneg(small, y, w)) + select_nonneg(small, T(0), correction);
}

// psit(y) = digamma(y) - log y by its asymptotic series, y >= 8:
// -1/(2y) - 1/(12y^2) + 1/(120y^4) - ... (B_2k / (2k y^2k)).
template <typename T>
VAE_HD T digamma_minus_log_series(T y) {
  const T r = T(1) / y, r2 = r * r;
  return T(0) - T(0.5) * r - r2 * (T(1.0 / 12) - r2 * (T(1.0 / 120) - r2 * (T(1.0 / 252) - r2 * (T(1.0 / 240) -
         r2 * (T(1.0 / 132) - r2 * (T(691.0 / 32760) - r2 * T(1.0 / 12)))))));
}

// psit(y) for any y > 0: below 8, digamma(y) = digamma(y + 8) - sum_{i<8} 1/(y + i), the sum as
// P'/P of P = y (y+1) ... (y+7) (one division), and log(y + 8) - log(y) = log1p(8 / y).
template <typename T>
VAE_HD T digamma_minus_log(T y) {
  if (!any_negative_(y - T(kSeriesMin))) return digamma_minus_log_series(y);
  const T shift(kSeriesMin);
  T product(1), derivative(0);
  for (int i = 0; i < 8; ++i) {
    derivative = derivative * (y + T(i)) + product;
    product = product * (y + T(i));
  }
  const T correction = log1p_(shift / y) - derivative / product;
  const T small = y - shift;
  return digamma_minus_log_series(select_nonneg(small, y, y + shift)) + select_nonneg(small, T(0), correction);
}

// E = psit(theta + x) - psit(theta). For theta >= 8 from the series term by term with p = 1/theta,
// q = 1/(theta + x): p^2k - q^2k = (p - q)(p + q) tau_{k-1}, tau_k = sum_j P^(k-j) Q^j (P = p^2,
// Q = q^2), and p - q = x p q, so E = x p q [1/2 + (p + q)(tau_0/12 - tau_1/120 + tau_2/252 - ...)]
// with no difference of nearly equal numbers (E ~ x / (2 theta^2) while psit ~ -1/(2 theta)).
// Below 8 the two psit are small enough to subtract.
template <typename T>
VAE_HD T digamma_minus_log_difference(T theta, T x, T psit_theta) {
  if (!any_negative_(T(0) - x)) return x * T(0);  // every x is 0 (or NaN): E = 0 (NaN)
  const T small = theta - T(kSeriesMin);
  const T a = select_nonneg(small, theta, T(kSeriesMin));
  const T p = T(1) / a, q = T(1) / (a + x);
  const T P = p * p, Q = q * q;
  const T tau1 = P + Q;
  const T tau2 = P * tau1 + Q * Q;
  const T tau3 = P * tau2 + Q * Q * Q;
  const T Q4 = Q * Q * Q * Q;
  const T tau4 = P * tau3 + Q4;
  const T tau5 = P * tau4 + Q4 * Q;
  const T tau6 = P * tau5 + Q4 * Q * Q;
  const T bracket = T(0.5) + (p + q) * (T(1.0 / 12) - tau1 * T(1.0 / 120) + tau2 * T(1.0 / 252) - tau3 * T(1.0 / 240) +
                                        tau4 * T(1.0 / 132) - tau5 * T(691.0 / 32760) + tau6 * T(1.0 / 12));
  const T series = x * p * q * bracket;
  if (!any_negative_(small)) return series;
  const T direct = digamma_minus_log(theta + x) - psit_theta;
  return select_nonneg(small, series, direct);
}

template <typename T>
struct CountTerm {
  T loss;
  T d_recon;      // d NLL / d l
  T d_log_theta;  // d NLL / d t (nb, zinb)
  T d_zi;         // d NLL / d z (zinb)
};

// NaN for a target that is no count (negative, NaN or infinite), else 0: added to every output,
// so that on CUDA, where the loss cannot refuse it without a host sync, such an x gives NaN.
template <typename T>
VAE_HD T count_domain_poison(T x) {
  return (x - x) + select_nonneg(x, T(0), T(NAN));
}

// log(x!) - (x log x - x) = log(2 pi x)/2 + J(x), Stirling's remainder: the part of the Poisson and
// NB NLL at x > 0 that depends on x alone. The counts 0..7 (most of a count matrix's entries) take it
// from a table, saving binet's shift below 8 (three logs and a division); a vector with any other x
// below 8 (not a whole number) takes binet. x = 0 gives 0, the limit (never used: its NLL has no
// such term).
template <typename T>
VAE_HD T log_factorial_remainder(T x) {
  constexpr double kRemainder[8] = {0.0, 1.0, 1.3068528194400546, 1.4959226032237258, 1.6328763858683832,
                                    1.7403021806115442, 1.828694396641771, 1.9037903176782212};
  T table(0), matched(0);
  for (int k = 0; k < 8; ++k) {
    const T hit = T(0) - abs_(x - T(k));  // >= 0 only where x == k
    table = select_nonneg(hit, T(kRemainder[k]), table);
    matched = select_nonneg(hit, T(1), matched);
  }
  const T small = x - T(kSeriesMin);
  if (any_negative_(select_nonneg(small, T(1), matched - T(0.5)))) {  // some x < 8 not in the table (or NaN)
    return T(kHalfLog2Pi) + binet(x) + T(0.5) * log_(x);
  }
  if (!any_negative_(T(kSeriesMin - 0.5) - x)) return table;  // every x is in the table
  const T large = T(kHalfLog2Pi) + binet_series(select_nonneg(small, x, T(kSeriesMin))) + T(0.5) * log_(x);
  return select_nonneg(small, large, table);
}

// log(2 pi x)/2 + J(x) - x log1pmx(w): Poisson's and NB's NLL at x > 0 less the NB-only terms.
template <typename T>
VAE_HD T count_nll_core(T x, T w, T log1p_w) {
  return log_factorial_remainder(x) - x * log1pmx_(w, log1p_w);
}

template <typename T>
VAE_HD CountTerm<T> poisson_term(T l, T x) {
  const T mu = exp_(l);
  const T w = (mu - x) / x;  // x = 0 lanes: not selected below
  CountTerm<T> c;
  const T poison = count_domain_poison(x) + (l - l);  // and a NaN or infinite l: no finite gradient
  c.loss = select_nonneg(T(0) - x, mu, count_nll_core(x, w, l - log_(x))) + poison;
  c.d_recon = mu - x + poison;
  c.d_log_theta = T(0);
  c.d_zi = T(0);
  return c;
}

// d NLL / d x of Poisson (theta = inf) and NB: digamma(x + 1) - l [+ softplus(a) - log1p(x / theta) - psit(x + theta)].
template <typename T>
VAE_HD T poisson_target_grad(T l, T x) {
  const T y = x + T(1);
  return log_(y) + digamma_minus_log(y) - l + count_domain_poison(x) + (l - l);
}

// What the NB needs of log_theta alone: hoisted out of the rows where log_theta is per feature.
template <typename T>
struct NbTheta {
  T t;
  T theta;  // exp(t)
  T binet;  // J(theta)
  T psit;   // digamma(theta) - log(theta)
};

template <typename T>
VAE_HD NbTheta<T> nb_theta(T t) {
  NbTheta<T> h;
  h.t = t;
  h.theta = exp_(t);
  h.binet = binet(h.theta);
  h.psit = digamma_minus_log(h.theta);
  return h;
}

// The NB pieces shared by the loss and the target gradient.
template <typename T>
struct NbParts {
  Logistic<T> g;  // of a = l - t
  T log1p_xi;     // log1p(x / theta)
};

template <typename T>
VAE_HD NbParts<T> nb_parts(T l, T x, T t, T theta) {
  NbParts<T> parts;
  parts.g = logistic(l - t);
  // 0 where x = 0: a vector of zeros (most of a count matrix) skips the division and the log.
  parts.log1p_xi = any_negative_(T(0) - x) ? log1p_(x / theta) : x / theta;
  return parts;
}

template <typename T>
VAE_HD CountTerm<T> nb_term(T l, T x, const NbTheta<T>& th, const NbParts<T>& parts) {
  const T t = th.t, theta = th.theta;
  const Logistic<T>& g = parts.g;
  const T d = theta * g.sig - x * g.sig_neg;
  const T u = T(0) - d / theta;
  const T log1pmx_u = log1pmx_(u, parts.log1p_xi - g.sp);
  const T poison = count_domain_poison(x) + (l - l) + (t - t);
  CountTerm<T> c;
  c.loss = theta * g.sp;
  if (any_negative_(T(0) - x)) {  // some x > 0 (zeros, most of a single-cell matrix, skip this)
    const T n = x + theta;
    const T w = d / x;  // x = 0 lanes: not selected below
    const T positive = count_nll_core(x, w, log1p_(theta / x) - g.sp_neg) + th.binet - binet(n) +
                       T(0.5) * parts.log1p_xi - theta * log1pmx_u;
    c.loss = select_nonneg(T(0) - x, c.loss, positive);
  }
  c.loss = c.loss + poison;
  c.d_recon = d + poison;
  c.d_log_theta = T(0) - theta * (digamma_minus_log_difference(theta, x, th.psit) + log1pmx_u) + poison;
  c.d_zi = T(0);
  return c;
}

template <typename T>
VAE_HD T nb_target_grad(T l, T x, T t, T theta, const NbParts<T>& parts) {
  return poisson_target_grad(l, x) + parts.g.sp - parts.log1p_xi - digamma_minus_log(x + theta) + (t - t);
}

// ZINB's d/dx: the NB's for x > 0, 0 at x = 0 (NaN with any NaN input).
template <typename T>
VAE_HD T zinb_target_grad(T z, T x, T nb_grad) {
  return select_nonneg(T(0) - x, T(0) * nb_grad, nb_grad) + (z - z);
}

// ZINB from the NB term at the same x. x > 0: NLL_nb + softplus(z). x = 0, with A = NLL_nb(0) =
// theta softplus(a) and c = z + A:
//   NLL = -log(pi + (1 - pi) e^-A) = -log1p(-w0), w0 = sigmoid(-z) (1 - e^-A), for w0 < 1/2;
//       = softplus(z) - softplus(c) + A (= softplus(z) - logaddexp(z, -A)) otherwise (w0 near 1
//         would lose 1 - w0), where these terms are O(1) and do not cancel;
//   d/dA = sigmoid(-c), so d/dl and d/dt are the NB's times sigmoid(-c);
//   d/dz = sigmoid(z) - sigmoid(c): for A < 1 as -sigmoid(z) sigmoid(-c) expm1(A) (the difference
//   of two close sigmoids), for z >= 0 as sigmoid(-c) - sigmoid(-z) (two small ones), else direct.
// d/dx is 0 at x = 0: the point mass does not move with x.
template <typename T>
VAE_HD CountTerm<T> zinb_term(T z, T x, const CountTerm<T>& nb) {
  const Sigmoids<T> gz = sigmoids(z);
  const T poison = z - z;
  if (!any_negative_(x - T(kSmallestDouble))) {  // no x is 0: the x > 0 case alone
    return {nb.loss + softplus_of(z, gz) + poison, nb.d_recon + poison, nb.d_log_theta + poison, gz.sig + poison};
  }
  const T A = nb.loss;
  const T c = z + A;
  const Sigmoids<T> gc = sigmoids(c);  // its softplus (a log) only for lanes with w0 > 1/2, below
  const T expm1_neg_A = expm1_(T(0) - A);
  const T w0 = gz.sig_neg * (T(0) - expm1_neg_A);
  const T near = T(0.5) - w0;  // >= 0: w0 <= 1/2, the log1p form
  const bool some_far = any_negative_(near);  // some w0 > 1/2
  // softplus(z) (a log) only for a vector that uses it: one with an x > 0 or a w0 > 1/2 lane.
  const T sp_z = some_far || any_negative_(T(0) - x) ? softplus_of(z, gz) : T(0) * z;
  T loss0 = near;  // each form only where some lane takes it (a NaN lane stays NaN either way)
  if (any_negative_(select_nonneg(near, T(-1), T(1)))) loss0 = T(0) - log1p_(T(0) - w0);  // some w0 <= 1/2
  if (some_far) loss0 = select_nonneg(near, loss0, sp_z - softplus_of(c, gc) + A);
  const T dz_far = select_nonneg(z, gc.sig_neg - gz.sig_neg, gz.sig - gc.sig);
  // expm1(A) = -expm1(-A) / e^-A, exact to a few ulp where it is used (A < 1: e^-A > 0.36).
  const T expm1_A = (T(0) - expm1_neg_A) / (T(1) + expm1_neg_A);
  const T dz0 = select_nonneg(A - T(1), dz_far, T(0) - gz.sig * gc.sig_neg * expm1_A);
  const T zero = T(0) - x;  // >= 0: the x = 0 case
  CountTerm<T> r;
  r.loss = select_nonneg(zero, loss0, nb.loss + sp_z) + poison;
  r.d_recon = select_nonneg(zero, gc.sig_neg * nb.d_recon, nb.d_recon) + poison;
  r.d_log_theta = select_nonneg(zero, gc.sig_neg * nb.d_log_theta, nb.d_log_theta) + poison;
  r.d_zi = select_nonneg(zero, dz0, gz.sig) + poison + (A - A);
  return r;
}

// The term of a count likelihood (th: nb/zinb; z: zinb; unused otherwise).
template <Likelihood kLik, typename T>
VAE_HD CountTerm<T> count_term(T l, T x, const NbTheta<T>& th, T z) {
  static_assert(is_count(kLik), "count_term: poisson, nb or zinb");
  if constexpr (kLik == Likelihood::poisson) {
    return poisson_term(l, x);
  } else {
    const CountTerm<T> nb = nb_term(l, x, th, nb_parts(l, x, th.t, th.theta));
    if constexpr (kLik == Likelihood::zinb) return zinb_term(z, x, nb);
    return nb;
  }
}

// Its d NLL / d x, computed only where the target's gradient is wanted (two more digammas).
template <Likelihood kLik, typename T>
VAE_HD T count_target_grad(T l, T x, const NbTheta<T>& th, T z) {
  if constexpr (kLik == Likelihood::poisson) {
    return poisson_target_grad(l, x);
  } else {
    const T nb = nb_target_grad(l, x, th.t, th.theta, nb_parts(l, x, th.t, th.theta));
    if constexpr (kLik == Likelihood::zinb) return zinb_target_grad(z, x, nb);
    return nb;
  }
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
