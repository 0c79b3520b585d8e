// The CPU kernels' entry points. Each is compiled once per instruction set (kernels_generic.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp) and chosen at run time by cpu_isa().
#pragma once

#include <ATen/ATen.h>

#include "../likelihood.h"
#include "../noise_use.h"

#include <cstdint>

namespace vae_fast {
namespace cpu {

// One VAE loss evaluation on contiguous [batch, features] / [batch, latents] data of one dtype.
struct LossProblem {
  at::ScalarType dtype;
  const void* recon;
  const void* target;
  const void* mu;
  const void* logvar;
  void* grad_recon;   // each grad pointer is null when that gradient is not wanted
  void* grad_target;
  void* grad_mu;
  void* grad_logvar;
  int64_t batch;
  int64_t features;
  int64_t latents;
  math::Likelihood likelihood;
  bool logits;                 // bernoulli: recon holds logits
  // gaussian/laplace (log_theta for nb/zinb): log_scale is log_scale_value for every element when the pointer is null, else
  // a tensor of recon's dtype laid out as scale_layout says (1, features or batch * features values).
  math::ScaleLayout scale_layout;
  const void* log_scale;
  double log_scale_value;
  // d loss / d log_scale, null when not wanted: in log_scale's layout (times grad_scale), or, when
  // grad_log_scale_per_element (reduction "none"), each element's own derivative, [batch, features]
  // in the accumulation type (float for half inputs), for the backward to weigh by sample.
  void* grad_log_scale;
  bool grad_log_scale_per_element;
  // zinb: logits of the zero-inflation probability, [batch, features] (null otherwise), and their
  // gradient (null when not wanted).
  const void* zi_logits;
  void* grad_zi_logits;
  double beta;
  double grad_scale;      // 1, or 1/batch for reduction="mean"
  double* row_loss;       // [batch] out: reconstruction + beta * KL of each sample
  bool check_recon_range; // probabilities: flag any recon outside [0, 1]
};

struct LossDomainErrors {
  bool recon_outside_unit = false;
  bool target_outside_unit = false;
  bool target_not_count = false;  // poisson/nb/zinb: some x negative, NaN or infinite
};

// One pass that draws eps for every element from Philox (seed, offset) and writes
// math::apply_noise<use>(a, b, eps): the sample z (a = mu, b = logvar), the logvar gradient
// (a = grad_z, b = logvar), or eps itself (a, b unused, may be null).
struct ReparameterizeProblem {
  at::ScalarType dtype;
  math::NoiseUse use;
  const void* a;
  const void* b;
  void* out;
  int64_t numel;
  uint64_t seed;
  uint64_t offset;
};

enum class Isa { generic, avx2, avx512 };

// The instruction set the CPU kernels use: AVX2 where the CPU has it; VAE_FAST_CPU_ISA=avx512 or
// generic asks for another (isa.cpp).
Isa cpu_isa();
const char* isa_name(Isa isa);
// Whether kernels_avx2.cpp / kernels_avx512.cpp were compiled with their flags (setup.py adds them
// on x86-64).
bool avx2_kernels_built();
bool avx512_kernels_built();

#define VAE_FAST_DECLARE_KERNELS(ns)                                       \
  namespace ns {                                                           \
  LossDomainErrors vae_loss(const LossProblem& p);                         \
  void reparameterize(const ReparameterizeProblem& p);                     \
  }
VAE_FAST_DECLARE_KERNELS(generic)
VAE_FAST_DECLARE_KERNELS(avx2)
VAE_FAST_DECLARE_KERNELS(avx512)
#undef VAE_FAST_DECLARE_KERNELS

}  // namespace cpu
}  // namespace vae_fast
