// vae_fast::scale_by_grad_output_ on CUDA: every grad *= grad_output in place, in one launch
// (blockIdx.y picks the gradient), where grad_output is read on the device, so there is no host
// sync; when it is 1 (the usual `loss.backward()`) every thread returns before touching memory, and
// the loss's forward+backward reads and writes each tensor once.
#include "../scale_by_grad_output_common.h"
#include "cuda_utils.cuh"

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
constexpr int kMaxGrads = 4;  // the loss has four inputs; the host splits longer lists

template <typename scalar_t>
struct GradList {
  scalar_t* data[kMaxGrads];
  int64_t numel[kMaxGrads];
};

template <typename scalar_t, typename factor_t>
__global__ void __launch_bounds__(kThreads) scale_kernel(GradList<scalar_t> grads, const factor_t* factor) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t f = static_cast<acc_t>(*factor);
  if (f == acc_t(1)) return;
  scalar_t* grad = grads.data[blockIdx.y];
  const int64_t numel = grads.numel[blockIdx.y];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * f);
  }
}

void scale_by_grad_output_cuda(at::TensorList grads, const at::Tensor& grad_output) {
  check_scale_by_grad_output_args(grads, grad_output);
  if (grads.empty()) return;
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  const at::Tensor factor = grad_output.to(factor_dtype(grads[0].scalar_type())).contiguous();
  // At most one wave of blocks per gradient, striding over the rest: the scaling is a plain
  // streaming multiply, and in the usual grad_output == 1 case every block only reads the factor
  // and returns, so the launch costs what scheduling its blocks costs.
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 4;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "vae_fast::scale_by_grad_output_ (CUDA)", [&] {
    using factor_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    size_t next = 0;
    while (next < grads.size()) {
      GradList<scalar_t> list{};
      int count = 0;
      int64_t largest = 0;
      for (; next < grads.size() && count < kMaxGrads; ++next) {
        if (grads[next].numel() == 0) continue;
        list.data[count] = const_cast<at::Tensor&>(grads[next]).mutable_data_ptr<scalar_t>();
        list.numel[count] = grads[next].numel();
        largest = std::max(largest, list.numel[count]);
        ++count;
      }
      if (count == 0) break;
      const dim3 blocks(static_cast<unsigned>(std::min(max_blocks, (largest + kThreads - 1) / kThreads)), count);
      scale_kernel<scalar_t, factor_t><<<blocks, kThreads, 0, stream>>>(list, factor.const_data_ptr<factor_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("scale_by_grad_output_", &scale_by_grad_output_cuda);
}

}  // namespace cuda
}  // namespace vae_fast
