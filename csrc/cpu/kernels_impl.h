// CPU kernel bodies, compiled once per instruction set: kernels_<isa>.cpp defines VAE_FAST_ISA
// (and the target flags) and includes this file. The math comes from csrc/vae_math.h.
#pragma once

#include "kernels.h"
#include "vec_primitives.h"

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
    const BceTerm<V> t = bce_term<kLogits>(rv, xv);
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

template <typename scalar_t>
LossDomainErrors vae_loss_typed(const LossProblem& p) {
  const auto* r = static_cast<const scalar_t*>(p.recon);
  const auto* x = static_cast<const scalar_t*>(p.target);
  const auto* mu = static_cast<const scalar_t*>(p.mu);
  const auto* lv = static_cast<const scalar_t*>(p.logvar);
  auto* grad_r = static_cast<scalar_t*>(p.grad_recon);
  auto* grad_x = static_cast<scalar_t*>(p.grad_target);
  auto* grad_mu = static_cast<scalar_t*>(p.grad_mu);
  auto* grad_lv = static_cast<scalar_t*>(p.grad_logvar);
  const int64_t D = p.features, L = p.latents;

  const int64_t blocks_per_row = (D + kBlock - 1) / kBlock;
  const int64_t n_blocks = p.batch * blocks_per_row;
  std::vector<double> block_loss(n_blocks);
  std::atomic<bool> recon_bad{false}, target_bad{false};
  const int64_t block_grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, std::min(D, kBlock)));
  at::parallel_for(0, n_blocks, block_grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t offset = (b / blocks_per_row) * D + (b % blocks_per_row) * kBlock;
      const int64_t n = std::min(kBlock, (b / blocks_per_row + 1) * D - offset);
      LossDomainErrors e;
      block_loss[b] = p.logits
          ? bce_block<true>(r + offset, x + offset, n, grad_r ? grad_r + offset : nullptr,
                            grad_x ? grad_x + offset : nullptr, p.grad_scale, e)
          : bce_block<false>(r + offset, x + offset, n, grad_r ? grad_r + offset : nullptr,
                             grad_x ? grad_x + offset : nullptr, p.grad_scale, e);
      if (e.recon_outside_unit) recon_bad.store(true, std::memory_order_relaxed);
      if (e.target_outside_unit) target_bad.store(true, std::memory_order_relaxed);
    }
  });

  const int64_t row_grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, L));
  at::parallel_for(0, p.batch, row_grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * L;
      const double kl = kl_row(mu + o, lv + o, L, grad_mu ? grad_mu + o : nullptr,
                               grad_lv ? grad_lv + o : nullptr, p.beta * p.grad_scale, p.beta == 0.0);
      double reconstruction = 0.0;
      for (int64_t c = 0; c < blocks_per_row; ++c) reconstruction += block_loss[row * blocks_per_row + c];
      p.row_loss[row] = reconstruction + p.beta * kl;
    }
  });

  LossDomainErrors errors;
  errors.recon_outside_unit = p.check_recon_range && recon_bad.load();
  errors.target_outside_unit = target_bad.load();
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
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    k = avx2_detail::philox_uniforms_x8(seed, offset, first, n, rad_a, ang_a, rad_b, ang_b);
  }
#endif
  for (; k < n; ++k) {
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
    constexpr int64_t kBlocks = kNoiseChunk / kNormalsPerPhiloxBlock;
    acc_t rad_a[kBlocks], ang_a[kBlocks], rad_b[kBlocks], ang_b[kBlocks];
    acc_t first_a[kBlocks], second_a[kBlocks], first_b[kBlocks], second_b[kBlocks];
    acc_t eps[kNoiseChunk], a_buf[kNoiseChunk], b_buf[kNoiseChunk], out_buf[kNoiseChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * kNoiseChunk;
      const int64_t n = std::min(kNoiseChunk, p.numel - start);
      const int64_t n_blocks = (n + kNormalsPerPhiloxBlock - 1) / kNormalsPerPhiloxBlock;
      philox_uniforms(p.seed, p.offset, static_cast<uint64_t>(start / kNormalsPerPhiloxBlock), n_blocks, rad_a,
                      ang_a, rad_b, ang_b);
      box_muller_span(rad_a, ang_a, n_blocks, first_a, second_a);
      box_muller_span(rad_b, ang_b, n_blocks, first_b, second_b);
      for (int64_t k = 0; k < n_blocks; ++k) {
        const acc_t normals[4] = {first_a[k], second_a[k], first_b[k], second_b[k]};
        for (int64_t j = 0; j < kNormalsPerPhiloxBlock && 4 * k + j < n; ++j) eps[4 * k + j] = normals[j];
      }

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
