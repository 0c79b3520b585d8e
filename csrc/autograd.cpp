// Autograd of vae_fast::reparameterize and vae_fast::vae_loss, in C++ for every device. At training
// batch sizes the Python autograd layer (torch.library.register_autograd) cost more than the
// kernels: ~0.1 ms per op and step at B=128 on a CPU, most of a step's possible saving.
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <c10/core/DispatchKey.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "output_alloc.h"

#include <array>
#include <vector>
#include <optional>
#include <tuple>

namespace vae_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LossGradMask = std::array<bool, 6>;

// The device kernels, called through the dispatcher below autograd (typed handles found once).
at::Tensor reparameterize_op(const at::Tensor& mu, const at::Tensor& logvar, std::optional<at::Generator> generator) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_fast::reparameterize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, std::optional<at::Generator>)>();
  return op.call(mu, logvar, std::move(generator));
}

std::tuple<at::Tensor, at::Tensor> reparameterize_sample_op(const at::Tensor& mu, const at::Tensor& logvar,
                                                            std::optional<at::Generator> generator) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vae_fast::reparameterize_sample", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, std::optional<at::Generator>)>();
  return op.call(mu, logvar, std::move(generator));
}

at::Tensor reparameterize_backward_op(const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& state) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_fast::reparameterize_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_z, logvar, state);
}

at::Tensor reparameterize_noise_op(const at::Tensor& logvar, const at::Tensor& state) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_fast::reparameterize_noise", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(logvar, state);
}

LossResult vae_loss_op(const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
                       const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& zi_logits,
                       c10::string_view likelihood, bool logits, double log_scale_value, double beta,
                       c10::string_view reduction, LossGradMask grad_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vae_fast::vae_loss", "")
          .typed<LossResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view, bool,
                            double, double, c10::string_view, LossGradMask)>();
  return op.call(recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits, log_scale_value, beta, reduction,
                 grad_mask);
}

const c10::TypedOperatorHandle<void(at::TensorList, const at::Tensor&)>& scale_by_grad_output_handle() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_fast::scale_by_grad_output_", "")
                             .typed<void(at::TensorList, const at::Tensor&)>();
  return op;
}

using LossGradsSignature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view,
                                bool, double, double, c10::string_view, LossGradMask, const at::Tensor&, bool,
                                at::TensorList);

const c10::TypedOperatorHandle<LossGradsSignature>& vae_loss_grads_handle() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("vae_fast::vae_loss_grads_", "").typed<LossGradsSignature>();
  return op;
}

// The two in-place ops' ADInplaceOrView kernels, for direct calls: autograd learns of an in-place
// change through the tensor's version counter, which ATen's own in-place ops bump here. The kernels
// write through raw pointers, so without this their changes would go unseen. (VaeLoss::backward
// calls the ops below these kernels: it writes only into gradients that have not left the node.)
void scale_by_grad_output_ad_inplace_or_view(c10::DispatchKeySet keys, at::TensorList grads, const at::Tensor& grad_output) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    scale_by_grad_output_handle().redispatch(keys & c10::after_ADInplaceOrView_keyset, grads, grad_output);
  }
  for (const at::Tensor& grad : grads) torch::autograd::impl::bump_version(grad);
}

void vae_loss_grads_ad_inplace_or_view(c10::DispatchKeySet keys, const at::Tensor& recon, const at::Tensor& x,
                                       const at::Tensor& mu, const at::Tensor& logvar,
                                       const std::optional<at::Tensor>& log_scale,
                                       const std::optional<at::Tensor>& zi_logits, c10::string_view likelihood,
                                       bool logits, double log_scale_value, double beta, c10::string_view reduction,
                                       LossGradMask grad_mask, const at::Tensor& grad_output, bool keep_if_one,
                                       at::TensorList grads) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    vae_loss_grads_handle().redispatch(keys & c10::after_ADInplaceOrView_keyset, recon, x, mu, logvar, log_scale,
                                       zi_logits, likelihood, logits, log_scale_value, beta, reduction, grad_mask,
                                       grad_output, keep_if_one, grads);
  }
  for (const at::Tensor& grad : grads) torch::autograd::impl::bump_version(grad);
}

// torch.compile and opcheck trace backward with fake or functional tensors: those can neither be
// updated in place as saved tensors nor be read for their value.
bool is_traced(const at::Tensor& t) {
  return t.key_set().has(c10::DispatchKey::Python) || at::functionalization::impl::isFunctionalTensor(t);
}

class Reparameterize : public torch::autograd::Function<Reparameterize> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                            std::optional<at::Generator> generator) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [z, noise_state] = reparameterize_sample_op(mu, logvar, std::move(generator));
    // d z / d logvar = 0.5 exp(0.5 logvar) eps, with eps drawn again from the call's noise state in
    // backward: no eps and no z kept, and exact in every dtype (0.5 (z - mu) from the rounded z
    // cancels where sigma * eps is small next to mu's spacing).
    ctx->save_for_backward({logvar, noise_state});
    return z;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_z = grads[0];
    if (!grad_z.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &logvar = saved[0], &noise_state = saved[1];
    at::Tensor grad_mu = ctx->needs_input_grad(0) ? grad_z : at::Tensor();
    at::Tensor grad_logvar;
    if (ctx->needs_input_grad(1)) {
      if (at::GradMode::is_enabled() && !is_traced(grad_z)) {
        // create_graph=True: the gradient must itself be differentiable, so it is written with torch
        // ops around the regenerated eps (a constant): d2z/dlogvar2 = 0.25 * sigma * eps. The
        // fused kernel is opaque to autograd.
        at::Tensor eps;
        {
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          eps = reparameterize_noise_op(logvar, noise_state);
        }
        grad_logvar = 0.5 * grad_z * at::exp(0.5 * logvar) * eps;
      } else {
        grad_logvar = reparameterize_backward_op(grad_z, logvar, noise_state);
      }
    }
    return {grad_mu, grad_logvar, at::Tensor()};
  }
};

// The forward pass already computed every wanted gradient of the (reduced) loss; backward hands
// them out times grad_output (see scaled_gradients for "sum" and "mean").
class VaeLoss : public torch::autograd::Function<VaeLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu,
                               const at::Tensor& logvar, const std::optional<at::Tensor>& log_scale,
                               const std::optional<at::Tensor>& zi_logits, c10::string_view likelihood, bool logits,
                               double log_scale_value, double beta, c10::string_view reduction,
                               LossGradMask grad_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad_recon, grad_x, grad_mu, grad_logvar, grad_log_scale, grad_zi_logits] = vae_loss_op(
        recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits, log_scale_value, beta, reduction, grad_mask);
    // The inputs too: a backward whose grad_output is not 1 computes the gradients again from them.
    ctx->save_for_backward({grad_recon, grad_x, grad_mu, grad_logvar, grad_log_scale, grad_zi_logits, recon, x, mu,
                            logvar, log_scale.value_or(at::Tensor()), zi_logits.value_or(at::Tensor())});
    ctx->saved_data["likelihood"] = std::string(likelihood);
    ctx->saved_data["logits"] = logits;
    ctx->saved_data["log_scale_value"] = log_scale_value;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["per_sample"] = reduction == "none";
    int64_t mask = 0;
    for (size_t i = 0; i < grad_mask.size(); ++i) mask |= static_cast<int64_t>(grad_mask[i]) << i;
    ctx->saved_data["grad_mask"] = mask;
    if (log_scale.has_value()) {
      ctx->saved_data["log_scale_shape"] = log_scale->sizes().vec();
      ctx->saved_data["log_scale_dtype"] = log_scale->scalar_type();
    }
    ctx->mark_non_differentiable({grad_recon, grad_x, grad_mu, grad_logvar, grad_log_scale, grad_zi_logits});
    // Nothing flows back into the gradient outputs: don't allocate zero gradients for them.
    ctx->set_materialize_grads(false);
    return {loss, grad_recon, grad_x, grad_mu, grad_logvar, grad_log_scale, grad_zi_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list result(12);
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return result;  // the loss took no part in what is differentiated
    const bool traced = is_traced(grad_loss);
    TORCH_CHECK(traced || !at::GradMode::is_enabled(),
                "vae_fast.vae_loss supports first-order gradients only (backward with create_graph=True would give "
                "wrong second derivatives); use vae_fast.reference.vae_loss for those");
    const bool per_sample = ctx->saved_data["per_sample"].toBool();
    const int64_t mask = ctx->saved_data["grad_mask"].toInt();
    // saved[i], i < 6, is the gradient of input i for the tensor inputs recon, x, mu, logvar,
    // log_scale, zi_logits (schema positions 0-5); saved[6 + i] is input i itself.
    const variable_list saved = ctx->get_saved_variables();
    const bool has_log_scale = ctx->saved_data.find("log_scale_shape") != ctx->saved_data.end();
    const bool has_zi_logits = saved[11].defined();
    const bool by_kernel = !per_sample && !traced;
    const variable_list grads =
        by_kernel ? scaled_gradients(ctx, saved, grad_loss) : variable_list(saved.begin(), saved.begin() + 6);
    for (size_t i = 0; i < grads.size(); ++i) {
      // The node has an input edge only for each tensor given: without a log_scale, zi_logits's is
      // the fifth edge, and a tensor not given has none to ask about.
      if ((i == 4 && !has_log_scale) || (i == 5 && !has_zi_logits)) continue;
      const size_t edge = i == 5 && !has_log_scale ? 4 : i;
      if (!ctx->needs_input_grad(edge)) continue;
      TORCH_CHECK((mask >> i) & 1, "vae_fast::vae_loss was called with grad_mask[", i,
                  "]=False for an input that requires grad; call vae_fast.vae_loss, which sets the mask");
      const at::Tensor& grad = grads[i];
      if (by_kernel) {
        result[i] = grad;
      } else if (per_sample) {
        std::vector<int64_t> shape(grad.dim(), 1);
        shape[0] = -1;
        at::Tensor weighted = grad * grad_loss.reshape(shape);
        if (i == 4) {
          // Each element's derivative, weighed by its sample's grad_output, summed to log_scale's shape.
          weighted = weighted.sum_to_size(ctx->saved_data["log_scale_shape"].toIntVector())
                         .to(ctx->saved_data["log_scale_dtype"].toScalarType());
          result[i] = weighted;
        } else {
          result[i] = weighted.to(grad.scalar_type());
        }
      } else {
        result[i] = (grad * grad_loss).to(grad.scalar_type());  // traced: the compiler fuses this multiply
      }
    }
    return result;
  }

 private:
  // The gradients of the reduced loss times grad_output. The first backward hands out the saved
  // gradients themselves: with grad_output 1 (the usual `loss.backward()`) untouched, decided on
  // the device on CUDA (no host sync), so the common path costs one call and no pass over the data.
  // Otherwise they are rewritten in place before they leave, in one of two ways:
  // - float16/bfloat16: computed again by the loss kernel with grad_output in its scale, so the
  //   factor applies in float before the one rounding to the dtype. The stored gradient times the
  //   factor would be inf where it passed 65504 (float16's p = 1e-5 gives -99865; times 1/4 for
  //   gradient accumulation, finite), would have lost the digits of a float16 subnormal that a
  //   loss scale brings back, and is rounded twice (up to a unit of bfloat16's 8 bits).
  // - float32/float64: the stored gradient times the factor, in place: one read and write of each,
  //   where computing again costs a forward pass (1.6-1.8x the loss's forward+backward on a CPU),
  //   and what torch's own backward of `loss * c` computes, within the dtype's range.
  // A gradient that has left the node belongs to the caller (a hook may keep it, AccumulateGrad
  // may make it .grad and add into it), so every later backward through the graph
  // (retain_graph=True) computes new tensors from the saved inputs with its own grad_output:
  // nothing handed out ever changes, and nothing the caller does changes a later backward.
  static variable_list scaled_gradients(AutogradContext* ctx, const variable_list& saved, const at::Tensor& grad_loss) {
    const int64_t mask = ctx->saved_data["grad_mask"].toInt();
    LossGradMask grad_mask{};
    for (size_t i = 0; i < grad_mask.size(); ++i) grad_mask[i] = (mask >> i) & 1;
    const bool first = ctx->saved_data.find("handed_out") == ctx->saved_data.end();
    ctx->saved_data["handed_out"] = true;
    variable_list grads(saved.begin(), saved.begin() + 6);
    at::AutoDispatchBelowADInplaceOrView guard;  // no version bumps: see the ADInplaceOrView kernels
    const bool half = at::isReducedFloatingType(saved[6].scalar_type());
    if (first && !half) {
      std::vector<at::Tensor> wanted;  // one call for every gradient (one launch on CUDA)
      for (size_t i = 0; i < grads.size(); ++i) {
        if (grad_mask[i]) wanted.push_back(grads[i]);
      }
      scale_by_grad_output_handle().call(wanted, grad_loss);
      return grads;
    }
    if (!first) {
      for (size_t i = 0; i < grads.size(); ++i) {
        if (grad_mask[i]) grads[i] = empty_like_contiguous(grads[i]);
      }
    }
    const auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    vae_loss_grads_handle().call(saved[6], saved[7], saved[8], saved[9], optional(saved[10]), optional(saved[11]),
                                 ctx->saved_data["likelihood"].toStringRef(), ctx->saved_data["logits"].toBool(),
                                 ctx->saved_data["log_scale_value"].toDouble(), ctx->saved_data["beta"].toDouble(),
                                 ctx->saved_data["reduction"].toStringRef(), grad_mask, grad_loss,
                                 /*keep_if_one=*/first, grads);
    return grads;
  }
};

at::Tensor reparameterize_autograd(const at::Tensor& mu, const at::Tensor& logvar, std::optional<at::Generator> generator) {
  if (!at::GradMode::is_enabled() || !(mu.requires_grad() || logvar.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to differentiate: no node, no noise state
    return reparameterize_op(mu, logvar, std::move(generator));
  }
  return Reparameterize::apply(mu, logvar, std::move(generator));
}

LossResult vae_loss_autograd(const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
                             const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& zi_logits,
                             c10::string_view likelihood, bool logits, double log_scale_value, double beta,
                             c10::string_view reduction, LossGradMask grad_mask) {
  const variable_list out = VaeLoss::apply(recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits,
                                           log_scale_value, beta, reduction, grad_mask);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_fast, ADInplaceOrView, m) {
  m.impl("scale_by_grad_output_", &scale_by_grad_output_ad_inplace_or_view);
  m.impl("vae_loss_grads_", &vae_loss_grads_ad_inplace_or_view);
}

TORCH_LIBRARY_IMPL(vae_fast, Autograd, m) {
  m.impl("reparameterize", &reparameterize_autograd);
  m.impl("vae_loss", &vae_loss_autograd);
}

}  // namespace vae_fast
