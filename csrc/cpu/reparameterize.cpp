// vae_fast::reparameterize on CPU: z = mu + exp(0.5 logvar) * eps with eps drawn inside the kernel
// from a counter-based generator seeded by torch's CPU generator.
#include "../reparameterize_common.h"
#include "kernels.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <mutex>

namespace vae_fast {
namespace cpu {

at::Tensor reparameterize_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                              std::optional<at::Generator> generator) {
  check_reparameterize_inputs(mu, logvar);
  const at::Tensor mu_c = mu.contiguous(), lv_c = logvar.contiguous();
  at::Tensor z = at::empty(mu.sizes(), mu.options().memory_format(at::MemoryFormat::Contiguous));
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    // One 64-bit draw per call keys the whole tensor's noise, so torch.manual_seed reproduces it.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  ReparameterizeProblem p{mu.scalar_type(), mu_c.const_data_ptr(), lv_c.const_data_ptr(), z.mutable_data_ptr(),
                          mu.numel(), seed, 0};
  if (cpu_isa() == Isa::avx2) avx2::reparameterize(p); else generic::reparameterize(p);
  return z;
}

at::Tensor reparameterize_backward_cpu(const at::Tensor& grad_z, const at::Tensor& z, const at::Tensor& mu) {
  check_reparameterize_backward_inputs(grad_z, z, mu);
  const at::Tensor g_c = grad_z.contiguous(), z_c = z.contiguous(), mu_c = mu.contiguous();
  at::Tensor grad_logvar = at::empty(mu.sizes(), mu.options().memory_format(at::MemoryFormat::Contiguous));
  ReparameterizeBackwardProblem p{mu.scalar_type(), g_c.const_data_ptr(), z_c.const_data_ptr(),
                                  mu_c.const_data_ptr(), grad_logvar.mutable_data_ptr(), mu.numel()};
  if (cpu_isa() == Isa::avx2) avx2::reparameterize_backward(p); else generic::reparameterize_backward(p);
  return grad_logvar;
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("reparameterize", &reparameterize_cpu);
  m.impl("reparameterize_backward", &reparameterize_backward_cpu);
}

}  // namespace cpu
}  // namespace vae_fast
