// AVX2 + FMA CPU kernels. setup.py compiles this file alone with -mavx2 -mfma -mf16c -mbmi
// -mbmi2, so the rest of the extension stays portable (cpu_isa() selects this path only on CPUs that
// have them, and only when this file was built with them). Per-file flags, as PyTorch builds its own
// per-ISA files, rather than `#pragma GCC target`: under that pragma GCC 13's libstdc++ does not
// compile ("inlining failed in call to 'always_inline' ...: target specific option mismatch").
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define VAE_FAST_ISA avx2
#include "kernels_impl.h"
namespace vae_fast {
namespace cpu {
bool avx2_kernels_built() { return true; }
}  // namespace cpu
}  // namespace vae_fast
#else
// Built without those flags (another architecture or compiler): the AVX2 entry points forward to
// the portable kernels, and cpu_isa() never picks them.
#include "kernels.h"
namespace vae_fast {
namespace cpu {
bool avx2_kernels_built() { return false; }
namespace avx2 {
LossDomainErrors vae_loss(const LossProblem& p) { return generic::vae_loss(p); }
void reparameterize(const ReparameterizeProblem& p) { generic::reparameterize(p); }
}  // namespace avx2
}  // namespace cpu
}  // namespace vae_fast
#endif
