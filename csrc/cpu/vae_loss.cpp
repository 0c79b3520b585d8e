// vae_fast::vae_loss on CPU: checks, then one pass over the data that yields the loss and, when
// asked, every input gradient (csrc/cpu/kernels_impl.h); vae_fast::vae_loss_grads_, the same pass
// for the gradients times grad_output.
#include "../vae_loss_common.h"
#include "kernels.h"

#include <torch/library.h>

#include <vector>

namespace vae_fast {
namespace cpu {

namespace {

// The fused pass over a prepared call: each row's loss into row_loss, every wanted gradient of the
// reduced loss times grad_scale into the call's gradient tensors.
void run_loss_kernel(const LossCall& call, const std::array<bool, 6>& grad_mask, bool logits, double log_scale_value,
                     double beta, double grad_scale, std::vector<double>& row_loss) {
  const LossShape& shape = call.shape;
  row_loss.resize(shape.batch);
  LossProblem p;
  p.dtype = call.recon.scalar_type();
  p.recon = call.recon.const_data_ptr();
  p.target = call.x.const_data_ptr();
  p.mu = call.mu.const_data_ptr();
  p.logvar = call.logvar.const_data_ptr();
  p.grad_recon = call.grad_ptr(call.grad_recon, grad_mask[0]);
  p.grad_target = call.grad_ptr(call.grad_x, grad_mask[1]);
  p.grad_mu = call.grad_ptr(call.grad_mu, grad_mask[2]);
  p.grad_logvar = call.grad_ptr(call.grad_logvar, grad_mask[3]);
  p.batch = shape.batch;
  p.features = shape.features;
  p.latents = shape.latents;
  p.likelihood = call.likelihood;
  p.logits = logits;
  p.scale_layout = call.scale_layout;
  p.log_scale = call.log_scale.defined() ? call.log_scale.const_data_ptr() : nullptr;
  p.log_scale_value = log_scale_value;
  p.grad_log_scale = call.grad_ptr(call.grad_log_scale, grad_mask[4]);
  p.grad_log_scale_per_element = call.grad_log_scale_per_element;
  p.zi_logits = call.zi_logits.defined() ? call.zi_logits.const_data_ptr() : nullptr;
  p.grad_zi_logits = call.grad_ptr(call.grad_zi_logits, grad_mask[5]);
  p.beta = beta;
  p.grad_scale = grad_scale;
  p.row_loss = row_loss.data();
  p.check_recon_range = call.likelihood == math::Likelihood::bernoulli && !logits;

  const Isa isa = cpu_isa();
  const LossDomainErrors errors = isa == Isa::avx512 ? avx512::vae_loss(p)
                                  : isa == Isa::avx2 ? avx2::vae_loss(p)
                                                     : generic::vae_loss(p);
  // Only the Bernoulli blocks flag the first two, only the count blocks the third (the location-scale
  // likelihoods take any real x and recon).
  TORCH_CHECK_VALUE(!errors.recon_outside_unit,
                    "vae_loss: recon must hold probabilities in [0, 1] when logits=False, but some value is "
                    "outside; pass logits=True if recon holds logits");
  TORCH_CHECK_VALUE(!errors.target_outside_unit,
                    "vae_loss: x (the target) must lie in [0, 1] for a Bernoulli likelihood, but some value is outside");
  TORCH_CHECK_VALUE(!errors.target_not_count, "vae_loss: x (the target) must hold counts (finite and >= 0) for the '",
                    likelihood_name(call.likelihood), "' likelihood, but some value is negative, NaN or infinite");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_cpu(
    const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& zi_logits,
    c10::string_view likelihood, bool logits, double log_scale_value, double beta, c10::string_view reduction,
    std::array<bool, 6> grad_mask) {
  const LossCall call =
      prepare_loss_call(recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits, beta, reduction, grad_mask);
  std::vector<double> row_loss;
  run_loss_kernel(call, grad_mask, logits, log_scale_value, beta, call.grad_scale, row_loss);

  const Reduction red = call.reduction;
  const at::ScalarType out_dtype = loss_dtype(recon.scalar_type());
  at::Tensor loss;
  if (red == Reduction::none) {
    loss = at::empty({call.shape.batch}, recon.options().dtype(at::kDouble));
    std::copy(row_loss.begin(), row_loss.end(), loss.mutable_data_ptr<double>());
    loss = loss.to(out_dtype);
  } else {
    // Fixed left-to-right order: the same rows give the same bits on any thread count.
    double total = 0.0;
    for (double v : row_loss) total += v;
    if (red == Reduction::mean) total /= static_cast<double>(call.shape.batch);  // empty batch: NaN, as torch.mean
    loss = at::scalar_tensor(total, recon.options().dtype(out_dtype));
  }
  return {loss, call.grad_recon, call.grad_x, call.grad_mu, call.grad_logvar, call.grad_log_scale, call.grad_zi_logits};
}

// The same pass again with grad_scale times grad_output, into the given gradients (the loss is not
// kept). grad_output is read on the host, which on the CPU costs one scalar read: with keep_if_one
// and grad_output 1 (the usual `loss.backward()`) nothing else runs.
void vae_loss_grads_cpu(const at::Tensor& recon, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
                        const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& zi_logits,
                        c10::string_view likelihood, bool logits, double log_scale_value, double beta,
                        c10::string_view reduction, std::array<bool, 6> grad_mask, const at::Tensor& grad_output,
                        bool keep_if_one, at::TensorList grads) {
  check_grad_output(grad_output, recon);
  const double factor = grad_output.item<double>();
  if (keep_if_one && factor == 1.0) return;
  const LossCall call = prepare_loss_grads_call(recon, x, mu, logvar, log_scale, zi_logits, likelihood, logits, beta,
                                                reduction, grad_mask, grads);
  std::vector<double> row_loss;
  run_loss_kernel(call, grad_mask, logits, log_scale_value, beta, call.grad_scale * factor, row_loss);
}

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("vae_loss", &vae_loss_cpu);
  m.impl("vae_loss_grads_", &vae_loss_grads_cpu);
}

}  // namespace cpu
}  // namespace vae_fast
