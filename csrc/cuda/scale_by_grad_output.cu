// vae_fast::scale_by_grad_output_ on CUDA: grad *= grad_output in place, where grad_output is read
// on the device, so there is no host sync; when it is 1 (the usual `loss.backward()`) every thread
// returns before touching grad, and the loss's forward+backward reads and writes each tensor once.
#include "cuda_utils.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

namespace vae_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename factor_t>
__global__ void __launch_bounds__(kThreads) scale_kernel(scalar_t* grad, const factor_t* factor, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t f = static_cast<acc_t>(*factor);
  if (f == acc_t(1)) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * f);
  }
}

void scale_by_grad_output_cuda(at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.numel() == 1, "scale_by_grad_output_: grad_output must have one element, got ",
              grad_output.sizes());
  TORCH_CHECK(grad.is_contiguous(), "scale_by_grad_output_: grad must be contiguous");
  TORCH_CHECK(grad_output.device() == grad.device(), "scale_by_grad_output_: grad_output is on ",
              grad_output.device(), " but grad is on ", grad.device());
  const int64_t numel = grad.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard device_guard(grad.device());
  // The loss (hence grad_output) is float32 for float/half/bfloat16 gradients, float64 for double.
  const at::Tensor factor = grad_output.to(grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const int64_t blocks = std::max<int64_t>(1, std::min(max_blocks, (numel + kThreads - 1) / kThreads));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "vae_fast::scale_by_grad_output_ (CUDA)", [&] {
    using factor_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scale_kernel<scalar_t, factor_t><<<blocks, kThreads, 0, stream>>>(grad.mutable_data_ptr<scalar_t>(),
                                                                      factor.const_data_ptr<factor_t>(), numel);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("scale_by_grad_output_", &scale_by_grad_output_cuda);
}

}  // namespace cuda
}  // namespace vae_fast
