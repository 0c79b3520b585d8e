// CPU kernel bodies, compiled once per instruction set: kernels_<isa>.cpp defines VAE_FAST_ISA
// (and the target flags) and includes this file. The math comes from csrc/vae_math.h.
#pragma once

#include "kernels.h"
#include "vec_primitives.h"
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include "avx2_noise.h"  // reparameterize's float32 normals, 64 at a time
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

namespace vae_fast {
namespace cpu {
namespace VAE_FAST_ISA {

using namespace vae_fast::math;

// Feature blocks have a fixed length so that the partial sums, and so the bits of the loss, depend
// on the data alone and not on how many threads share the work.
constexpr int64_t kBlock = 4096;
// Half-precision data is converted to float this many elements at a time (fits in L1).
constexpr int64_t kStage = 1024;
// Below this many elements per task, threading costs more than it saves.
constexpr int64_t kMinElementsPerTask = 32768;

template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* src, acc_t* buffer, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buffer, n);
    return buffer;
  }
}

template <typename scalar_t, typename acc_t>
acc_t* acc_destination(scalar_t* dst, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    return buffer;
  }
}

template <typename scalar_t, typename acc_t>
void flush_acc(const acc_t* buffer, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    at::vec::convert(buffer, dst, n);
  }
}

template <typename S>
bool any_lane_set(const Vec<S>& mask) {
  S lanes[Vec<S>::size()];
  Vec<S>::blendv(Vec<S>(S(0)), Vec<S>(S(1)), mask).store(lanes);
  return std::any_of(lanes, lanes + Vec<S>::size(), [](S v) { return v != S(0); });
}

template <typename S>
S sum_lanes(const Vec<S>& v) {
  S lanes[Vec<S>::size()];
  v.store(lanes);
  S total(0);
  for (int64_t i = 0; i < Vec<S>::size(); ++i) total += lanes[i];
  return total;
}

// Running state of one block's reconstruction sum.
template <typename acc_t>
struct BceAccumulator {
  Vec<acc_t> loss{acc_t(0)};
  acc_t tail_loss{0};
  Vec<acc_t> recon_bad{acc_t(0)};
  Vec<acc_t> target_bad{acc_t(0)};
  bool tail_recon_bad{false};
  bool tail_target_bad{false};
};

// Whether the build has a one-logarithm path for binary targets (avx2_math.h) worth a per-vector
// check: elsewhere both logarithms are taken anyway.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
template <typename S>
constexpr bool kBinaryTargetPath = std::is_same_v<S, float>;
#else
template <typename S>
constexpr bool kBinaryTargetPath = false;
#endif

template <bool kLogits, typename T>
BceTerm<T> bce_term(T recon, T target) {
  if constexpr (kLogits) {
    return bce_from_logits(recon, target);
  } else {
    return bce_from_probs(recon, target);
  }
}

// Loss of n elements into `acc`, gradients (times `scale`) into grad_r / grad_x where non-null.
template <bool kLogits, typename acc_t>
void bce_span(const acc_t* r, const acc_t* x, int64_t n, acc_t* grad_r, acc_t* grad_x,
              acc_t scale, BceAccumulator<acc_t>& acc) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const V zero(acc_t(0)), one(acc_t(1)), vscale(scale);
  // Register copies: updating `acc` through the reference would go through memory on every
  // iteration (the stores to grad_r may alias it), a store-to-load chain that halved the speed.
  V loss = acc.loss, recon_bad = acc.recon_bad, target_bad = acc.target_bad;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V rv = V::loadu(r + i);
    const V xv = V::loadu(x + i);
    BceTerm<V> t;
    if constexpr (!kLogits && kBinaryTargetPath<acc_t>) {
      // binarized data: one logarithm per element (d_target would need both)
      t = !grad_x && all_binary_(xv) ? bce_from_probs_binary_target(rv, xv) : bce_term<kLogits>(rv, xv);
    } else {
      t = bce_term<kLogits>(rv, xv);
    }
    loss = loss + t.loss;
    if (grad_r) (t.d_recon * vscale).store(grad_r + i);
    if (grad_x) (t.d_target * vscale).store(grad_x + i);
    target_bad = target_bad | (xv < zero) | (xv > one);
    if constexpr (!kLogits) recon_bad = recon_bad | (rv < zero) | (rv > one);
  }
  acc.loss = loss;
  acc.recon_bad = recon_bad;
  acc.target_bad = target_bad;
  for (; i < n; ++i) {
    const BceTerm<acc_t> t = bce_term<kLogits>(r[i], x[i]);
    acc.tail_loss += t.loss;
    if (grad_r) grad_r[i] = t.d_recon * scale;
    if (grad_x) grad_x[i] = t.d_target * scale;
    acc.tail_target_bad |= x[i] < acc_t(0) || x[i] > acc_t(1);
    if constexpr (!kLogits) acc.tail_recon_bad |= r[i] < acc_t(0) || r[i] > acc_t(1);
  }
}

template <bool kLogits, typename scalar_t>
double bce_block(const scalar_t* r, const scalar_t* x, int64_t n, scalar_t* grad_r,
                 scalar_t* grad_x, double scale, LossDomainErrors& errors) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t r_buf[kStage], x_buf[kStage], gr_buf[kStage], gx_buf[kStage];
  BceAccumulator<acc_t> acc;
  for (int64_t start = 0; start < n; start += kStage) {
    const int64_t m = std::min(kStage, n - start);
    acc_t* gr = grad_r ? acc_destination(grad_r + start, gr_buf) : nullptr;
    acc_t* gx = grad_x ? acc_destination(grad_x + start, gx_buf) : nullptr;
    bce_span<kLogits>(as_acc(r + start, r_buf, m), as_acc(x + start, x_buf, m), m, gr, gx,
                      static_cast<acc_t>(scale), acc);
    if (grad_r) flush_acc(gr_buf, grad_r + start, m);
    if (grad_x) flush_acc(gx_buf, grad_x + start, m);
  }
  errors.recon_outside_unit = acc.tail_recon_bad || any_lane_set(acc.recon_bad);
  errors.target_outside_unit = acc.tail_target_bad || any_lane_set(acc.target_bad);
  return static_cast<double>(sum_lanes(acc.loss) + acc.tail_loss);
}

// KL of one sample's latents; gradients (times `scale`) written where non-null. zero_weight: the
// KL will be multiplied by beta = 0 (see logvar_for_zero_weight).
template <typename scalar_t>
double kl_row(const scalar_t* mu, const scalar_t* lv, int64_t n, scalar_t* grad_mu,
              scalar_t* grad_lv, double scale, bool zero_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  acc_t mu_buf[kStage], lv_buf[kStage], gmu_buf[kStage], glv_buf[kStage];
  const V vscale(static_cast<acc_t>(scale));
  V sum(acc_t(0));
  acc_t tail_sum(0);
  for (int64_t start = 0; start < n; start += kStage) {
    const int64_t m = std::min(kStage, n - start);
    const acc_t* m_ptr = as_acc(mu + start, mu_buf, m);
    const acc_t* l_ptr = as_acc(lv + start, lv_buf, m);
    if (zero_weight) {
      for (int64_t j = 0; j < m; ++j) lv_buf[j] = logvar_for_zero_weight(l_ptr[j]);
      l_ptr = lv_buf;
    }
    acc_t* gm = grad_mu ? acc_destination(grad_mu + start, gmu_buf) : nullptr;
    acc_t* gl = grad_lv ? acc_destination(grad_lv + start, glv_buf) : nullptr;
    int64_t i = 0;
    for (; i + W <= m; i += W) {
      const KlTerm<V> t = kl_standard_normal(V::loadu(m_ptr + i), V::loadu(l_ptr + i));
      sum = sum + t.kl;
      if (gm) (t.d_mu * vscale).store(gm + i);
      if (gl) (t.d_logvar * vscale).store(gl + i);
    }
    for (; i < m; ++i) {
      const KlTerm<acc_t> t = kl_standard_normal(m_ptr[i], l_ptr[i]);
      tail_sum += t.kl;
      if (gm) gm[i] = t.d_mu * static_cast<acc_t>(scale);
      if (gl) gl[i] = t.d_logvar * static_cast<acc_t>(scale);
    }
    if (grad_mu) flush_acc(gmu_buf, grad_mu + start, m);
    if (grad_lv) flush_acc(glv_buf, grad_lv + start, m);
  }
  return static_cast<double>(sum_lanes(sum) + tail_sum);
}

// Running sums of one block of a location-scale reconstruction term.
template <typename acc_t>
struct LocationScaleAccumulator {
  Vec<acc_t> loss{acc_t(0)};
  Vec<acc_t> grad_s{acc_t(0)};
  acc_t tail_loss{0};
  acc_t tail_grad_s{0};
};

// Where a block's d loss / d log_scale goes: summed into the block's total (one shared scale),
// added into running per-feature sums, or written per element. At most one is set.
template <typename acc_t>
struct ScaleGradTarget {
  bool total = false;
  acc_t* add = nullptr;
  acc_t* write = nullptr;
};

// n elements of a Gaussian/Laplace term (csrc/vae_math.h). `scale_in` is, per layout: unused
// (uniform: r_uniform = exp(-s) for all), the features' hoisted r = exp(-s) (per_feature), or the
// elements' s (per_element, whose s is also added to the loss here: it differs per element).
template <Likelihood kLik, ScaleLayout kLayout, typename acc_t>
void location_scale_span(const acc_t* m, const acc_t* x, const acc_t* scale_in, acc_t r_uniform, int64_t n,
                         acc_t* grad_m, acc_t* grad_x, const ScaleGradTarget<acc_t>& gs, acc_t scale,
                         LocationScaleAccumulator<acc_t>& acc) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const V vscale(scale);
  V loss = acc.loss, grad_s = acc.grad_s;  // registers, as in bce_span
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V r(r_uniform);
    if constexpr (kLayout == ScaleLayout::per_feature) r = V::loadu(scale_in + i);
    if constexpr (kLayout == ScaleLayout::per_element) r = inverse_scale(V::loadu(scale_in + i));
    const LocationScaleTerm<V> t = location_scale_term<kLik>(V::loadu(m + i), V::loadu(x + i), r);
    loss = loss + t.loss;
    if constexpr (kLayout == ScaleLayout::per_element) loss = loss + V::loadu(scale_in + i);
    if (grad_m) (t.d_recon * vscale).store(grad_m + i);
    if (grad_x) (t.d_target * vscale).store(grad_x + i);
    if (gs.total) grad_s = grad_s + t.d_log_scale;
    if (gs.add) (V::loadu(gs.add + i) + t.d_log_scale * vscale).store(gs.add + i);
    if (gs.write) (t.d_log_scale * vscale).store(gs.write + i);
  }
  acc.loss = loss;
  acc.grad_s = grad_s;
  for (; i < n; ++i) {
    acc_t r = r_uniform;
    if constexpr (kLayout == ScaleLayout::per_feature) r = scale_in[i];
    if constexpr (kLayout == ScaleLayout::per_element) r = inverse_scale(scale_in[i]);
    const LocationScaleTerm<acc_t> t = location_scale_term<kLik>(m[i], x[i], r);
    acc.tail_loss += t.loss;
    if constexpr (kLayout == ScaleLayout::per_element) acc.tail_loss += scale_in[i];
    if (grad_m) grad_m[i] = t.d_recon * scale;
    if (grad_x) grad_x[i] = t.d_target * scale;
    if (gs.total) acc.tail_grad_s += t.d_log_scale;
    if (gs.add) gs.add[i] += t.d_log_scale * scale;
    if (gs.write) gs.write[i] = t.d_log_scale * scale;
  }
}

// One block of a row: n elements from `offset` (its feature index within the row is `feature`).
struct BlockRef {
  int64_t offset;
  int64_t feature;
  int64_t n;
};

// The per-call state of a location-scale term: the scale hoisted out of the element loop.
template <typename acc_t>
struct HoistedScale {
  acc_t r_uniform = acc_t(1);
  std::vector<acc_t> feature_r;  // per_feature: exp(-s_j)
  double row_constant = 0.0;     // sum over a row's features of (s_j + constant), or D * constant
};

// A block of a location-scale term; returns its loss, and its d loss / d s total in *grad_s_total
// when a shared scale's gradient is wanted. grad_s_element: the element-wise gradient destination
// (scalar_t in log_scale's dtype, or acc_t when per_element_acc); grad_s_feature_sums: this block's
// features in the task's running sums.
template <Likelihood kLik, ScaleLayout kLayout, typename scalar_t>
double location_scale_block(const LossProblem& p, const HoistedScale<at::opmath_type<scalar_t>>& hoisted,
                            const BlockRef& b, at::opmath_type<scalar_t>* grad_s_feature_sums,
                            double* grad_s_total) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* m = static_cast<const scalar_t*>(p.recon) + b.offset;
  const auto* x = static_cast<const scalar_t*>(p.target) + b.offset;
  const auto* s = static_cast<const scalar_t*>(p.log_scale);
  auto* grad_m = p.grad_recon ? static_cast<scalar_t*>(p.grad_recon) + b.offset : nullptr;
  auto* grad_x = p.grad_target ? static_cast<scalar_t*>(p.grad_target) + b.offset : nullptr;
  const bool write_elements = p.grad_log_scale && (p.grad_log_scale_per_element || kLayout == ScaleLayout::per_element);
  scalar_t* gs_scalar = write_elements && !p.grad_log_scale_per_element ? static_cast<scalar_t*>(p.grad_log_scale) + b.offset : nullptr;
  acc_t* gs_acc = write_elements && p.grad_log_scale_per_element ? static_cast<acc_t*>(p.grad_log_scale) + b.offset : nullptr;

  acc_t m_buf[kStage], x_buf[kStage], s_buf[kStage], gm_buf[kStage], gx_buf[kStage], gs_buf[kStage];
  LocationScaleAccumulator<acc_t> acc;
  for (int64_t start = 0; start < b.n; start += kStage) {
    const int64_t k = std::min(kStage, b.n - start);
    const acc_t* scale_in = nullptr;
    if constexpr (kLayout == ScaleLayout::per_feature) scale_in = hoisted.feature_r.data() + b.feature + start;
    if constexpr (kLayout == ScaleLayout::per_element) scale_in = as_acc(s + b.offset + start, s_buf, k);
    ScaleGradTarget<acc_t> gs;
    gs.total = grad_s_total != nullptr;
    gs.add = grad_s_feature_sums ? grad_s_feature_sums + start : nullptr;
    gs.write = gs_acc ? gs_acc + start : gs_scalar ? acc_destination(gs_scalar + start, gs_buf) : nullptr;
    acc_t* gm = grad_m ? acc_destination(grad_m + start, gm_buf) : nullptr;
    acc_t* gx = grad_x ? acc_destination(grad_x + start, gx_buf) : nullptr;
    location_scale_span<kLik, kLayout>(as_acc(m + start, m_buf, k), as_acc(x + start, x_buf, k), scale_in,
                                       hoisted.r_uniform, k, gm, gx, gs, static_cast<acc_t>(p.grad_scale), acc);
    if (grad_m) flush_acc(gm_buf, grad_m + start, k);
    if (grad_x) flush_acc(gx_buf, grad_x + start, k);
    if (gs_scalar) flush_acc(gs_buf, gs_scalar + start, k);
  }
  if (grad_s_total) *grad_s_total = static_cast<double>(sum_lanes(acc.grad_s) + acc.tail_grad_s) * p.grad_scale;
  return static_cast<double>(sum_lanes(acc.loss) + acc.tail_loss);
}

template <Likelihood kLik, typename scalar_t>
HoistedScale<at::opmath_type<scalar_t>> hoist_scale(const LossProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* s = static_cast<const scalar_t*>(p.log_scale);
  const double constant = location_scale_constant<kLik>();
  const double features = static_cast<double>(p.features);
  HoistedScale<acc_t> h;
  switch (p.scale_layout) {
    case ScaleLayout::uniform: {
      const double value = s ? static_cast<double>(static_cast<acc_t>(s[0])) : p.log_scale_value;
      h.r_uniform = inverse_scale(static_cast<acc_t>(value));
      h.row_constant = features * (value + constant);
      break;
    }
    case ScaleLayout::per_feature: {
      h.feature_r.resize(p.features);
      double sum = 0.0;
      for (int64_t j = 0; j < p.features; ++j) {
        const acc_t value = static_cast<acc_t>(s[j]);
        h.feature_r[j] = inverse_scale(value);
        sum += static_cast<double>(value);
      }
      h.row_constant = sum + features * constant;
      break;
    }
    case ScaleLayout::per_element:
      h.row_constant = features * constant;
      break;
  }
  return h;
}

// ---- count likelihoods (poisson, nb, zinb) ----
// Their math runs in double whatever the input dtype (csrc/vae_math.h says why): each stage of a
// block is converted to double, and each gradient rounded once on the way out.
using count_t = double;
// Elements per stage of a count block: its twelve double buffers stay within 32 KiB.
constexpr int64_t kCountStage = 256;

template <typename scalar_t>
void to_count(const scalar_t* src, count_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<count_t>(src[i]);
}

template <typename out_t>
void from_count(const count_t* src, out_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<out_t>(src[i]);
}

// log_theta as the count kernels read it: one value (uniform), or per feature (its NbTheta pieces
// hoisted out of the rows), or per element (t read with the data, its pieces computed there).
struct CountTheta {
  NbTheta<count_t> uniform = nb_theta(0.0);
  std::vector<count_t> t, theta, binet, psit;  // per feature
};

template <typename scalar_t>
CountTheta hoist_count_theta(const LossProblem& p) {
  const auto* s = static_cast<const scalar_t*>(p.log_scale);
  CountTheta h;
  if (p.scale_layout == ScaleLayout::uniform) {
    h.uniform = nb_theta(s ? static_cast<count_t>(s[0]) : p.log_scale_value);
  } else if (p.scale_layout == ScaleLayout::per_feature) {
    for (auto* v : {&h.t, &h.theta, &h.binet, &h.psit}) v->resize(p.features);
    for (int64_t j = 0; j < p.features; ++j) {
      const NbTheta<count_t> pieces = nb_theta(static_cast<count_t>(s[j]));
      h.t[j] = pieces.t;
      h.theta[j] = pieces.theta;
      h.binet[j] = pieces.binet;
      h.psit[j] = pieces.psit;
    }
  }
  return h;
}

// Where a count span writes (each null when not wanted): d/dl, d/dx, d/dz and each element's d/dt,
// all times the gradient scale; grad_t_total: sum d/dt (unscaled) into the accumulator instead.
struct CountSpanOut {
  count_t* grad_l = nullptr;
  count_t* grad_x = nullptr;
  count_t* grad_t = nullptr;
  count_t* grad_z = nullptr;
  bool grad_t_total = false;
};

struct CountAccumulator {
  Vec<count_t> loss{0.0}, grad_t{0.0}, bad{0.0};
  count_t tail_loss = 0.0, tail_grad_t = 0.0;
  bool tail_bad = false;
};

// The NbTheta pieces of each element of a span (per_feature: th's hoisted arrays at the span's
// features, or gathered from them in the span's order).
struct HoistedTheta {
  const count_t *t = nullptr, *theta = nullptr, *binet = nullptr, *psit = nullptr;
};

// n elements of a count term. `t`: per_element, the elements' log_theta; `hoisted`: per_feature,
// the elements' pieces of it; th.uniform: uniform. z: zinb only.
template <Likelihood kLik, ScaleLayout kLayout>
void count_span(const count_t* l, const count_t* x, const count_t* t, const HoistedTheta& hoisted, const count_t* z,
                const CountTheta& th, int64_t n, const CountSpanOut& out, count_t scale, CountAccumulator& acc) {
  using V = Vec<count_t>;
  constexpr int64_t W = V::size();
  const V vscale(scale), zero(0.0), inf(INFINITY);
  V loss = acc.loss, grad_t = acc.grad_t, bad = acc.bad;  // registers, as in bce_span
  const NbTheta<V> uniform{V(th.uniform.t), V(th.uniform.theta), V(th.uniform.binet), V(th.uniform.psit)};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V lv = V::loadu(l + i), xv = V::loadu(x + i);
    NbTheta<V> tv = uniform;
    if constexpr (kLayout == ScaleLayout::per_element) tv = nb_theta(V::loadu(t + i));
    if constexpr (kLayout == ScaleLayout::per_feature) {
      tv = {V::loadu(hoisted.t + i), V::loadu(hoisted.theta + i), V::loadu(hoisted.binet + i), V::loadu(hoisted.psit + i)};
    }
    const V zv = kLik == Likelihood::zinb ? V::loadu(z + i) : zero;
    const CountTerm<V> c = count_term<kLik>(lv, xv, tv, zv);
    loss = loss + c.loss;
    if (out.grad_l) (c.d_recon * vscale).store(out.grad_l + i);
    if (out.grad_x) (count_target_grad<kLik>(lv, xv, tv, zv) * vscale).store(out.grad_x + i);
    if (out.grad_t_total) grad_t = grad_t + c.d_log_theta;
    if (out.grad_t) (c.d_log_theta * vscale).store(out.grad_t + i);
    if (out.grad_z) (c.d_zi * vscale).store(out.grad_z + i);
    bad = bad | (xv < zero) | (xv != xv) | (xv == inf);
  }
  acc.loss = loss;
  acc.grad_t = grad_t;
  acc.bad = bad;
  for (; i < n; ++i) {
    NbTheta<count_t> tv = th.uniform;
    if constexpr (kLayout == ScaleLayout::per_element) tv = nb_theta(t[i]);
    if constexpr (kLayout == ScaleLayout::per_feature) tv = {hoisted.t[i], hoisted.theta[i], hoisted.binet[i], hoisted.psit[i]};
    const count_t zv = kLik == Likelihood::zinb ? z[i] : 0.0;
    const CountTerm<count_t> c = count_term<kLik>(l[i], x[i], tv, zv);
    acc.tail_loss += c.loss;
    if (out.grad_l) out.grad_l[i] = c.d_recon * scale;
    if (out.grad_x) out.grad_x[i] = count_target_grad<kLik>(l[i], x[i], tv, zv) * scale;
    if (out.grad_t_total) acc.tail_grad_t += c.d_log_theta;
    if (out.grad_t) out.grad_t[i] = c.d_log_theta * scale;
    if (out.grad_z) out.grad_z[i] = c.d_zi * scale;
    acc.tail_bad |= !(x[i] >= 0.0) || x[i] == INFINITY;
  }
}

// The order a stage's elements are computed in: the zero counts first, then the rest, each in place
// order. A vector with one positive count computes the positive-count math (two Binet terms, the
// deviances, the digamma difference) for all its lanes; most of a count matrix is zeros, scattered,
// so in place order most vectors would. Returns the number of zeros; order is the identity (and
// left unfilled) when the stage is all zeros or has none.
template <typename scalar_t>
int64_t zeros_first_order(const scalar_t* x, int64_t n, int32_t* order) {
  int64_t zeros = 0;
  for (int64_t j = 0; j < n; ++j) zeros += x[j] == scalar_t(0);
  if (zeros == 0 || zeros == n) return zeros;
  int64_t z = 0, rest = zeros;
  for (int64_t j = 0; j < n; ++j) order[x[j] == scalar_t(0) ? z++ : rest++] = static_cast<int32_t>(j);
  return zeros;
}

template <typename src_t>
void gather_count(const src_t* src, const int32_t* order, count_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<count_t>(src[order[j]]);
}

template <typename out_t>
void scatter_count(const count_t* src, const int32_t* order, out_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[order[j]] = static_cast<out_t>(src[j]);
}

// A block of a count term, staged through double buffers in zeros-first order; returns its loss,
// its d loss / d t total in *grad_t_total (one shared log_theta whose gradient is wanted), adds its
// d/dt into the task's per-feature sums, or writes them per element, as location_scale_block does
// for log_scale. The order is fixed by the data, so the sums are the same bits on any thread count.
template <Likelihood kLik, ScaleLayout kLayout, typename scalar_t>
double count_block(const LossProblem& p, const CountTheta& th, const BlockRef& b,
                   at::opmath_type<scalar_t>* grad_t_feature_sums, double* grad_t_total, bool& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto at = [&b](const void* base) { return base ? static_cast<const scalar_t*>(base) + b.offset : nullptr; };
  const auto at_mut = [&b](void* base) { return base ? static_cast<scalar_t*>(base) + b.offset : nullptr; };
  const scalar_t *l = at(p.recon), *x = at(p.target), *z = at(p.zi_logits);
  const scalar_t* t = kLayout == ScaleLayout::per_element ? at(p.log_scale) : nullptr;
  scalar_t *grad_l = at_mut(p.grad_recon), *grad_x = at_mut(p.grad_target), *grad_z = at_mut(p.grad_zi_logits);
  const bool write_t = p.grad_log_scale && (p.grad_log_scale_per_element || kLayout == ScaleLayout::per_element);
  acc_t* grad_t_acc = write_t && p.grad_log_scale_per_element ? static_cast<acc_t*>(p.grad_log_scale) + b.offset : nullptr;
  scalar_t* grad_t_scalar = write_t && !p.grad_log_scale_per_element ? static_cast<scalar_t*>(p.grad_log_scale) + b.offset : nullptr;

  count_t l_buf[kCountStage], x_buf[kCountStage], t_buf[kCountStage], z_buf[kCountStage];
  count_t gl_buf[kCountStage], gx_buf[kCountStage], gt_buf[kCountStage], gz_buf[kCountStage];
  count_t ht_buf[kCountStage], htheta_buf[kCountStage], hbinet_buf[kCountStage], hpsit_buf[kCountStage];
  int32_t order[kCountStage];
  CountAccumulator acc;
  for (int64_t start = 0; start < b.n; start += kCountStage) {
    const int64_t k = std::min(kCountStage, b.n - start);
    // Poisson's positive-count math is too cheap to pay for the gathers.
    const int64_t zeros = kLik == Likelihood::poisson ? 0 : zeros_first_order(x + start, k, order);
    const bool reorder = zeros != 0 && zeros != k;
    const int64_t feature = b.feature + start;
    // In, converted to double (and gathered into zeros-first order), and out again the same way.
    const auto take = [&](const auto* src, count_t* dst) {
      if (reorder) gather_count(src, order, dst, k); else to_count(src, dst, k);
    };
    const auto put = [&](const count_t* src, auto* dst) {
      if (reorder) scatter_count(src, order, dst, k); else from_count(src, dst, k);
    };
    take(l + start, l_buf);
    take(x + start, x_buf);
    if (t) take(t + start, t_buf);
    if (z) take(z + start, z_buf);
    HoistedTheta hoisted;
    if constexpr (kLayout == ScaleLayout::per_feature) {
      hoisted = {th.t.data() + feature, th.theta.data() + feature, th.binet.data() + feature, th.psit.data() + feature};
      if (reorder) {
        take(hoisted.t, ht_buf);
        take(hoisted.theta, htheta_buf);
        take(hoisted.binet, hbinet_buf);
        take(hoisted.psit, hpsit_buf);
        hoisted = {ht_buf, htheta_buf, hbinet_buf, hpsit_buf};
      }
    }
    CountSpanOut out;
    out.grad_l = grad_l ? gl_buf : nullptr;
    out.grad_x = grad_x ? gx_buf : nullptr;
    out.grad_z = grad_z ? gz_buf : nullptr;
    out.grad_t = write_t || grad_t_feature_sums ? gt_buf : nullptr;
    out.grad_t_total = grad_t_total != nullptr;
    count_span<kLik, kLayout>(l_buf, x_buf, t ? t_buf : nullptr, hoisted, z ? z_buf : nullptr, th, k, out,
                              static_cast<count_t>(p.grad_scale), acc);
    if (grad_l) put(gl_buf, grad_l + start);
    if (grad_x) put(gx_buf, grad_x + start);
    if (grad_z) put(gz_buf, grad_z + start);
    if (grad_t_acc) put(gt_buf, grad_t_acc + start);
    if (grad_t_scalar) put(gt_buf, grad_t_scalar + start);
    if (grad_t_feature_sums) {
      for (int64_t j = 0; j < k; ++j) grad_t_feature_sums[start + (reorder ? order[j] : j)] += static_cast<acc_t>(gt_buf[j]);
    }
  }
  if (grad_t_total) *grad_t_total = (sum_lanes(acc.grad_t) + acc.tail_grad_t) * p.grad_scale;
  bad = acc.tail_bad || any_lane_set(acc.bad);
  return sum_lanes(acc.loss) + acc.tail_loss;
}

// The count block for this call's likelihood and log_theta layout (Poisson has no log_theta).
template <typename scalar_t>
double count_block_for(const LossProblem& p, const CountTheta& th, const BlockRef& b,
                       at::opmath_type<scalar_t>* feature_sums, double* grad_t_total, bool& bad) {
#define VAE_FAST_COUNT_BLOCK(LIK)                                                                             \
  switch (p.scale_layout) {                                                                                  \
    case ScaleLayout::uniform:                                                                               \
      return count_block<LIK, ScaleLayout::uniform, scalar_t>(p, th, b, feature_sums, grad_t_total, bad);    \
    case ScaleLayout::per_feature:                                                                           \
      return count_block<LIK, ScaleLayout::per_feature, scalar_t>(p, th, b, feature_sums, grad_t_total, bad); \
    case ScaleLayout::per_element:                                                                           \
      return count_block<LIK, ScaleLayout::per_element, scalar_t>(p, th, b, feature_sums, grad_t_total, bad); \
  }
  if (p.likelihood == Likelihood::poisson) {
    return count_block<Likelihood::poisson, ScaleLayout::uniform, scalar_t>(p, th, b, feature_sums, grad_t_total, bad);
  } else if (p.likelihood == Likelihood::nb) {
    VAE_FAST_COUNT_BLOCK(Likelihood::nb)
  } else {
    VAE_FAST_COUNT_BLOCK(Likelihood::zinb)
  }
#undef VAE_FAST_COUNT_BLOCK
  return 0.0;
}

// The reconstruction term of every (row, feature block), then each row's KL and total. Blocks have
// a fixed length and sums a fixed order, so loss and gradients are the same bits on any thread
// count. A per-feature scale's gradient sums over rows: rows go in fixed groups, each group's sums
// are kept apart and the groups are added in order at the end.
template <typename scalar_t>
LossDomainErrors vae_loss_typed(const LossProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* mu = static_cast<const scalar_t*>(p.mu);
  const auto* lv = static_cast<const scalar_t*>(p.logvar);
  auto* grad_mu = static_cast<scalar_t*>(p.grad_mu);
  auto* grad_lv = static_cast<scalar_t*>(p.grad_logvar);
  const int64_t D = p.features, L = p.latents;
  const bool bernoulli = p.likelihood == Likelihood::bernoulli;
  const bool count = is_count(p.likelihood);
  const bool scale_total = !bernoulli && p.grad_log_scale && !p.grad_log_scale_per_element &&
                           p.scale_layout == ScaleLayout::uniform;
  const bool scale_feature_sums = !bernoulli && p.grad_log_scale && !p.grad_log_scale_per_element &&
                                  p.scale_layout == ScaleLayout::per_feature;

  const int64_t blocks_per_row = (D + kBlock - 1) / kBlock;
  const int64_t block_len = std::max<int64_t>(1, std::min(D, kBlock));
  // Rows per group: 1, or for per-feature sums enough rows to fill a task, at most 256 so that the
  // float sums within a group stay short.
  const int64_t rows_per_group =
      scale_feature_sums ? std::clamp<int64_t>(kMinElementsPerTask / block_len, 1, 256) : 1;
  const int64_t groups = (p.batch + rows_per_group - 1) / rows_per_group;
  std::vector<double> block_loss(p.batch * blocks_per_row);
  std::vector<double> block_grad_s(scale_total ? p.batch * blocks_per_row : 0);
  std::vector<acc_t> group_grad_s(scale_feature_sums ? groups * D : 0, acc_t(0));
  std::atomic<bool> recon_bad{false}, target_bad{false}, target_not_count{false};

  HoistedScale<acc_t> hoisted;
  if (p.likelihood == Likelihood::gaussian) hoisted = hoist_scale<Likelihood::gaussian, scalar_t>(p);
  if (p.likelihood == Likelihood::laplace) hoisted = hoist_scale<Likelihood::laplace, scalar_t>(p);
  const CountTheta count_theta = count ? hoist_count_theta<scalar_t>(p) : CountTheta();

  // The reconstruction term of one block, for the likelihood and layout of this call.
  auto block = [&](const BlockRef& b, acc_t* feature_sums, double* grad_s_total) -> double {
    auto* grad_r = p.grad_recon ? static_cast<scalar_t*>(p.grad_recon) + b.offset : nullptr;
    auto* grad_x = p.grad_target ? static_cast<scalar_t*>(p.grad_target) + b.offset : nullptr;
    const auto* r = static_cast<const scalar_t*>(p.recon) + b.offset;
    const auto* x = static_cast<const scalar_t*>(p.target) + b.offset;
    if (bernoulli) {
      LossDomainErrors e;
      const double loss = p.logits ? bce_block<true>(r, x, b.n, grad_r, grad_x, p.grad_scale, e)
                                   : bce_block<false>(r, x, b.n, grad_r, grad_x, p.grad_scale, e);
      if (e.recon_outside_unit) recon_bad.store(true, std::memory_order_relaxed);
      if (e.target_outside_unit) target_bad.store(true, std::memory_order_relaxed);
      return loss;
    }
    if (count) {
      bool bad = false;
      const double loss = count_block_for<scalar_t>(p, count_theta, b, feature_sums, grad_s_total, bad);
      if (bad) target_not_count.store(true, std::memory_order_relaxed);
      return loss;
    }
#define VAE_FAST_LS_BLOCK(LIK)                                                                                   \
  switch (p.scale_layout) {                                                                                     \
    case ScaleLayout::uniform:                                                                                  \
      return location_scale_block<LIK, ScaleLayout::uniform, scalar_t>(p, hoisted, b, feature_sums, grad_s_total); \
    case ScaleLayout::per_feature:                                                                              \
      return location_scale_block<LIK, ScaleLayout::per_feature, scalar_t>(p, hoisted, b, feature_sums, grad_s_total); \
    case ScaleLayout::per_element:                                                                              \
      return location_scale_block<LIK, ScaleLayout::per_element, scalar_t>(p, hoisted, b, feature_sums, grad_s_total); \
  }
    if (p.likelihood == Likelihood::gaussian) {
      VAE_FAST_LS_BLOCK(Likelihood::gaussian)
    } else {
      VAE_FAST_LS_BLOCK(Likelihood::laplace)
    }
#undef VAE_FAST_LS_BLOCK
    return 0.0;
  };

  const int64_t tasks = groups * blocks_per_row;
  const int64_t task_grain = std::max<int64_t>(1, kMinElementsPerTask / (block_len * rows_per_group));
  at::parallel_for(0, tasks, task_grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / blocks_per_row, c = task % blocks_per_row;
      const int64_t feature = c * kBlock;
      acc_t* feature_sums = scale_feature_sums ? group_grad_s.data() + group * D + feature : nullptr;
      for (int64_t row = group * rows_per_group; row < std::min(p.batch, (group + 1) * rows_per_group); ++row) {
        const int64_t index = row * blocks_per_row + c;
        const BlockRef b{row * D + feature, feature, std::min(kBlock, D - feature)};
        block_loss[index] = block(b, feature_sums, scale_total ? &block_grad_s[index] : nullptr);
      }
    }
  });

  const int64_t row_grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, L));
  at::parallel_for(0, p.batch, row_grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * L;
      const double kl = kl_row(mu + o, lv + o, L, grad_mu ? grad_mu + o : nullptr,
                               grad_lv ? grad_lv + o : nullptr, p.beta * p.grad_scale, p.beta == 0.0);
      double reconstruction = hoisted.row_constant;
      for (int64_t c = 0; c < blocks_per_row; ++c) reconstruction += block_loss[row * blocks_per_row + c];
      p.row_loss[row] = reconstruction + p.beta * kl;
    }
  });

  auto* grad_s = static_cast<scalar_t*>(p.grad_log_scale);
  if (scale_total) {
    // Each element's s term contributes d/ds = 1 to its own gradient: inside d_log_scale already.
    double total = 0.0;
    for (double v : block_grad_s) total += v;
    grad_s[0] = static_cast<scalar_t>(total);
  }
  if (scale_feature_sums) {
    at::parallel_for(0, D, kMinElementsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        double total = 0.0;
        for (int64_t g = 0; g < groups; ++g) total += static_cast<double>(group_grad_s[g * D + j]);
        grad_s[j] = static_cast<scalar_t>(total);
      }
    });
  }

  LossDomainErrors errors;
  errors.recon_outside_unit = p.check_recon_range && recon_bad.load();
  errors.target_outside_unit = target_bad.load();
  errors.target_not_count = target_not_count.load();
  return errors;
}

LossDomainErrors vae_loss(const LossProblem& p) {
  LossDomainErrors errors;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "vae_fast::vae_loss (CPU)",
                                  [&] { errors = vae_loss_typed<scalar_t>(p); });
  return errors;
}

// Uniforms of Philox blocks first .. first+n-1: radius/angle from word pair (0, 1) into
// rad_a/ang_a, from pair (2, 3) into rad_b/ang_b.
template <typename acc_t>
void philox_uniforms(uint64_t seed, uint64_t offset, uint64_t first, int64_t n, acc_t* rad_a, acc_t* ang_a,
                     acc_t* rad_b, acc_t* ang_b) {
  for (int64_t k = 0; k < n; ++k) {
    const Philox4 bits = philox4x32_10(seed, offset, first + static_cast<uint64_t>(k));
    rad_a[k] = uniform_open_closed<acc_t>(bits.v[0]);
    ang_a[k] = uniform_closed_open<acc_t>(bits.v[1]);
    rad_b[k] = uniform_open_closed<acc_t>(bits.v[2]);
    ang_b[k] = uniform_closed_open<acc_t>(bits.v[3]);
  }
}

template <typename acc_t>
void box_muller_span(const acc_t* u_radius, const acc_t* u_angle, int64_t n, acc_t* first, acc_t* second) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V a, b;
    box_muller(V::loadu(u_radius + i), V::loadu(u_angle + i), a, b);
    a.store(first + i);
    b.store(second + i);
  }
  for (; i < n; ++i) box_muller(u_radius[i], u_angle[i], first[i], second[i]);
}

// Elements handled by one task: a multiple of the 4 normals one Philox block gives.
constexpr int64_t kNoiseChunk = 1024;

// eps[0 .. n) of the chunk whose first Philox block is first_block (n <= kNoiseChunk; eps holds
// kNoiseChunk). float32 draws whole groups of 16 blocks in registers (avx2_noise.h); the rest, and
// every block of another precision or of the generic build, step by step through scratch arrays.
template <typename acc_t>
void draw_normals(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t n, acc_t* eps) {
  const int64_t n_blocks = (n + kNormalsPerPhiloxBlock - 1) / kNormalsPerPhiloxBlock;
  int64_t done = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) done = avx2_detail::standard_normals(seed, offset, first_block, n_blocks, eps);
#endif
  if (done == n_blocks) return;
  constexpr int64_t kBlocks = kNoiseChunk / kNormalsPerPhiloxBlock;
  acc_t rad_a[kBlocks] = {}, ang_a[kBlocks] = {}, rad_b[kBlocks] = {}, ang_b[kBlocks] = {};  // = {}: GCC cannot see that philox_uniforms fills them
  acc_t first_a[kBlocks], second_a[kBlocks], first_b[kBlocks], second_b[kBlocks];
  const int64_t rest = n_blocks - done;
  philox_uniforms(seed, offset, first_block + static_cast<uint64_t>(done), rest, rad_a, ang_a, rad_b, ang_b);
  box_muller_span(rad_a, ang_a, rest, first_a, second_a);
  box_muller_span(rad_b, ang_b, rest, first_b, second_b);
  for (int64_t k = 0; k < rest; ++k) {
    const acc_t normals[4] = {first_a[k], second_a[k], first_b[k], second_b[k]};
    const int64_t at = kNormalsPerPhiloxBlock * (done + k);
    for (int64_t j = 0; j < kNormalsPerPhiloxBlock && at + j < n; ++j) eps[at + j] = normals[j];
  }
}

template <NoiseUse kUse, typename scalar_t>
void reparameterize_typed(const ReparameterizeProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const auto* a = static_cast<const scalar_t*>(p.a);
  const auto* b = static_cast<const scalar_t*>(p.b);
  auto* out = static_cast<scalar_t*>(p.out);
  const int64_t n_chunks = (p.numel + kNoiseChunk - 1) / kNoiseChunk;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / (4 * kNoiseChunk));
  at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
    acc_t eps[kNoiseChunk], a_buf[kNoiseChunk], b_buf[kNoiseChunk], out_buf[kNoiseChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * kNoiseChunk;
      const int64_t n = std::min(kNoiseChunk, p.numel - start);
      draw_normals(p.seed, p.offset, static_cast<uint64_t>(start / kNormalsPerPhiloxBlock), n, eps);

      acc_t* o = acc_destination(out + start, out_buf);
      if constexpr (kUse == NoiseUse::noise) {
        std::copy(eps, eps + n, o);
      } else {
        const acc_t* x = as_acc(a + start, a_buf, n);
        const acc_t* y = as_acc(b + start, b_buf, n);
        int64_t i = 0;
        for (; i + W <= n; i += W) apply_noise<kUse>(V::loadu(x + i), V::loadu(y + i), V::loadu(eps + i)).store(o + i);
        for (; i < n; ++i) o[i] = apply_noise<kUse>(x[i], y[i], eps[i]);
      }
      flush_acc(out_buf, out + start, n);
    }
  });
}

void reparameterize(const ReparameterizeProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "vae_fast::reparameterize (CPU)", [&] {
    switch (p.use) {
      case NoiseUse::sample: return reparameterize_typed<NoiseUse::sample, scalar_t>(p);
      case NoiseUse::grad_logvar: return reparameterize_typed<NoiseUse::grad_logvar, scalar_t>(p);
      case NoiseUse::noise: return reparameterize_typed<NoiseUse::noise, scalar_t>(p);
    }
  });
}

}  // namespace VAE_FAST_ISA
}  // namespace cpu
}  // namespace vae_fast
