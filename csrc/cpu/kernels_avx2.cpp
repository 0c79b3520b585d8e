// AVX2 + FMA CPU kernels. The defines must come before any ATen header so that at::vec picks its
// 256-bit implementation; the target pragma lets this file use those instructions while the rest of
// the extension stays portable (cpu_isa() only selects this path on CPUs that have them).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
// The pragma enables the instructions but not the feature macros that sleef.h and at::vec test.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define VAE_FAST_ISA avx2
#include "kernels_impl.h"
#else
// Elsewhere the AVX2 entry points forward to the portable kernels (cpu_isa() never picks them).
#include "kernels.h"
namespace vae_fast {
namespace cpu {
namespace avx2 {
LossDomainErrors vae_loss(const LossProblem& p) { return generic::vae_loss(p); }
void reparameterize(const ReparameterizeProblem& p) { generic::reparameterize(p); }
void reparameterize_backward(const ReparameterizeBackwardProblem& p) { generic::reparameterize_backward(p); }
}  // namespace avx2
}  // namespace cpu
}  // namespace vae_fast
#endif
