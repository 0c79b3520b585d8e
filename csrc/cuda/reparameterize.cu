// vae_fast::reparameterize on CUDA: each thread turns one Philox block into 4 normals and writes
// z = mu + exp(0.5 logvar) * eps for 4 elements. The generator state comes from torch's CUDA
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

#include <mutex>

namespace vae_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = static_cast<int>(math::kNormalsPerPhiloxBlock);

template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads) reparameterize_kernel(const scalar_t* mu, const scalar_t* logvar, scalar_t* z,
                                                                   int64_t numel, at::PhiloxCudaState philox) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto [seed, offset] = at::cuda::philox::unpack(philox);
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
      const Pack<scalar_t, kPerThread> m = load_pack<scalar_t, kPerThread>(mu + first);
      const Pack<scalar_t, kPerThread> l = load_pack<scalar_t, kPerThread>(logvar + first);
      Pack<scalar_t, kPerThread> out;
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        out.v[k] = static_cast<scalar_t>(math::reparameterize_sample(static_cast<acc_t>(m.v[k]), static_cast<acc_t>(l.v[k]), eps[k]));
      }
      store_pack(z + first, out);
    } else {
      for (int k = 0; k < kPerThread && first + k < numel; ++k) {
        z[first + k] = static_cast<scalar_t>(
            math::reparameterize_sample(static_cast<acc_t>(mu[first + k]), static_cast<acc_t>(logvar[first + k]), eps[k]));
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) reparameterize_backward_kernel(const scalar_t* grad_z, const scalar_t* z,
                                                                            const scalar_t* mu, scalar_t* grad_logvar,
                                                                            int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    grad_logvar[i] = static_cast<scalar_t>(math::reparameterize_grad_logvar(
        static_cast<acc_t>(grad_z[i]), static_cast<acc_t>(z[i]), static_cast<acc_t>(mu[i])));
  }
}

int64_t grid_for(int64_t work_items) {
  // Enough blocks to fill the device several times over; the loops stride over the rest.
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min(max_blocks, (work_items + kThreads - 1) / kThreads));
}

at::Tensor reparameterize_cuda(const at::Tensor& mu, const at::Tensor& logvar, std::optional<at::Generator> generator) {
  check_reparameterize_inputs(mu, logvar);
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const at::Tensor mu_c = mu.contiguous(), lv_c = logvar.contiguous();
  at::Tensor z = at::empty(mu.sizes(), mu.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = mu.numel();
  if (numel == 0) return z;
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(kPerThread);  // each element's group draws one Philox block
  }
  const int64_t groups = (numel + kPerThread - 1) / kPerThread;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vae_fast::reparameterize (CUDA)", [&] {
    const scalar_t* m = mu_c.const_data_ptr<scalar_t>();
    const scalar_t* l = lv_c.const_data_ptr<scalar_t>();
    scalar_t* out = z.mutable_data_ptr<scalar_t>();
    constexpr int64_t pack_bytes = sizeof(Pack<scalar_t, kPerThread>);
    if (aligned_to(m, pack_bytes) && aligned_to(l, pack_bytes) && aligned_to(out, pack_bytes)) {
      reparameterize_kernel<scalar_t, true><<<grid_for(groups), kThreads, 0, stream>>>(m, l, out, numel, philox);
    } else {
      reparameterize_kernel<scalar_t, false><<<grid_for(groups), kThreads, 0, stream>>>(m, l, out, numel, philox);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

at::Tensor reparameterize_backward_cuda(const at::Tensor& grad_z, const at::Tensor& z, const at::Tensor& mu) {
  check_reparameterize_backward_inputs(grad_z, z, mu);
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const at::Tensor g_c = grad_z.contiguous(), z_c = z.contiguous(), mu_c = mu.contiguous();
  at::Tensor grad_logvar = at::empty(mu.sizes(), mu.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = mu.numel();
  if (numel == 0) return grad_logvar;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vae_fast::reparameterize_backward (CUDA)", [&] {
    reparameterize_backward_kernel<scalar_t><<<grid_for(numel), kThreads, 0, stream>>>(
        g_c.const_data_ptr<scalar_t>(), z_c.const_data_ptr<scalar_t>(), mu_c.const_data_ptr<scalar_t>(),
        grad_logvar.mutable_data_ptr<scalar_t>(), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logvar;
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("reparameterize", &reparameterize_cuda);
  m.impl("reparameterize_backward", &reparameterize_backward_cuda);
}

}  // namespace cuda
}  // namespace vae_fast
