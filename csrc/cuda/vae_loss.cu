// vae_fast::vae_loss on CUDA. One warp per (row, chunk of features) reads recon and x once with
// 16-byte loads, writes the gradients in the same pass, and leaves one partial sum; the warp on a
// row's first chunk adds beta * KL of that row. A second kernel combines the partials in a fixed
// order: no float atomics, so loss and gradients are bitwise reproducible.
//
// Gaussian and Laplace terms (csrc/vae_math.h) take the same walk; their log_scale is read per
// element from a cached per-feature or full-shape tensor (its exp costs nothing next to the
// memory traffic here), and its gradient leaves as per-warp totals (one shared scale), per-element
// values (full shape), or per-element values in a scratch buffer that a column kernel sums over rows
// in fixed groups (one scale per feature), all without atomics.
//
// Inputs outside the Bernoulli domain (probabilities or targets outside [0, 1]) are not checked
// here, since a check would need a device-to-host sync: they make that element's loss and
// gradients NaN instead (hence the sample's loss and the reduced loss); so do count targets that
// are negative, NaN or infinite (poisson/nb/zinb, computed in double from csrc/vae_math.h).
#include "../vae_loss_common.h"
#include "../vae_math.h"
#include "cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace vae_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kChunk = 2048;  // features per warp item; a multiple of every pack width

template <typename scalar_t>
struct LossArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* recon;
  const scalar_t* target;
  const scalar_t* mu;
  const scalar_t* logvar;
  scalar_t* grad_recon;  // null when not wanted, likewise below
  scalar_t* grad_target;
  scalar_t* grad_mu;
  scalar_t* grad_logvar;
  int64_t batch, features, latents, chunks_per_row;
  double beta, grad_scale;
  // gaussian/laplace: log_scale tensor (null: log_scale_value) in `layout`, and where its gradient
  // goes (each null when not wanted): per-warp-item totals, per-element in log_scale's dtype, or
  // per-element in the accumulation type (reduction "none", or per-feature sums to come).
  const scalar_t* log_scale;
  math::ScaleLayout layout;
  double log_scale_value;
  acc_t* grad_log_scale_partial;
  scalar_t* grad_log_scale_elements;
  acc_t* grad_log_scale_acc;
  // zinb: the zero-inflation logits and their gradient (null when not wanted / not zinb).
  const scalar_t* zi_logits;
  scalar_t* grad_zi_logits;
  // vae_fast::vae_loss_grads_: grad_output on the device (null in the forward: 1), which multiplies
  // grad_scale, and whether the pass returns before touching memory when it is 1.
  const acc_t* grad_output;
  bool keep_if_one;
};

// In a vae_loss_grads_ pass with keep_if_one (`keep_if`, the device's grad_output; null otherwise),
// whether grad_output is 1, so that every kernel of the pass returns before touching memory.
template <typename acc_t>
__device__ __forceinline__ bool kept(const acc_t* keep_if) {
  return keep_if != nullptr && *keep_if == acc_t(1);
}

// log_scale of the element at flat index i (feature j of its row).
template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> log_scale_at(const LossArgs<scalar_t>& a, int64_t i, int64_t j,
                                                                  at::opmath_type<scalar_t> uniform) {
  using acc_t = at::opmath_type<scalar_t>;
  switch (a.layout) {
    case math::ScaleLayout::per_feature: return static_cast<acc_t>(a.log_scale[j]);
    case math::ScaleLayout::per_element: return static_cast<acc_t>(a.log_scale[i]);
    default: return uniform;
  }
}

// log_theta of the element at flat index i (feature j of its row) for a per-feature or per-element
// log_theta, in double: the count terms are computed in double (csrc/vae_math.h).
template <typename scalar_t>
__device__ __forceinline__ double count_log_theta(const LossArgs<scalar_t>& a, int64_t i, int64_t j) {
  return static_cast<double>(a.layout == math::ScaleLayout::per_feature ? a.log_scale[j] : a.log_scale[i]);
}

template <bool kLogits, typename acc_t>
__device__ __forceinline__ math::BceTerm<acc_t> bce_checked(acc_t r, acc_t x) {
  math::BceTerm<acc_t> t = kLogits ? math::bce_from_logits(r, x) : math::bce_from_probs(r, x);
  // Comparisons with NaN are false: a NaN input is not "outside" here, it propagates by itself
  // (into the loss, and into each gradient that depends on it, as on the CPU).
  const bool outside = (x < acc_t(0) || x > acc_t(1)) || (!kLogits && (r < acc_t(0) || r > acc_t(1)));
  // The gradients too: a finite gradient of a NaN loss (p = 1.5 gives ~1.5e12) would let an
  // optimizer step move on garbage.
  if (outside) t.loss = t.d_recon = t.d_target = acc_t(NAN);
  return t;
}

template <typename scalar_t, math::Likelihood kLik, bool kLogits, int kVec, bool kAligned>
__global__ void __launch_bounds__(kThreads) vae_loss_partials_kernel(LossArgs<scalar_t> a, at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kBernoulli = kLik == math::Likelihood::bernoulli;
  constexpr bool kCount = math::is_count(kLik);
  const int lane = threadIdx.x % kWarp;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (item >= a.batch * a.chunks_per_row || kept(a.keep_if_one ? a.grad_output : nullptr)) return;
  const int64_t row = item / a.chunks_per_row;
  const int64_t chunk = item % a.chunks_per_row;
  const int64_t base = row * a.features;
  const int64_t begin = base + chunk * kChunk;
  const int64_t end = base + min(a.features, (chunk + 1) * kChunk);
  // grad_output times grad_scale in double, rounded once: in float before any gradient is rounded
  // to scalar_t (a float16 gradient above 65504 times 1/4 stays finite).
  const double grad_scale = a.grad_output ? a.grad_scale * static_cast<double>(*a.grad_output) : a.grad_scale;
  const acc_t scale = static_cast<acc_t>(grad_scale);

  // One shared scale: its log and exp once per thread.
  acc_t s_uniform(0), r_uniform(1), constant(0);
  math::NbTheta<double> theta_uniform{};
  if constexpr (kCount) {
    theta_uniform = math::nb_theta(a.log_scale ? static_cast<double>(a.log_scale[0]) : a.log_scale_value);
  } else if constexpr (!kBernoulli) {
    s_uniform = a.log_scale ? static_cast<acc_t>(a.log_scale[0]) : static_cast<acc_t>(a.log_scale_value);
    r_uniform = math::inverse_scale(s_uniform);
    constant = static_cast<acc_t>(math::location_scale_constant<kLik>());
  }

  acc_t sum(0), grad_s_sum(0);
  // kVec > 1 only when features % kVec == 0; kAligned when every pointer is pack-aligned too
  // (both checked on the host). The traversal, hence the order of the sum, depends on kVec alone.
#pragma unroll 4
  for (int64_t i = begin + lane * kVec; i < end; i += kWarp * kVec) {
    const Pack<scalar_t, kVec> r = load_pack_any<scalar_t, kVec, kAligned>(a.recon + i);
    const Pack<scalar_t, kVec> x = load_pack_any<scalar_t, kVec, kAligned>(a.target + i);
    Pack<scalar_t, kVec> gr, gx;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if constexpr (kBernoulli) {
        const math::BceTerm<acc_t> t = bce_checked<kLogits>(static_cast<acc_t>(r.v[k]), static_cast<acc_t>(x.v[k]));
        sum += t.loss;
        gr.v[k] = static_cast<scalar_t>(t.d_recon * scale);
        gx.v[k] = static_cast<scalar_t>(t.d_target * scale);
      } else if constexpr (kCount) {
        const double l = static_cast<double>(r.v[k]), xv = static_cast<double>(x.v[k]);
        const math::NbTheta<double> th = a.layout == math::ScaleLayout::uniform
                                             ? theta_uniform
                                             : math::nb_theta(count_log_theta(a, i + k, i + k - base));
        const double z = kLik == math::Likelihood::zinb ? static_cast<double>(a.zi_logits[i + k]) : 0.0;
        const math::CountTerm<double> c = math::count_term<kLik>(l, xv, th, z);
        sum += static_cast<acc_t>(c.loss);
        gr.v[k] = static_cast<scalar_t>(c.d_recon * grad_scale);
        if (a.grad_target) gx.v[k] = static_cast<scalar_t>(math::count_target_grad<kLik>(l, xv, th, z) * grad_scale);
        if (a.grad_zi_logits) a.grad_zi_logits[i + k] = static_cast<scalar_t>(c.d_zi * grad_scale);
        grad_s_sum += static_cast<acc_t>(c.d_log_theta);
        if (a.grad_log_scale_elements) a.grad_log_scale_elements[i + k] = static_cast<scalar_t>(c.d_log_theta * grad_scale);
        if (a.grad_log_scale_acc) a.grad_log_scale_acc[i + k] = static_cast<acc_t>(c.d_log_theta * grad_scale);
      } else {
        const acc_t s = log_scale_at(a, i + k, i + k - base, s_uniform);
        const acc_t inv = a.layout == math::ScaleLayout::uniform ? r_uniform : math::inverse_scale(s);
        const math::LocationScaleTerm<acc_t> t =
            math::location_scale_term<kLik>(static_cast<acc_t>(r.v[k]), static_cast<acc_t>(x.v[k]), inv);
        sum += t.loss + (s + constant);
        gr.v[k] = static_cast<scalar_t>(t.d_recon * scale);
        gx.v[k] = static_cast<scalar_t>(t.d_target * scale);
        grad_s_sum += t.d_log_scale;
        if (a.grad_log_scale_elements) a.grad_log_scale_elements[i + k] = static_cast<scalar_t>(t.d_log_scale * scale);
        if (a.grad_log_scale_acc) a.grad_log_scale_acc[i + k] = t.d_log_scale * scale;
      }
    }
    if (a.grad_recon) store_pack_any<scalar_t, kVec, kAligned>(a.grad_recon + i, gr);
    if (a.grad_target) store_pack_any<scalar_t, kVec, kAligned>(a.grad_target + i, gx);
  }
  sum = warp_sum(sum);
  if (a.grad_log_scale_partial) {
    grad_s_sum = warp_sum(grad_s_sum);
    if (lane == 0) a.grad_log_scale_partial[item] = grad_s_sum * scale;
  }

  if (chunk == 0) {
    const acc_t kl_scale = static_cast<acc_t>(a.beta * grad_scale);
    acc_t kl(0);
    for (int64_t j = row * a.latents + lane; j < (row + 1) * a.latents; j += kWarp) {
      const acc_t lv = static_cast<acc_t>(a.logvar[j]);
      const math::KlTerm<acc_t> t =
          math::kl_standard_normal(static_cast<acc_t>(a.mu[j]), a.beta == 0.0 ? math::logvar_for_zero_weight(lv) : lv);
      kl += t.kl;
      if (a.grad_mu) a.grad_mu[j] = static_cast<scalar_t>(t.d_mu * kl_scale);
      if (a.grad_logvar) a.grad_logvar[j] = static_cast<scalar_t>(t.d_logvar * kl_scale);
    }
    sum += static_cast<acc_t>(a.beta) * warp_sum(kl);
  }
  if (lane == 0) partial[item] = sum;
}

// reduction "none": one thread per row sums its chunks in order.
template <typename acc_t>
__global__ void row_losses_kernel(const acc_t* partial, int64_t batch, int64_t chunks_per_row, acc_t* out) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < batch;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t total(0);
    for (int64_t c = 0; c < chunks_per_row; ++c) total += partial[row * chunks_per_row + c];
    out[row] = total;
  }
}

constexpr int kReduceThreads = 1024;

// reduction "sum"/"mean": a single block; each thread sums a fixed stride of partials, then a
// fixed tree combines the threads.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kReduceThreads) total_kernel(const acc_t* partial, int64_t count, double divisor, out_t* out,
                                                               const acc_t* keep_if = nullptr) {
  if (kept(keep_if)) return;
  __shared__ acc_t shared[kReduceThreads];
  acc_t total(0);
  for (int64_t i = threadIdx.x; i < count; i += kReduceThreads) total += partial[i];
  shared[threadIdx.x] = total;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<out_t>(shared[0] / divisor);
}

// A per-feature scale's gradient: column sums of the per-element values [batch, features], first
// over fixed groups of rows (one thread per (group, feature): coalesced across features), then over
// the groups in order, in double so that long columns lose nothing.
constexpr int kColumnThreads = 128;
constexpr int64_t kRowsPerGroup = 256;

template <typename acc_t>
__global__ void column_group_sums_kernel(const acc_t* values, int64_t rows, int64_t features, double* group_sums,
                                         const acc_t* keep_if) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  const int64_t group = blockIdx.y;
  if (j >= features || kept(keep_if)) return;
  double total = 0.0;
  const int64_t last = min(rows, (group + 1) * kRowsPerGroup);
  for (int64_t row = group * kRowsPerGroup; row < last; ++row) total += static_cast<double>(values[row * features + j]);
  group_sums[group * features + j] = total;
}

template <typename acc_t, typename out_t>
__global__ void column_totals_kernel(const double* group_sums, int64_t groups, int64_t features, out_t* out,
                                     const acc_t* keep_if) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (j >= features || kept(keep_if)) return;
  double total = 0.0;
  for (int64_t g = 0; g < groups; ++g) total += group_sums[g * features + j];
  out[j] = static_cast<out_t>(total);
}

template <typename scalar_t, math::Likelihood kLik, bool kLogits, int kVec, bool kAligned>
void launch_partials(const LossArgs<scalar_t>& args, at::opmath_type<scalar_t>* partial, cudaStream_t stream) {
  const int64_t items = args.batch * args.chunks_per_row;
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  vae_loss_partials_kernel<scalar_t, kLik, kLogits, kVec, kAligned><<<blocks, kThreads, 0, stream>>>(args, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// How the partials kernel walks a row: 16-byte packs (features a multiple of the pack width, every
// pointer aligned), the same packs read element by element (misaligned views: same sums, same bits),
// or single elements (other feature counts).
enum class Walk { aligned_packs, unaligned_packs, elements };

template <typename scalar_t, math::Likelihood kLik, bool kLogits>
void launch_partials_for(Walk walk, const LossArgs<scalar_t>& args, at::opmath_type<scalar_t>* partial, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(scalar_t);
  switch (walk) {
    case Walk::aligned_packs: return launch_partials<scalar_t, kLik, kLogits, kPack, true>(args, partial, stream);
    case Walk::unaligned_packs: return launch_partials<scalar_t, kLik, kLogits, kPack, false>(args, partial, stream);
    case Walk::elements: return launch_partials<scalar_t, kLik, kLogits, 1, true>(args, partial, stream);
  }
}

template <typename scalar_t>
void launch_partials_for(math::Likelihood likelihood, bool logits, Walk walk, const LossArgs<scalar_t>& args,
                         at::opmath_type<scalar_t>* partial, cudaStream_t stream) {
  switch (likelihood) {
    case math::Likelihood::bernoulli:
      return logits ? launch_partials_for<scalar_t, math::Likelihood::bernoulli, true>(walk, args, partial, stream)
                    : launch_partials_for<scalar_t, math::Likelihood::bernoulli, false>(walk, args, partial, stream);
    case math::Likelihood::gaussian:
      return launch_partials_for<scalar_t, math::Likelihood::gaussian, false>(walk, args, partial, stream);
    case math::Likelihood::laplace:
      return launch_partials_for<scalar_t, math::Likelihood::laplace, false>(walk, args, partial, stream);
    case math::Likelihood::poisson:
      return launch_partials_for<scalar_t, math::Likelihood::poisson, false>(walk, args, partial, stream);
    case math::Likelihood::nb:
      return launch_partials_for<scalar_t, math::Likelihood::nb, false>(walk, args, partial, stream);
    case math::Likelihood::zinb:
      return launch_partials_for<scalar_t, math::Likelihood::zinb, false>(walk, args, partial, stream);
  }
}

// The loss from the partials kernel's per-item sums: each row's ("none") or their total.
template <typename acc_t>
void launch_loss_reduction(const at::Tensor& partial, int64_t batch, int64_t chunks_per_row, Reduction reduction,
                           at::Tensor& loss) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const acc_t* partial_ptr = partial.const_data_ptr<acc_t>();
  if (reduction == Reduction::none) {
    if (batch == 0) return;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((batch + threads - 1) / threads, 65535);
    row_losses_kernel<acc_t><<<blocks, threads, 0, stream>>>(partial_ptr, batch, chunks_per_row,
                                                                loss.mutable_data_ptr<acc_t>());
  } else {
    const double divisor = reduction == Reduction::mean ? static_cast<double>(batch) : 1.0;
    total_kernel<acc_t, acc_t><<<1, kReduceThreads, 0, stream>>>(partial_ptr, partial.numel(), divisor,
                                                                 loss.mutable_data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The log_scale gradient's reduction to its shape, after the partials kernel: a total of the
// per-item sums (one shared scale) or column sums of the per-element values (one per feature).
template <typename scalar_t>
void launch_log_scale_reduction(const LossArgs<scalar_t>& args, bool shared_scale, at::Tensor& grad_log_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto* out = grad_log_scale.mutable_data_ptr<scalar_t>();
  const acc_t* keep_if = args.keep_if_one ? args.grad_output : nullptr;
  // Decided by the layout, not by a null pointer: an empty batch has empty (null) partials too.
  if (shared_scale) {
    total_kernel<acc_t, scalar_t><<<1, kReduceThreads, 0, stream>>>(
        args.grad_log_scale_partial, args.batch * args.chunks_per_row, 1.0, out, keep_if);
  } else {
    const int64_t groups = std::max<int64_t>(1, (args.batch + kRowsPerGroup - 1) / kRowsPerGroup);
    const int64_t column_blocks = (args.features + kColumnThreads - 1) / kColumnThreads;
    if (column_blocks == 0) return;
    at::Tensor group_sums = at::zeros({groups, args.features}, grad_log_scale.options().dtype(at::kDouble));
    if (args.batch > 0) {
      column_group_sums_kernel<<<dim3(column_blocks, groups), kColumnThreads, 0, stream>>>(
          args.grad_log_scale_acc, args.batch, args.features, group_sums.mutable_data_ptr<double>(), keep_if);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    column_totals_kernel<<<column_blocks, kColumnThreads, 0, stream>>>(group_sums.const_data_ptr<double>(), groups,
                                                                         args.features, out, keep_if);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t chunks_per_row(const LossShape& shape) {
  return std::max<int64_t>(1, (shape.features + kChunk - 1) / kChunk);
}

// One fused pass over a prepared call: every wanted gradient into the call's tensors (times
// grad_output when given, a device pointer; see LossArgs), with the log_scale gradient reduced to
// its shape, and each warp item's loss into `partial` [batch * chunks_per_row] (loss dtype).
void launch_loss_pass(const LossCall& call, const std::array<bool, 6>& grad_mask, bool logits, double log_scale_value,
                      double beta, const at::Tensor& grad_output, bool keep_if_one, at::Tensor& partial) {
  const LossShape& shape = call.shape;
  const at::Tensor& recon = call.recon;
  const int64_t chunks = chunks_per_row(shape);
  const at::ScalarType acc_dtype = loss_dtype(recon.scalar_type());
  // Where the log_scale gradient is gathered before its reduction (see LossArgs).
  const bool want_grad_s = grad_mask[4];
  const bool reduce_total = want_grad_s && !call.grad_log_scale_per_element && call.scale_layout == math::ScaleLayout::uniform;
  const bool reduce_columns =
      want_grad_s && !call.grad_log_scale_per_element && call.scale_layout == math::ScaleLayout::per_feature;
  at::Tensor grad_s_partial = reduce_total ? at::empty({shape.batch * chunks}, recon.options().dtype(acc_dtype)) : at::Tensor();
  at::Tensor grad_s_scratch = reduce_columns ? at::empty({shape.batch, shape.features}, recon.options().dtype(acc_dtype)) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, recon.scalar_type(), "vae_fast::vae_loss (CUDA)", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LossArgs<scalar_t> args;
    args.recon = call.recon.const_data_ptr<scalar_t>();
    args.target = call.x.const_data_ptr<scalar_t>();
    args.mu = call.mu.const_data_ptr<scalar_t>();
    args.logvar = call.logvar.const_data_ptr<scalar_t>();
    args.grad_recon = call.grad_ptr<scalar_t>(call.grad_recon, grad_mask[0]);
    args.grad_target = call.grad_ptr<scalar_t>(call.grad_x, grad_mask[1]);
    args.grad_mu = call.grad_ptr<scalar_t>(call.grad_mu, grad_mask[2]);
    args.grad_logvar = call.grad_ptr<scalar_t>(call.grad_logvar, grad_mask[3]);
    args.batch = shape.batch;
    args.features = shape.features;
    args.latents = shape.latents;
    args.chunks_per_row = chunks;
    args.beta = beta;
    args.grad_scale = call.grad_scale;
    args.log_scale = call.log_scale.defined() ? call.log_scale.const_data_ptr<scalar_t>() : nullptr;
    args.layout = call.scale_layout;
    args.log_scale_value = log_scale_value;
    args.grad_log_scale_partial = reduce_total ? grad_s_partial.mutable_data_ptr<acc_t>() : nullptr;
    args.grad_log_scale_elements =
        want_grad_s && !call.grad_log_scale_per_element && call.scale_layout == math::ScaleLayout::per_element
            ? call.grad_log_scale.mutable_data_ptr<scalar_t>()
            : nullptr;
    args.grad_log_scale_acc = call.grad_log_scale_per_element ? call.grad_log_scale.mutable_data_ptr<acc_t>()
                              : reduce_columns                 ? grad_s_scratch.mutable_data_ptr<acc_t>()
                                                               : nullptr;
    args.zi_logits = call.zi_logits.defined() ? call.zi_logits.const_data_ptr<scalar_t>() : nullptr;
    args.grad_zi_logits = call.grad_ptr<scalar_t>(call.grad_zi_logits, grad_mask[5]);
    args.grad_output = grad_output.defined() ? grad_output.const_data_ptr<acc_t>() : nullptr;
    args.keep_if_one = keep_if_one;
    constexpr int64_t kPackBytes = 16;
    const bool packed = shape.features % (kPackBytes / static_cast<int64_t>(sizeof(scalar_t))) == 0;
    const bool aligned = aligned_to(args.recon, kPackBytes) && aligned_to(args.target, kPackBytes) &&
                         (!args.grad_recon || aligned_to(args.grad_recon, kPackBytes)) &&
                         (!args.grad_target || aligned_to(args.grad_target, kPackBytes));
    const Walk walk = !packed ? Walk::elements : aligned ? Walk::aligned_packs : Walk::unaligned_packs;
    if (shape.batch > 0) {
      launch_partials_for<scalar_t>(call.likelihood, logits, walk, args, partial.mutable_data_ptr<acc_t>(),
                                    at::cuda::getCurrentCUDAStream());
    }
    if (reduce_total || reduce_columns) {
      at::Tensor grad_s = call.grad_log_scale;
      launch_log_scale_reduction<scalar_t>(args, reduce_total, grad_s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_cuda(
    const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& zi_logits,
    c10::string_view likelihood, bool logits, double log_scale_value, double beta, c10::string_view reduction,
    std::array<bool, 6> grad_mask) {
  const LossCall call =
      prepare_loss_call(recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits, beta, reduction, grad_mask);
  const LossShape& shape = call.shape;
  const c10::cuda::CUDAGuard device_guard(recon.device());
  const int64_t chunks = chunks_per_row(shape);
  const at::ScalarType acc_dtype = loss_dtype(recon.scalar_type());
  at::Tensor partial = at::empty({shape.batch * chunks}, recon.options().dtype(acc_dtype));
  at::Tensor loss = call.reduction == Reduction::none ? at::empty({shape.batch}, recon.options().dtype(acc_dtype))
                                                      : at::empty({}, recon.options().dtype(acc_dtype));
  launch_loss_pass(call, grad_mask, logits, log_scale_value, beta, at::Tensor(), false, partial);
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "vae_fast::vae_loss (CUDA)", [&] {
    launch_loss_reduction<scalar_t>(partial, shape.batch, chunks, call.reduction, loss);
  });
  return {loss, call.grad_recon, call.grad_x, call.grad_mu, call.grad_logvar, call.grad_log_scale, call.grad_zi_logits};
}

// The same pass again with grad_output read on the device, into the given gradients (the loss's
// partials go to scratch); with keep_if_one and grad_output 1 every kernel returns at once.
void vae_loss_grads_cuda(const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
                         const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& zi_logits,
                         c10::string_view likelihood, bool logits, double log_scale_value, double beta,
                         c10::string_view reduction, std::array<bool, 6> grad_mask, const at::Tensor& grad_output,
                         bool keep_if_one, at::TensorList grads) {
  check_grad_output(grad_output, recon);
  const LossCall call = prepare_loss_grads_call(recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits, beta,
                                                reduction, grad_mask, grads);
  const c10::cuda::CUDAGuard device_guard(recon.device());
  const at::ScalarType acc_dtype = loss_dtype(recon.scalar_type());
  const at::Tensor factor = grad_output.reshape({}).to(acc_dtype).contiguous();
  at::Tensor partial = at::empty({call.shape.batch * chunks_per_row(call.shape)}, recon.options().dtype(acc_dtype));
  launch_loss_pass(call, grad_mask, logits, log_scale_value, beta, factor, keep_if_one, partial);
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("vae_loss", &vae_loss_cuda);
  m.impl("vae_loss_grads_", &vae_loss_grads_cuda);
}

}  // namespace cuda
}  // namespace vae_fast
