// Autograd of vae_fast::reparameterize and vae_fast::vae_loss, in C++ for every device. At training
// batch sizes the Python autograd layer (torch.library.register_autograd) cost more than the
// kernels: ~0.1 ms per op and step at B=128 on a CPU, most of a step's possible saving.
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <c10/core/DispatchKey.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <vector>
#include <optional>
#include <tuple>

namespace vae_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LossGradMask = std::array<bool, 5>;

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
                       const std::optional<at::Tensor>& log_scale, c10::string_view likelihood, bool logits,
                       double log_scale_value, double beta, c10::string_view reduction, LossGradMask grad_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vae_fast::vae_loss", "")
          .typed<LossResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, c10::string_view, bool, double, double, c10::string_view,
                            LossGradMask)>();
  return op.call(recon, x, mu, logvar, log_scale, likelihood, logits, log_scale_value, beta, reduction, grad_mask);
}

const c10::TypedOperatorHandle<void(at::TensorList, const at::Tensor&)>& scale_by_grad_output_handle() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vae_fast::scale_by_grad_output_", "")
                             .typed<void(at::TensorList, const at::Tensor&)>();
  return op;
}

void scale_by_grad_output_op(at::TensorList grads, const at::Tensor& grad_output) {
  scale_by_grad_output_handle().call(grads, grad_output);
}

// The op's ADInplaceOrView kernel, for direct calls: autograd learns of an in-place change through
// the tensor's version counter, which ATen's own in-place ops bump here. The CUDA kernel writes
// through a raw pointer, so without this its changes would go unseen. (VaeLoss::backward calls the
// op below this kernel and keeps its own record; see there.)
void scale_by_grad_output_ad_inplace_or_view(c10::DispatchKeySet keys, at::TensorList grads, const at::Tensor& grad_output) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    scale_by_grad_output_handle().redispatch(keys & c10::after_ADInplaceOrView_keyset, grads, grad_output);
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

// The forward pass already computed every wanted gradient of the (reduced) loss; backward scales
// them by grad_output, in place and only when grad_output is not 1 (decided on the device on CUDA).
class VaeLoss : public torch::autograd::Function<VaeLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu,
                               const at::Tensor& logvar, const std::optional<at::Tensor>& log_scale,
                               c10::string_view likelihood, bool logits, double log_scale_value, double beta,
                               c10::string_view reduction, LossGradMask grad_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad_recon, grad_x, grad_mu, grad_logvar, grad_log_scale] =
        vae_loss_op(recon, x, mu, logvar, log_scale, likelihood, logits, log_scale_value, beta, reduction, grad_mask);
    ctx->save_for_backward({grad_recon, grad_x, grad_mu, grad_logvar, grad_log_scale});
    ctx->saved_data["per_sample"] = reduction == "none";
    int64_t mask = 0;
    for (size_t i = 0; i < grad_mask.size(); ++i) mask |= static_cast<int64_t>(grad_mask[i]) << i;
    ctx->saved_data["grad_mask"] = mask;
    if (log_scale.has_value()) {
      ctx->saved_data["log_scale_shape"] = log_scale->sizes().vec();
      ctx->saved_data["log_scale_dtype"] = log_scale->scalar_type();
    }
    ctx->mark_non_differentiable({grad_recon, grad_x, grad_mu, grad_logvar, grad_log_scale});
    // Nothing flows back into the gradient outputs: don't allocate zero gradients for them.
    ctx->set_materialize_grads(false);
    return {loss, grad_recon, grad_x, grad_mu, grad_logvar, grad_log_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list result(11);
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return result;  // the loss took no part in what is differentiated
    const bool traced = is_traced(grad_loss);
    TORCH_CHECK(traced || !at::GradMode::is_enabled(),
                "vae_fast.vae_loss supports first-order gradients only (backward with create_graph=True would give "
                "wrong second derivatives); use vae_fast.reference.vae_loss for those");
    const bool per_sample = ctx->saved_data["per_sample"].toBool();
    const int64_t mask = ctx->saved_data["grad_mask"].toInt();
    variable_list saved = ctx->get_saved_variables();
    std::vector<at::Tensor> scaled_in_place;
    // saved[i] is the gradient of input i for the tensor inputs recon, x, mu, logvar, log_scale
    // (schema positions 0-4).
    const bool has_log_scale = ctx->saved_data.find("log_scale_shape") != ctx->saved_data.end();
    for (size_t i = 0; i < saved.size(); ++i) {
      // Without a log_scale tensor the node has no fifth input edge to ask about.
      if ((i == 4 && !has_log_scale) || !ctx->needs_input_grad(i)) continue;
      TORCH_CHECK((mask >> i) & 1, "vae_fast::vae_loss was called with grad_mask[", i,
                  "]=False for an input that requires grad; call vae_fast.vae_loss, which sets the mask");
      at::Tensor& grad = saved[i];
      const bool is_log_scale = i == 4;
      if (per_sample) {
        std::vector<int64_t> shape(grad.dim(), 1);
        shape[0] = -1;
        at::Tensor weighted = grad * grad_loss.reshape(shape);
        if (is_log_scale) {
          // Each element's derivative, weighed by its sample's grad_output, summed to log_scale's shape.
          weighted = weighted.sum_to_size(ctx->saved_data["log_scale_shape"].toIntVector())
                         .to(ctx->saved_data["log_scale_dtype"].toScalarType());
          result[i] = weighted;
        } else {
          result[i] = weighted.to(grad.scalar_type());
        }
      } else if (traced) {
        result[i] = (grad * grad_loss).to(grad.scalar_type());  // the compiler fuses this multiply
      } else {
        scaled_in_place.push_back(grad);
        result[i] = grad;
      }
    }
    if (!scaled_in_place.empty()) scale_saved_gradients(ctx, scaled_in_place, grad_loss);
    return result;
  }

 private:
  // Scales the saved gradients in place (no copy, and no pass at all when grad_output is 1, which
  // CUDA decides on the device). A later backward through the same graph (retain_graph=True) would
  // then read scaled values: it is refused, on every device alike, unless every earlier backward
  // had grad_output 1 and so changed nothing. Autograd's version counter cannot make that call
  // without a host sync in every backward (CUDA's kernel decides on the device), so this node
  // keeps the last factor and reads it back only in a repeated backward, which is rare.
  static void scale_saved_gradients(AutogradContext* ctx, const std::vector<at::Tensor>& grads, const at::Tensor& grad_loss) {
    const auto earlier = ctx->saved_data.find("scaled_by");
    if (earlier != ctx->saved_data.end()) {
      const double factor = earlier->second.toTensor().item<double>();
      TORCH_CHECK(factor == 1.0,
                  "vae_fast.vae_loss: a second backward through this loss is not supported after a backward whose "
                  "grad_output was ", factor, " (not 1): the gradients it saved were scaled in place by that "
                  "backward. Compute the loss again for another backward, or backward once through the sum of "
                  "the scaled losses.");
    }
    // One call for every gradient (one launch on CUDA): at small batches calls cost more than bytes.
    {
      at::AutoDispatchBelowADInplaceOrView guard;  // the record above replaces the version bump
      scale_by_grad_output_op(grads, grad_loss);
    }
    ctx->saved_data["scaled_by"] = grad_loss;
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
                             const std::optional<at::Tensor>& log_scale, c10::string_view likelihood, bool logits,
                             double log_scale_value, double beta, c10::string_view reduction, LossGradMask grad_mask) {
  const variable_list out =
      VaeLoss::apply(recon, x, mu, logvar, log_scale, likelihood, logits, log_scale_value, beta, reduction, grad_mask);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vae_fast, ADInplaceOrView, m) {
  m.impl("scale_by_grad_output_", &scale_by_grad_output_ad_inplace_or_view);
}

TORCH_LIBRARY_IMPL(vae_fast, Autograd, m) {
  m.impl("reparameterize", &reparameterize_autograd);
  m.impl("vae_loss", &vae_loss_autograd);
}

}  // namespace vae_fast
