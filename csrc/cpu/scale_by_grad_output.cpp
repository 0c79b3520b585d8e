// vae_fast::scale_by_grad_output_ on CPU: grad *= grad_output, skipped when grad_output is 1 (the
// usual `loss.backward()`), which on the CPU costs one scalar read.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace vae_fast {
namespace cpu {

void scale_by_grad_output_cpu(at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.numel() == 1, "scale_by_grad_output_: grad_output must have one element, got ",
              grad_output.sizes());
  if (grad_output.item<double>() != 1.0) grad.mul_(grad_output.to(grad.scalar_type()));
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("scale_by_grad_output_", &scale_by_grad_output_cpu);
}

}  // namespace cpu
}  // namespace vae_fast
