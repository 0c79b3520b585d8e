"""Fake (meta) kernels of the torch.ops.vae_fast custom ops, for torch.compile and opcheck: output
shapes and dtypes without computing anything. Schemas and device kernels live in csrc/, and so
does autograd (csrc/autograd.cpp, in C++ because the Python autograd layer cost more per training
step than the kernels themselves).
"""

from __future__ import annotations

import torch

from . import _extension

if _extension.extension_loaded():
    # ---- reparameterize ----

    @torch.library.register_fake("vae_fast::reparameterize")
    def _reparameterize_fake(mu, logvar, generator=None):
        torch._check(mu.shape == logvar.shape, lambda: "reparameterize: mu and logvar must have the same shape")
        return mu.new_empty(mu.shape)

    @torch.library.register_fake("vae_fast::reparameterize_sample")
    def _reparameterize_sample_fake(mu, logvar, generator=None):
        torch._check(mu.shape == logvar.shape, lambda: "reparameterize: mu and logvar must have the same shape")
        return mu.new_empty(mu.shape), mu.new_empty((2,), dtype=torch.int64)

    @torch.library.register_fake("vae_fast::reparameterize_backward")
    def _reparameterize_backward_fake(grad_z, logvar, noise_state):
        return logvar.new_empty(logvar.shape)

    @torch.library.register_fake("vae_fast::reparameterize_noise")
    def _reparameterize_noise_fake(logvar, noise_state):
        return logvar.new_empty(logvar.shape)

    # ---- vae_loss ----

    @torch.library.register_fake("vae_fast::vae_loss")
    def _vae_loss_fake(recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits, log_scale_value, beta, reduction,
                       grad_mask):
        torch._check(recon.dim() >= 1, lambda: "vae_loss: recon must have a batch dimension")
        loss_dtype = torch.float64 if recon.dtype == torch.float64 else torch.float32
        loss_shape = (recon.shape[0],) if reduction == "none" else ()
        loss = recon.new_empty(loss_shape, dtype=loss_dtype)
        grads = [t.new_empty(t.shape) if wanted else t.new_empty((0,)) for t, wanted in zip((recon, x, mu, logvar), grad_mask)]
        if not grad_mask[4]:
            grad_log_scale = recon.new_empty((0,))
        elif reduction == "none":  # each element's own derivative (see the schema in csrc/ops.cpp)
            grad_log_scale = recon.new_empty(recon.shape, dtype=loss_dtype)
        else:
            grad_log_scale = log_scale.new_empty(log_scale.shape)
        grad_zi_logits = zi_logits.new_empty(zi_logits.shape) if grad_mask[5] else recon.new_empty((0,))
        return (loss, *grads, grad_log_scale, grad_zi_logits)

    @torch.library.register_fake("vae_fast::scale_by_grad_output_")
    def _scale_by_grad_output_fake(grads, grad_output):
        return None

    @torch.library.register_fake("vae_fast::vae_loss_grads_")
    def _vae_loss_grads_fake(recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits, log_scale_value, beta,
                             reduction, grad_mask, grad_output, keep_if_one, grads):
        return None
