// vae_fast::reparameterize on CPU: z = mu + exp(0.5 logvar) * eps with eps drawn inside the kernel
// from a counter-based generator seeded by torch's CPU generator; the backward and the noise op draw
// the same eps again from the call's noise state.
#include "../reparameterize_common.h"
#include "kernels.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <mutex>

namespace vae_fast {
namespace cpu {
namespace {

void run(const ReparameterizeProblem& p) {
  switch (cpu_isa()) {
    case Isa::avx512: return avx512::reparameterize(p);
    case Isa::avx2: return avx2::reparameterize(p);
    case Isa::generic: return generic::reparameterize(p);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reparameterize_sample_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                                             std::optional<at::Generator> generator) {
  check_reparameterize_inputs(mu, logvar);
  const at::Tensor mu_c = mu.contiguous(), lv_c = logvar.contiguous();
  at::Tensor z = empty_like_contiguous(mu);
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    // One 64-bit draw per call keys the whole tensor's noise, so torch.manual_seed reproduces it.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  const uint64_t offset = 0;
  run({mu.scalar_type(), math::NoiseUse::sample, mu_c.const_data_ptr(), lv_c.const_data_ptr(), z.mutable_data_ptr(),
       mu.numel(), seed, offset});
  at::Tensor state = at::empty({2}, mu.options().dtype(at::kLong));
  state.mutable_data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);  // the bits, read back as uint64
  state.mutable_data_ptr<int64_t>()[1] = static_cast<int64_t>(offset);
  return {z, state};
}

at::Tensor reparameterize_cpu(const at::Tensor& mu, const at::Tensor& logvar, std::optional<at::Generator> generator) {
  return std::get<0>(reparameterize_sample_cpu(mu, logvar, std::move(generator)));
}

namespace {

at::Tensor replay_noise(math::NoiseUse use, const at::Tensor& a, const at::Tensor& logvar, const at::Tensor& state) {
  const at::Tensor lv_c = logvar.contiguous();
  const at::Tensor a_c = a.defined() ? a.contiguous() : at::Tensor();
  at::Tensor out = empty_like_contiguous(logvar);
  const int64_t* s = state.const_data_ptr<int64_t>();
  run({logvar.scalar_type(), use, a_c.defined() ? a_c.const_data_ptr() : nullptr, lv_c.const_data_ptr(),
       out.mutable_data_ptr(), logvar.numel(), static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[1])});
  return out;
}

}  // namespace

at::Tensor reparameterize_backward_cpu(const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& state) {
  check_reparameterize_backward_inputs(grad_z, logvar, state);
  return replay_noise(math::NoiseUse::grad_logvar, grad_z, logvar, state);
}

at::Tensor reparameterize_noise_cpu(const at::Tensor& logvar, const at::Tensor& state) {
  check_noise_state("reparameterize_noise", state, logvar);
  return replay_noise(math::NoiseUse::noise, at::Tensor(), logvar, state);
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("reparameterize", &reparameterize_cpu);
  m.impl("reparameterize_sample", &reparameterize_sample_cpu);
  m.impl("reparameterize_backward", &reparameterize_backward_cpu);
  m.impl("reparameterize_noise", &reparameterize_noise_cpu);
}

}  // namespace cpu
}  // namespace vae_fast
