// The decoder likelihoods of vae_fast::vae_loss and how a location-scale likelihood's log_scale is
// laid out. A header of its own, like noise_use.h: the CPU kernels' problem description names
// these without pulling in the math.
#pragma once

namespace vae_fast {
namespace math {

// poisson, nb and zinb model counts: recon is log mu; nb/zinb carry log_theta (the log inverse
// dispersion) in the log_scale slot, zinb also the zero-inflation logits.
enum class Likelihood { bernoulli, gaussian, laplace, poisson, nb, zinb };

constexpr bool is_count(Likelihood lik) {
  return lik == Likelihood::poisson || lik == Likelihood::nb || lik == Likelihood::zinb;
}

// log_scale (gaussian/laplace; log_theta for nb/zinb) is one value for the whole batch (a fixed float, or a 0-d / one-element
// tensor), one value per feature shared by every sample, or one value per element.
enum class ScaleLayout { uniform, per_feature, per_element };

}  // namespace math
}  // namespace vae_fast
