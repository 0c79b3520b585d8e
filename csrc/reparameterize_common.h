// Argument checks of vae_fast::reparameterize shared by the CPU and CUDA hosts.
#pragma once

#include <ATen/ATen.h>

namespace vae_fast {

inline void check_reparameterize_inputs(const at::Tensor& mu, const at::Tensor& logvar) {
  TORCH_CHECK_TYPE(at::isFloatingType(mu.scalar_type()), "reparameterize: mu must be a floating tensor, got ",
                   mu.scalar_type());
  TORCH_CHECK_TYPE(logvar.scalar_type() == mu.scalar_type(), "reparameterize: logvar has dtype ",
                   logvar.scalar_type(), " but mu has ", mu.scalar_type());
  TORCH_CHECK_VALUE(mu.sizes() == logvar.sizes(), "reparameterize: mu and logvar must have the same shape, got ",
                    mu.sizes(), " and ", logvar.sizes());
  TORCH_CHECK_VALUE(mu.device() == logvar.device(), "reparameterize: mu is on ", mu.device(),
                    " but logvar is on ", logvar.device());
}

inline void check_reparameterize_backward_inputs(const at::Tensor& grad_z, const at::Tensor& z,
                                                 const at::Tensor& mu) {
  TORCH_CHECK(grad_z.sizes() == mu.sizes() && z.sizes() == mu.sizes(),
              "reparameterize_backward: grad_z, z and mu must have one shape, got ", grad_z.sizes(), ", ",
              z.sizes(), " and ", mu.sizes());
  TORCH_CHECK(grad_z.scalar_type() == mu.scalar_type() && z.scalar_type() == mu.scalar_type(),
              "reparameterize_backward: grad_z, z and mu must share one dtype");
  TORCH_CHECK(grad_z.device() == mu.device() && z.device() == mu.device(),
              "reparameterize_backward: grad_z, z and mu must be on one device");
}

}  // namespace vae_fast
