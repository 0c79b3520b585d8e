// Run-time choice between the per-instruction-set builds of the CPU kernels.
#include "kernels.h"

#include <cstdlib>
#include <cstring>

namespace vae_fast {
namespace cpu {

static bool avx512_usable() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return avx512_kernels_built() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

static bool avx2_usable() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return avx2_kernels_built() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

static bool forced_is(const char* forced, const char* name) {
  return forced != nullptr && std::strcmp(forced, name) == 0;
}

// The widest usable set, or VAE_FAST_CPU_ISA's ("generic", "avx2") if it names a narrower one; any
// other value, "avx512" included, leaves the choice to the CPU. Asking for a set the CPU lacks gives
// the best one below it: the variable forces comparisons in tests, and must never make the kernels
// fault.
static Isa detect_isa() {
  const char* forced = std::getenv("VAE_FAST_CPU_ISA");
  const bool allow_avx2 = !forced_is(forced, "generic");
  const bool allow_avx512 = allow_avx2 && !forced_is(forced, "avx2");
  if (allow_avx512 && avx512_usable()) return Isa::avx512;
  if (allow_avx2 && avx2_usable()) return Isa::avx2;
  return Isa::generic;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    case Isa::generic: return "generic";
  }
  return "generic";
}

}  // namespace cpu
}  // namespace vae_fast
