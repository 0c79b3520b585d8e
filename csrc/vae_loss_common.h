// Argument checks and shape logic of vae_fast::vae_loss shared by the CPU and CUDA hosts.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include "likelihood.h"
#include "output_alloc.h"

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace vae_fast {

enum class Reduction { none, mean, sum };

inline Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "sum") return Reduction::sum;
  if (reduction == "mean") return Reduction::mean;
  if (reduction == "none") return Reduction::none;
  TORCH_CHECK_VALUE(false, "vae_loss: reduction must be 'sum', 'mean' or 'none', got '",
                    std::string(reduction), "'");
}

inline math::Likelihood parse_likelihood(c10::string_view likelihood) {
  if (likelihood == "bernoulli") return math::Likelihood::bernoulli;
  if (likelihood == "gaussian") return math::Likelihood::gaussian;
  if (likelihood == "laplace") return math::Likelihood::laplace;
  if (likelihood == "poisson") return math::Likelihood::poisson;
  if (likelihood == "nb") return math::Likelihood::nb;
  if (likelihood == "zinb") return math::Likelihood::zinb;
  TORCH_CHECK_VALUE(false, "vae_loss: likelihood must be 'bernoulli', 'gaussian', 'laplace', 'poisson', 'nb' or 'zinb', got '",
                    std::string(likelihood), "'");
}

inline const char* likelihood_name(math::Likelihood likelihood) {
  switch (likelihood) {
    case math::Likelihood::bernoulli: return "bernoulli";
    case math::Likelihood::gaussian: return "gaussian";
    case math::Likelihood::laplace: return "laplace";
    case math::Likelihood::poisson: return "poisson";
    case math::Likelihood::nb: return "nb";
    case math::Likelihood::zinb: return "zinb";
  }
  return "?";
}

struct LossShape {
  int64_t batch;
  int64_t features;
  int64_t latents;
};

inline int64_t per_sample_numel(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().slice(1));
}

inline LossShape check_vae_loss_inputs(const at::Tensor& recon, const at::Tensor& x,
                                       const at::Tensor& mu, const at::Tensor& logvar, double beta) {
  TORCH_CHECK_VALUE(recon.dim() >= 1, "vae_loss: recon must have a batch dimension, got a 0-d tensor");
  const int64_t batch = recon.size(0);
  TORCH_CHECK_TYPE(at::isFloatingType(recon.scalar_type()), "vae_loss: recon must be a floating tensor, got ",
                   recon.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"mu", mu}, {"logvar", logvar}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == recon.scalar_type(), "vae_loss: ", name, " has dtype ", t.scalar_type(),
                     " but recon has ", recon.scalar_type(), "; all inputs of the op must share one dtype");
    TORCH_CHECK_VALUE(t.device() == recon.device(), "vae_loss: ", name, " is on ", t.device(),
                      " but recon is on ", recon.device());
    TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == batch, "vae_loss: ", name, " must have batch size ", batch,
                      " (recon.size(0)), got shape ", t.sizes());
  }
  TORCH_CHECK_VALUE(mu.sizes() == logvar.sizes(), "vae_loss: mu and logvar must have the same shape, got ",
                    mu.sizes(), " and ", logvar.sizes());
  const int64_t features = per_sample_numel(recon);
  const int64_t x_features = per_sample_numel(x);
  TORCH_CHECK_VALUE(features == x_features, "vae_loss: recon has ", features, " elements per sample but x has ",
                    x_features, " (shapes ", recon.sizes(), " and ", x.sizes(), ")");
  TORCH_CHECK_VALUE(beta >= 0.0, "vae_loss: beta must be a non-negative number, got ", beta);
  const int64_t latents = per_sample_numel(mu);
  return {batch, features, latents};
}

// How a log_scale tensor of at most recon's rank maps onto recon (mirrors
// vae_fast.functional.log_scale_kind): one value (any all-ones shape), recon's per-sample shape
// (leading 1s allowed), or recon's shape.
inline math::ScaleLayout check_log_scale(const at::Tensor& log_scale, const at::Tensor& recon) {
  TORCH_CHECK_TYPE(log_scale.scalar_type() == recon.scalar_type(), "vae_loss: log_scale has dtype ",
                   log_scale.scalar_type(), " but recon has ", recon.scalar_type(), "; all inputs of the op must share one dtype");
  TORCH_CHECK_VALUE(log_scale.device() == recon.device(), "vae_loss: log_scale is on ", log_scale.device(),
                    " but recon is on ", recon.device());
  const auto shape = log_scale.sizes();
  // More dimensions would broadcast the per-sample loss to another shape (and its "none" backward
  // could not sum the gradient back), so it is none of the layouts.
  TORCH_CHECK_VALUE(log_scale.dim() <= recon.dim(), "vae_loss: log_scale has shape ", shape,
                    ", more dimensions than recon's ", recon.sizes(), "; drop its extra leading 1s");
  const bool all_ones = std::all_of(shape.begin(), shape.end(), [](int64_t size) { return size == 1; });
  if (all_ones) return math::ScaleLayout::uniform;
  auto stripped = shape;
  const auto per_sample = recon.sizes().slice(1);
  while (stripped.size() > per_sample.size() && stripped.front() == 1) stripped = stripped.slice(1);
  if (stripped == per_sample) return math::ScaleLayout::per_feature;
  if (shape == recon.sizes()) return math::ScaleLayout::per_element;
  TORCH_CHECK_VALUE(false, "vae_loss: log_scale has shape ", shape, ", which is none of: one shared value (shape []), "
                    "one per feature (recon's per-sample shape ", per_sample, "), or one per element (recon's shape ",
                    recon.sizes(), ")");
}

// zi_logits: given for the zinb likelihood only, and then of recon's shape, dtype and device.
inline void check_zi_logits(const std::optional<at::Tensor>& zi_logits, math::Likelihood likelihood,
                            const at::Tensor& recon) {
  const bool zinb = likelihood == math::Likelihood::zinb;
  TORCH_CHECK_VALUE(zinb == zi_logits.has_value(), zinb ? "vae_loss: the 'zinb' likelihood needs zi_logits, got None"
                                                        : "vae_loss: zi_logits applies to the 'zinb' likelihood only; it must be None");
  if (!zinb) return;
  TORCH_CHECK_TYPE(zi_logits->scalar_type() == recon.scalar_type(), "vae_loss: zi_logits has dtype ",
                   zi_logits->scalar_type(), " but recon has ", recon.scalar_type(), "; all inputs of the op must share one dtype");
  TORCH_CHECK_VALUE(zi_logits->device() == recon.device(), "vae_loss: zi_logits is on ", zi_logits->device(),
                    " but recon is on ", recon.device());
  TORCH_CHECK_VALUE(zi_logits->sizes() == recon.sizes(), "vae_loss: zi_logits must have recon's shape ", recon.sizes(),
                    ", got ", zi_logits->sizes());
}

// Losses of half-precision inputs come back in float32: a summed loss overflows float16 easily.
inline at::ScalarType loss_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// Empty placeholder for a gradient that was not asked for (the op always returns six tensors).
inline at::Tensor maybe_grad_like(const at::Tensor& t, bool wanted) {
  return wanted ? empty_like_contiguous(t) : at::empty({0}, t.options());
}

// What every device's host function starts from: checked arguments, contiguous inputs, and the
// gradient outputs allocated (or empty placeholders).
struct LossCall {
  Reduction reduction;
  math::Likelihood likelihood;
  math::ScaleLayout scale_layout;
  LossShape shape;
  double grad_scale;  // 1, or 1/batch for "mean": the kernels write gradients of the reduced loss
  at::Tensor recon, x, mu, logvar;
  at::Tensor log_scale;  // undefined: the fixed value
  at::Tensor zi_logits;  // zinb only (undefined otherwise), recon's shape
  at::Tensor grad_recon, grad_x, grad_mu, grad_logvar, grad_zi_logits;
  // In log_scale's shape; for reduction "none", each element's derivative instead (see
  // LossProblem::grad_log_scale in csrc/cpu/kernels.h), [batch, *per-sample shape] in the loss dtype.
  at::Tensor grad_log_scale;
  bool grad_log_scale_per_element = false;

  template <typename T = void>
  T* grad_ptr(const at::Tensor& grad, bool wanted) const {
    return wanted ? static_cast<T*>(grad.mutable_data_ptr()) : nullptr;
  }
};

// The checked, contiguous inputs of a call; its gradient tensors are left for the caller to set.
inline LossCall prepare_loss_inputs(const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu,
                                    const at::Tensor& logvar, const std::optional<at::Tensor>& log_scale,
                                    const std::optional<at::Tensor>& zi_logits, c10::string_view likelihood,
                                    bool logits, double beta, c10::string_view reduction,
                                    const std::array<bool, 6>& grad_mask) {
  LossCall call;
  call.reduction = parse_reduction(reduction);
  call.likelihood = parse_likelihood(likelihood);
  call.shape = check_vae_loss_inputs(recon, x, mu, logvar, beta);
  const bool bernoulli = call.likelihood == math::Likelihood::bernoulli;
  TORCH_CHECK_VALUE(!(logits && !bernoulli), "vae_loss: logits=True applies to the Bernoulli likelihood only, got likelihood '",
                    std::string(likelihood), "'");
  TORCH_CHECK_VALUE(!(bernoulli && log_scale.has_value()), "vae_loss: the Bernoulli likelihood has no scale; log_scale must be None");
  TORCH_CHECK_VALUE(!(call.likelihood == math::Likelihood::poisson && log_scale.has_value()),
                    "vae_loss: the Poisson likelihood has no dispersion; log_scale (log_theta) must be None");
  TORCH_CHECK_VALUE(!(grad_mask[4] && !log_scale.has_value()), "vae_loss: grad_mask[4] asks for the gradient of a log_scale that was not given");
  check_zi_logits(zi_logits, call.likelihood, recon);
  TORCH_CHECK_VALUE(!(grad_mask[5] && !zi_logits.has_value()), "vae_loss: grad_mask[5] asks for the gradient of a zi_logits that was not given");
  call.scale_layout = log_scale.has_value() ? check_log_scale(*log_scale, recon) : math::ScaleLayout::uniform;
  call.grad_scale = (call.reduction == Reduction::mean && call.shape.batch > 0)
                        ? 1.0 / static_cast<double>(call.shape.batch)
                        : 1.0;
  call.recon = recon.contiguous();
  call.x = x.contiguous();
  call.mu = mu.contiguous();
  call.logvar = logvar.contiguous();
  if (log_scale.has_value()) call.log_scale = log_scale->contiguous();
  if (zi_logits.has_value()) call.zi_logits = zi_logits->contiguous();
  return call;
}

// vae_fast::vae_loss: the inputs, and its gradient outputs allocated (or empty placeholders).
inline LossCall prepare_loss_call(const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu,
                                  const at::Tensor& logvar, const std::optional<at::Tensor>& log_scale,
                                  const std::optional<at::Tensor>& zi_logits, c10::string_view likelihood, bool logits,
                                  double beta, c10::string_view reduction, const std::array<bool, 6>& grad_mask) {
  LossCall call = prepare_loss_inputs(recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits, beta, reduction,
                                      grad_mask);
  call.grad_recon = maybe_grad_like(recon, grad_mask[0]);
  call.grad_x = maybe_grad_like(x, grad_mask[1]);
  call.grad_mu = maybe_grad_like(mu, grad_mask[2]);
  call.grad_logvar = maybe_grad_like(logvar, grad_mask[3]);
  call.grad_zi_logits = zi_logits.has_value() ? maybe_grad_like(*zi_logits, grad_mask[5]) : at::empty({0}, recon.options());
  call.grad_log_scale_per_element = grad_mask[4] && call.reduction == Reduction::none;
  if (call.grad_log_scale_per_element) {
    call.grad_log_scale = empty_output(recon.sizes(), recon.options().dtype(loss_dtype(recon.scalar_type())));
  } else {
    call.grad_log_scale = log_scale.has_value() ? maybe_grad_like(*log_scale, grad_mask[4]) : at::empty({0}, recon.options());
  }
  return call;
}

// vae_fast::vae_loss_grads_ has one element of grad_output (the reduced loss's incoming gradient).
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& recon) {
  TORCH_CHECK_VALUE(grad_output.numel() == 1, "vae_loss_grads_: grad_output must have one element, got shape ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == recon.device(), "vae_loss_grads_: grad_output is on ", grad_output.device(),
                    " but recon is on ", recon.device());
}

// vae_fast::vae_loss_grads_: the inputs, with the given gradient tensors as the outputs; each wanted
// one must be what vae_fast::vae_loss returned for it (the input's shape and dtype, contiguous).
inline LossCall prepare_loss_grads_call(const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu,
                                        const at::Tensor& logvar, const std::optional<at::Tensor>& log_scale,
                                        const std::optional<at::Tensor>& zi_logits, c10::string_view likelihood,
                                        bool logits, double beta, c10::string_view reduction,
                                        const std::array<bool, 6>& grad_mask, at::TensorList grads) {
  LossCall call = prepare_loss_inputs(recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits, beta, reduction,
                                      grad_mask);
  TORCH_CHECK_VALUE(call.reduction != Reduction::none, "vae_loss_grads_: reduction must be 'sum' or 'mean', got 'none'");
  TORCH_CHECK_VALUE(grads.size() == 6,
                    "vae_loss_grads_: grads must hold 6 tensors (recon, x, mu, logvar, log_scale, zi_logits), got ",
                    grads.size());
  const std::array<const at::Tensor*, 6> inputs{&recon, &x, &mu, &logvar, &call.log_scale, &call.zi_logits};
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grad_mask[i]) continue;
    TORCH_CHECK_VALUE(grads[i].sizes() == inputs[i]->sizes() && grads[i].scalar_type() == recon.scalar_type() &&
                          grads[i].device() == recon.device() && grads[i].is_contiguous(),
                      "vae_loss_grads_: grads[", i, "] must be contiguous, of shape ", inputs[i]->sizes(), ", dtype ",
                      recon.scalar_type(), " and on ", recon.device(), "; got ", grads[i].sizes(), ", ",
                      grads[i].scalar_type(), ", ", grads[i].device());
  }
  call.grad_recon = grads[0];
  call.grad_x = grads[1];
  call.grad_mu = grads[2];
  call.grad_logvar = grads[3];
  call.grad_log_scale = grads[4];
  call.grad_zi_logits = grads[5];
  return call;
}

}  // namespace vae_fast
