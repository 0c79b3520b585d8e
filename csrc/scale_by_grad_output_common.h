// Argument checks of vae_fast::scale_by_grad_output_ shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

namespace vae_fast {

// The gradients of one loss share a dtype and device (the op's inputs must) and are contiguous
// (allocated by the loss); grad_output is the loss's one-element incoming gradient.
inline void check_scale_by_grad_output_args(at::TensorList grads, const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(grad_output.numel() == 1, "scale_by_grad_output_: grad_output must have one element, got shape ",
                    grad_output.sizes());
  for (const at::Tensor& grad : grads) {
    TORCH_CHECK_VALUE(grad.is_contiguous(), "scale_by_grad_output_: every grad must be contiguous");
    TORCH_CHECK_TYPE(grad.scalar_type() == grads[0].scalar_type(), "scale_by_grad_output_: grads have dtypes ",
                     grads[0].scalar_type(), " and ", grad.scalar_type(), "; they must share one");
    TORCH_CHECK_VALUE(grad.device() == grad_output.device(), "scale_by_grad_output_: grad_output is on ",
                      grad_output.device(), " but a grad is on ", grad.device());
  }
}

// The factor's dtype: float for float/half/bfloat16 gradients (the loss, hence grad_output, is
// float32 for them), double for double. Rounded to the gradient's own dtype first, 1.001 would
// become 1 in bfloat16 and scale nothing.
inline at::ScalarType factor_dtype(at::ScalarType grad_dtype) {
  return grad_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace vae_fast
