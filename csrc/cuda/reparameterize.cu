// vae_fast::reparameterize on CUDA: each thread turns one Philox block into 4 normals and writes
// z = mu + exp(0.5 logvar) * eps for 4 elements; the backward (and the noise op) draw the same eps
// again from the forward's noise state. The generator state comes from torch's CUDA
// generator as (seed, offset) through PhiloxCudaState, as torch's own random kernels take it, so
// torch.manual_seed reproduces a draw and the op can be captured in a CUDA graph.
#include "../reparameterize_common.h"
#include "../vae_math.h"
#include "cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/detail/UnpackRaw.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <initializer_list>
#include <mutex>

namespace vae_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = static_cast<int>(math::kNormalsPerPhiloxBlock);

// Each thread turns Philox block g into 4 normals and writes apply_noise<kUse>(a, b, eps) for
// elements 4g .. 4g+3: the same eps for the same (seed, offset, element) in every pass.
template <math::NoiseUse kUse, typename scalar_t, bool kVec>
__device__ __forceinline__ void noise_pass(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t numel,
                                           uint64_t seed, uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kReads = kUse != math::NoiseUse::noise;
  const int64_t groups = (numel + kPerThread - 1) / kPerThread;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    // torch counts the offset in 32-bit draws; one Philox block is 4 of them.
    const math::Philox4 bits = math::philox4x32_10(seed, offset / 4, static_cast<uint64_t>(g));
    acc_t eps[kPerThread];
    math::box_muller(math::uniform_open_closed<acc_t>(bits.v[0]), math::uniform_closed_open<acc_t>(bits.v[1]), eps[0], eps[1]);
    math::box_muller(math::uniform_open_closed<acc_t>(bits.v[2]), math::uniform_closed_open<acc_t>(bits.v[3]), eps[2], eps[3]);
    const int64_t first = g * kPerThread;
    if (kVec && first + kPerThread <= numel) {
      Pack<scalar_t, kPerThread> x{}, y{}, result;
      if constexpr (kReads) {
        x = load_pack<scalar_t, kPerThread>(a + first);
        y = load_pack<scalar_t, kPerThread>(b + first);
      }
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        result.v[k] = static_cast<scalar_t>(
            math::apply_noise<kUse>(static_cast<acc_t>(x.v[k]), static_cast<acc_t>(y.v[k]), eps[k]));
      }
      store_pack(out + first, result);
    } else {
      for (int k = 0; k < kPerThread && first + k < numel; ++k) {
        const acc_t x = kReads ? static_cast<acc_t>(a[first + k]) : acc_t(0);
        const acc_t y = kReads ? static_cast<acc_t>(b[first + k]) : acc_t(0);
        out[first + k] = static_cast<scalar_t>(math::apply_noise<kUse>(x, y, eps[k]));
      }
    }
  }
}

// The forward: (seed, offset) from torch's generator (read on the device when captured in a CUDA
// graph), written to noise_state by the first thread so that the backward of this very call (or of
// this replay) draws the same eps.
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads) sample_kernel(const scalar_t* mu, const scalar_t* logvar, scalar_t* z,
                                                           int64_t numel, at::PhiloxCudaState philox,
                                                           int64_t* noise_state) {
  const auto [seed, offset] = at::cuda::philox::unpack(philox);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    noise_state[0] = static_cast<int64_t>(seed);
    noise_state[1] = static_cast<int64_t>(offset);
  }
  noise_pass<math::NoiseUse::sample, scalar_t, kVec>(mu, logvar, z, numel, seed, offset);
}

// The backward and the noise op: (seed, offset) from a forward's noise_state.
template <math::NoiseUse kUse, typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads) replay_kernel(const scalar_t* a, const scalar_t* b, scalar_t* out,
                                                           int64_t numel, const int64_t* noise_state) {
  noise_pass<kUse, scalar_t, kVec>(a, b, out, numel, static_cast<uint64_t>(noise_state[0]),
                                   static_cast<uint64_t>(noise_state[1]));
}

int64_t grid_for(int64_t work_items) {
  // Enough blocks to fill the device several times over; the loops stride over the rest.
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min(max_blocks, (work_items + kThreads - 1) / kThreads));
}

template <typename scalar_t>
bool packs_aligned(std::initializer_list<const void*> pointers) {
  for (const void* ptr : pointers) {
    if (ptr != nullptr && !aligned_to(ptr, sizeof(Pack<scalar_t, kPerThread>))) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_sample_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                                              std::optional<at::Generator> generator) {
  check_reparameterize_inputs(mu, logvar);
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const at::Tensor mu_c = mu.contiguous(), lv_c = logvar.contiguous();
  at::Tensor z = empty_like_contiguous(mu);
  at::Tensor noise_state = at::empty({2}, mu.options().dtype(at::kLong));
  const int64_t numel = mu.numel();
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(kPerThread);  // each element's group draws one Philox block
  }
  const int64_t groups = std::max<int64_t>(1, (numel + kPerThread - 1) / kPerThread);  // >= 1: the state is written
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vae_fast::reparameterize (CUDA)", [&] {
    const scalar_t* m = mu_c.const_data_ptr<scalar_t>();
    const scalar_t* l = lv_c.const_data_ptr<scalar_t>();
    scalar_t* out = z.mutable_data_ptr<scalar_t>();
    int64_t* state = noise_state.mutable_data_ptr<int64_t>();
    if (packs_aligned<scalar_t>({m, l, out})) {
      sample_kernel<scalar_t, true><<<grid_for(groups), kThreads, 0, stream>>>(m, l, out, numel, philox, state);
    } else {
      sample_kernel<scalar_t, false><<<grid_for(groups), kThreads, 0, stream>>>(m, l, out, numel, philox, state);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {z, noise_state};
}

at::Tensor reparameterize_cuda(const at::Tensor& mu, const at::Tensor& logvar, std::optional<at::Generator> generator) {
  return std::get<0>(reparameterize_sample_cuda(mu, logvar, std::move(generator)));
}

template <math::NoiseUse kUse>
at::Tensor replay_noise(const at::Tensor& a, const at::Tensor& logvar, const at::Tensor& noise_state) {
  const c10::cuda::CUDAGuard device_guard(logvar.device());
  const at::Tensor lv_c = logvar.contiguous();
  const at::Tensor a_c = a.defined() ? a.contiguous() : at::Tensor();
  at::Tensor out = empty_like_contiguous(logvar);
  const int64_t numel = logvar.numel();
  if (numel == 0) return out;
  const int64_t groups = (numel + kPerThread - 1) / kPerThread;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logvar.scalar_type(), "vae_fast::reparameterize_backward (CUDA)", [&] {
    const scalar_t* x = a_c.defined() ? a_c.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* l = lv_c.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t* state = noise_state.const_data_ptr<int64_t>();
    if (packs_aligned<scalar_t>({x, l, o})) {
      replay_kernel<kUse, scalar_t, true><<<grid_for(groups), kThreads, 0, stream>>>(x, l, o, numel, state);
    } else {
      replay_kernel<kUse, scalar_t, false><<<grid_for(groups), kThreads, 0, stream>>>(x, l, o, numel, state);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor reparameterize_backward_cuda(const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& noise_state) {
  check_reparameterize_backward_inputs(grad_z, logvar, noise_state);
  return replay_noise<math::NoiseUse::grad_logvar>(grad_z, logvar, noise_state);
}

at::Tensor reparameterize_noise_cuda(const at::Tensor& logvar, const at::Tensor& noise_state) {
  check_noise_state("reparameterize_noise", noise_state, logvar);
  return replay_noise<math::NoiseUse::noise>(at::Tensor(), logvar, noise_state);
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("reparameterize", &reparameterize_cuda);
  m.impl("reparameterize_sample", &reparameterize_sample_cuda);
  m.impl("reparameterize_backward", &reparameterize_backward_cuda);
  m.impl("reparameterize_noise", &reparameterize_noise_cuda);
}

}  // namespace cuda
}  // namespace vae_fast
