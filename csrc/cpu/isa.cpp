// Run-time choice between the per-instruction-set builds of the CPU kernels.
#include "kernels.h"

#include <cstdlib>
#include <cstring>

namespace vae_fast {
namespace cpu {

static Isa detect_isa() {
  const char* forced = std::getenv("VAE_FAST_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return Isa::generic;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (avx2_kernels_built() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::avx2;
#endif
  return Isa::generic;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

const char* isa_name(Isa isa) { return isa == Isa::avx2 ? "avx2" : "generic"; }

}  // namespace cpu
}  // namespace vae_fast
