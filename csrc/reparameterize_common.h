// Argument checks of vae_fast::reparameterize shared by the CPU and CUDA hosts.
#pragma once

#include <ATen/ATen.h>

#include "output_alloc.h"  // empty_like_contiguous

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

// The noise state of one reparameterize call: int64 [seed, offset], on the data's device.
inline void check_noise_state(const char* op, const at::Tensor& state, const at::Tensor& like) {
  TORCH_CHECK_VALUE(state.scalar_type() == at::kLong && state.numel() == 2 && state.is_contiguous(), op,
                    ": noise_state must be the contiguous int64 [seed, offset] pair from reparameterize_sample, got ",
                    state.scalar_type(), " of shape ", state.sizes(), state.is_contiguous() ? "" : " (not contiguous)",
                    ". A torch.compile cache written by an older vae_fast replays its older backward here: remove "
                    "that cache (TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_<user>) and run again.");
  TORCH_CHECK_VALUE(state.device() == like.device(), op, ": noise_state is on ", state.device(), " but logvar is on ",
                    like.device());
}

inline void check_reparameterize_backward_inputs(const at::Tensor& grad_z, const at::Tensor& logvar,
                                                 const at::Tensor& state) {
  TORCH_CHECK_VALUE(grad_z.sizes() == logvar.sizes(), "reparameterize_backward: grad_z and logvar must have one shape, got ",
                    grad_z.sizes(), " and ", logvar.sizes());
  TORCH_CHECK_TYPE(grad_z.scalar_type() == logvar.scalar_type(),
                   "reparameterize_backward: grad_z and logvar must share one dtype");
  TORCH_CHECK_VALUE(grad_z.device() == logvar.device(), "reparameterize_backward: grad_z and logvar must be on one device");
  check_noise_state("reparameterize_backward", state, logvar);
}

}  // namespace vae_fast
