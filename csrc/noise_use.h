// Which quantity a pass of the reparameterize noise kernels writes (csrc/vae_math.h, apply_noise).
// A header of its own: the CPU kernels' problem description (csrc/cpu/kernels.h) names it without
// pulling in the math, which must follow the vector primitives it is instantiated with.
#pragma once

namespace vae_fast {
namespace math {

// From the regenerated eps and two inputs a and b: the forward sample (a = mu, b = logvar), the
// logvar gradient (a = grad_z, b = logvar), or the noise itself (for a differentiable double
// backward).
enum class NoiseUse { sample, grad_logvar, noise };

}  // namespace math
}  // namespace vae_fast
