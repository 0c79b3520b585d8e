"""Python side of the torch.ops.vae_fast custom ops: fake (meta) kernels for torch.compile and
autograd formulas. The schemas and device kernels live in csrc/.

The loss op computes every input gradient in its forward pass (inputs are read once); its backward
only scales those gradients by grad_output, and skips even that when grad_output is exactly 1 (the
usual `loss.backward()`), which the CUDA kernel decides on the device without a sync.
"""

from __future__ import annotations

import torch

from . import _extension

if _extension.extension_loaded():
    _lib_ops = torch.ops.vae_fast

    # ---- reparameterize ----

    @torch.library.register_fake("vae_fast::reparameterize")
    def _reparameterize_fake(mu, logvar, generator=None):
        torch._check(mu.shape == logvar.shape, lambda: "reparameterize: mu and logvar must have the same shape")
        return mu.new_empty(mu.shape)

    @torch.library.register_fake("vae_fast::reparameterize_backward")
    def _reparameterize_backward_fake(grad_z, z, mu):
        return mu.new_empty(mu.shape)

    def _reparameterize_setup_context(ctx, inputs, output):
        ctx.save_for_backward(output, inputs[0])  # z and mu: d z/d logvar = 0.5 (z - mu)

    def _reparameterize_backward(ctx, grad_z):
        z, mu = ctx.saved_tensors
        grad_mu = grad_z if ctx.needs_input_grad[0] else None
        grad_logvar = _lib_ops.reparameterize_backward(grad_z, z, mu) if ctx.needs_input_grad[1] else None
        return grad_mu, grad_logvar, None

    torch.library.register_autograd(
        "vae_fast::reparameterize", _reparameterize_backward, setup_context=_reparameterize_setup_context
    )

    # ---- vae_loss ----

    @torch.library.register_fake("vae_fast::vae_loss")
    def _vae_loss_fake(recon, x, mu, logvar, logits, beta, reduction, grad_mask):
        torch._check(recon.dim() >= 1, lambda: "vae_loss: recon must have a batch dimension")
        loss_dtype = torch.float64 if recon.dtype == torch.float64 else torch.float32
        loss_shape = (recon.shape[0],) if reduction == "none" else ()
        loss = recon.new_empty(loss_shape, dtype=loss_dtype)
        grads = [t.new_empty(t.shape) if wanted else t.new_empty((0,)) for t, wanted in zip((recon, x, mu, logvar), grad_mask)]
        return (loss, *grads)

    def _vae_loss_setup_context(ctx, inputs, output):
        *_, reduction, grad_mask = inputs
        grads = output[1:]
        ctx.mark_non_differentiable(*grads)
        # Nothing flows back into the gradient outputs; without this autograd would allocate and
        # zero-fill a gradient for each of them on every backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*grads)
        ctx.reduction = reduction
        ctx.grad_mask = tuple(grad_mask)

    @torch.library.register_fake("vae_fast::scale_by_grad_output_")
    def _scale_by_grad_output_fake(grad, grad_output):
        return None

    def _is_traced(t: torch.Tensor) -> bool:
        # torch.compile and opcheck trace the backward with fake/functional tensors, which cannot
        # take the in-place update of a saved tensor.
        return type(t) is not torch.Tensor or torch.compiler.is_compiling()

    def _vae_loss_backward(ctx, grad_loss, *unused_grad_of_grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                "vae_fast.vae_loss supports first-order gradients only (backward with create_graph=True "
                "would give wrong second derivatives); use vae_fast.reference.vae_loss for those"
            )
        if grad_loss is None:  # the loss itself took no part in what is being differentiated
            return (None,) * 8
        result = []
        for index, grad in enumerate(ctx.saved_tensors):
            if not ctx.needs_input_grad[index]:
                result.append(None)
                continue
            if not ctx.grad_mask[index]:
                raise RuntimeError(
                    f"vae_fast::vae_loss was called with grad_mask[{index}]=False for an input that requires "
                    "grad; call vae_fast.vae_loss, which sets the mask"
                )
            if ctx.reduction == "none":
                scale = grad_loss.reshape((-1,) + (1,) * (grad.dim() - 1))
                result.append((grad * scale).to(grad.dtype))
            elif _is_traced(grad_loss):
                result.append((grad * grad_loss).to(grad.dtype))  # the compiler fuses this multiply
            else:
                # In place on the saved gradient: a second backward through this loss then fails
                # autograd's version check instead of reusing scaled values.
                _lib_ops.scale_by_grad_output_(grad, grad_loss)
                result.append(grad)
        return (*result, None, None, None, None)

    torch.library.register_autograd("vae_fast::vae_loss", _vae_loss_backward, setup_context=_vae_loss_setup_context)
