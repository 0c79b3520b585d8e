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

// AVX2 where usable, the AVX-512 build only when VAE_FAST_CPU_ISA=avx512 asks for it: on the one
// AVX-512 machine measured (Zen 4, which runs 512-bit operations as two 256-bit halves) it was no
// faster than the AVX2 build (docs/benchmarks.md). VAE_FAST_CPU_ISA=generic gives the portable build.
// Asking for a set the CPU lacks gives the best one below it: the variable forces comparisons in
// tests, and must never make the kernels fault.
static Isa detect_isa() {
  const char* forced = std::getenv("VAE_FAST_CPU_ISA");
  if (forced_is(forced, "generic")) return Isa::generic;
  if (forced_is(forced, "avx512") && avx512_usable()) return Isa::avx512;
  if (avx2_usable()) return Isa::avx2;
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
