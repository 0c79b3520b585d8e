// AVX-512 CPU kernels (16 float lanes). setup.py compiles this file alone with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mfma -mf16c -mbmi -mbmi2, as kernels_avx2.cpp with its flags (see there why
// per-file flags and not `#pragma GCC target`); cpu_isa() selects it only when VAE_FAST_CPU_ISA=avx512
// asks for it on a CPU that has them (isa.cpp says why). The
// float32 exp/log/reciprocal are avx2_math.h's, a 256-bit half at a time; the rest is at::vec's
// 512-bit lanes.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define VAE_FAST_ISA avx512
#include "kernels_impl.h"
namespace vae_fast {
namespace cpu {
bool avx512_kernels_built() { return true; }
}  // namespace cpu
}  // namespace vae_fast
#else
// Built without those flags (another architecture or compiler): the AVX-512 entry points forward to
// the portable kernels, and cpu_isa() never picks them.
#include "kernels.h"
namespace vae_fast {
namespace cpu {
bool avx512_kernels_built() { return false; }
namespace avx512 {
LossDomainErrors vae_loss(const LossProblem& p) { return generic::vae_loss(p); }
void reparameterize(const ReparameterizeProblem& p) { generic::reparameterize(p); }
}  // namespace avx512
}  // namespace cpu
}  // namespace vae_fast
#endif
