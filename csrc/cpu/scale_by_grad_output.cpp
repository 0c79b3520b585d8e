// vae_fast::scale_by_grad_output_ on CPU: grad *= grad_output, skipped when grad_output is 1 (the
// usual `loss.backward()`), which on the CPU costs one scalar read.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace vae_fast {
namespace cpu {

void scale_by_grad_output_cpu(at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.numel() == 1, "scale_by_grad_output_: grad_output must have one element, got ",
              grad_output.sizes());
  if (grad_output.item<double>() == 1.0) return;
  // The factor as a 0-d float (double for double gradients) tensor: ATen then multiplies in float,
  // as the CUDA kernel does. Rounded to the gradient's dtype first (so would mul_(Scalar)), 1.001
  // becomes 1 in bfloat16 and scales nothing.
  grad.mul_(grad_output.reshape({}).to(grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("scale_by_grad_output_", &scale_by_grad_output_cpu);
}

}  // namespace cpu
}  // namespace vae_fast
