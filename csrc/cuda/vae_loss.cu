// vae_fast::vae_loss on CUDA. One warp per (row, chunk of features) reads recon and x once with
// 16-byte loads, writes the gradients in the same pass, and leaves one partial sum; the warp on a
// row's first chunk adds beta * KL of that row. A second kernel combines the partials in a fixed
// order: no float atomics, so loss and gradients are bitwise reproducible.
//
// Inputs outside the Bernoulli domain (probabilities or targets outside [0, 1]) are not checked
// here, since a check would need a device-to-host sync: they make that element's loss and
// gradients NaN instead (hence the sample's loss and the reduced loss).
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
};

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

template <typename scalar_t, bool kLogits, int kVec, bool kAligned>
__global__ void __launch_bounds__(kThreads) vae_loss_partials_kernel(LossArgs<scalar_t> a, at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (item >= a.batch * a.chunks_per_row) return;
  const int64_t row = item / a.chunks_per_row;
  const int64_t chunk = item % a.chunks_per_row;
  const int64_t base = row * a.features;
  const int64_t begin = base + chunk * kChunk;
  const int64_t end = base + min(a.features, (chunk + 1) * kChunk);
  const acc_t scale = static_cast<acc_t>(a.grad_scale);

  acc_t sum(0);
  // kVec > 1 only when features % kVec == 0; kAligned when every pointer is pack-aligned too
  // (both checked on the host). The traversal, hence the order of the sum, depends on kVec alone.
#pragma unroll 4
  for (int64_t i = begin + lane * kVec; i < end; i += kWarp * kVec) {
    const Pack<scalar_t, kVec> r = load_pack_any<scalar_t, kVec, kAligned>(a.recon + i);
    const Pack<scalar_t, kVec> x = load_pack_any<scalar_t, kVec, kAligned>(a.target + i);
    Pack<scalar_t, kVec> gr, gx;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const math::BceTerm<acc_t> t = bce_checked<kLogits>(static_cast<acc_t>(r.v[k]), static_cast<acc_t>(x.v[k]));
      sum += t.loss;
      gr.v[k] = static_cast<scalar_t>(t.d_recon * scale);
      gx.v[k] = static_cast<scalar_t>(t.d_target * scale);
    }
    if (a.grad_recon) store_pack_any<scalar_t, kVec, kAligned>(a.grad_recon + i, gr);
    if (a.grad_target) store_pack_any<scalar_t, kVec, kAligned>(a.grad_target + i, gx);
  }
  sum = warp_sum(sum);

  if (chunk == 0) {
    const acc_t kl_scale = static_cast<acc_t>(a.beta * a.grad_scale);
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
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) total_loss_kernel(const acc_t* partial, int64_t count, double divisor, acc_t* out) {
  __shared__ acc_t shared[kReduceThreads];
  acc_t total(0);
  for (int64_t i = threadIdx.x; i < count; i += kReduceThreads) total += partial[i];
  shared[threadIdx.x] = total;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<acc_t>(shared[0] / divisor);
}

template <typename scalar_t, bool kLogits, int kVec, bool kAligned>
void launch_partials(const LossArgs<scalar_t>& args, at::opmath_type<scalar_t>* partial, cudaStream_t stream) {
  const int64_t items = args.batch * args.chunks_per_row;
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  vae_loss_partials_kernel<scalar_t, kLogits, kVec, kAligned><<<blocks, kThreads, 0, stream>>>(args, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// How the partials kernel walks a row: 16-byte packs (features a multiple of the pack width, every
// pointer aligned), the same packs read element by element (misaligned views: same sums, same bits),
// or single elements (other feature counts).
enum class Walk { aligned_packs, unaligned_packs, elements };

template <typename scalar_t, bool kLogits>
void launch_partials_for(Walk walk, const LossArgs<scalar_t>& args, at::opmath_type<scalar_t>* partial, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(scalar_t);
  switch (walk) {
    case Walk::aligned_packs: return launch_partials<scalar_t, kLogits, kPack, true>(args, partial, stream);
    case Walk::unaligned_packs: return launch_partials<scalar_t, kLogits, kPack, false>(args, partial, stream);
    case Walk::elements: return launch_partials<scalar_t, kLogits, 1, true>(args, partial, stream);
  }
}

template <typename scalar_t>
void launch_loss(const LossArgs<scalar_t>& args, bool logits, Walk walk, Reduction reduction,
                 at::Tensor& partial, at::Tensor& loss) {
  using acc_t = at::opmath_type<scalar_t>;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  acc_t* partial_ptr = partial.mutable_data_ptr<acc_t>();
  if (args.batch > 0) {
    logits ? launch_partials_for<scalar_t, true>(walk, args, partial_ptr, stream)
           : launch_partials_for<scalar_t, false>(walk, args, partial_ptr, stream);
  }
  if (reduction == Reduction::none) {
    if (args.batch == 0) return;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((args.batch + threads - 1) / threads, 65535);
    row_losses_kernel<acc_t><<<blocks, threads, 0, stream>>>(partial_ptr, args.batch, args.chunks_per_row,
                                                                loss.mutable_data_ptr<acc_t>());
  } else {
    const double divisor = reduction == Reduction::mean ? static_cast<double>(args.batch) : 1.0;
    total_loss_kernel<acc_t><<<1, kReduceThreads, 0, stream>>>(partial_ptr, partial.numel(), divisor,
                                                               loss.mutable_data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_cuda(
    const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
    bool logits, double beta, c10::string_view reduction, std::array<bool, 4> grad_mask) {
  const LossCall call = prepare_loss_call(recon, x, mu, logvar, beta, reduction, grad_mask);
  const Reduction red = call.reduction;
  const LossShape& shape = call.shape;
  const c10::cuda::CUDAGuard device_guard(recon.device());

  const int64_t chunks_per_row = std::max<int64_t>(1, (shape.features + kChunk - 1) / kChunk);
  const at::ScalarType acc_dtype = loss_dtype(recon.scalar_type());
  at::Tensor partial = at::empty({shape.batch * chunks_per_row}, recon.options().dtype(acc_dtype));
  at::Tensor loss = red == Reduction::none ? at::empty({shape.batch}, recon.options().dtype(acc_dtype))
                                           : at::empty({}, recon.options().dtype(acc_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, recon.scalar_type(), "vae_fast::vae_loss (CUDA)", [&] {
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
    args.chunks_per_row = chunks_per_row;
    args.beta = beta;
    args.grad_scale = call.grad_scale;
    constexpr int64_t kPackBytes = 16;
    const bool packed = shape.features % (kPackBytes / static_cast<int64_t>(sizeof(scalar_t))) == 0;
    const bool aligned = aligned_to(args.recon, kPackBytes) && aligned_to(args.target, kPackBytes) &&
                         (!args.grad_recon || aligned_to(args.grad_recon, kPackBytes)) &&
                         (!args.grad_target || aligned_to(args.grad_target, kPackBytes));
    const Walk walk = !packed ? Walk::elements : aligned ? Walk::aligned_packs : Walk::unaligned_packs;
    launch_loss<scalar_t>(args, logits, walk, red, partial, loss);
  });
  return {loss, call.grad_recon, call.grad_x, call.grad_mu, call.grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("vae_loss", &vae_loss_cuda);
}

}  // namespace cuda
}  // namespace vae_fast
