// vae_fast::scale_by_grad_output_ on CPU: every grad *= grad_output, skipped when grad_output is 1
// (the usual `loss.backward()`), which on the CPU costs one scalar read for all of them.
#include "../scale_by_grad_output_common.h"

#include <torch/library.h>

namespace vae_fast {
namespace cpu {

void scale_by_grad_output_cpu(at::TensorList grads, const at::Tensor& grad_output) {
  check_scale_by_grad_output_args(grads, grad_output);
  if (grads.empty() || grad_output.item<double>() == 1.0) return;
  // The factor as a 0-d float (double for double gradients) tensor: ATen then multiplies in float,
  // as the CUDA kernel does (mul_(Scalar) would round the factor to the gradient's dtype too).
  const at::Tensor factor = grad_output.reshape({}).to(factor_dtype(grads[0].scalar_type()));
  for (const at::Tensor& grad : grads) const_cast<at::Tensor&>(grad).mul_(factor);
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("scale_by_grad_output_", &scale_by_grad_output_cpu);
}

}  // namespace cpu
}  // namespace vae_fast
