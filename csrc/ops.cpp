// The schemas of vae_fast's custom ops. Kernels register per device in csrc/cpu/ and csrc/cuda/;
// autograd and fake (meta) kernels are registered from Python in vae_fast/ops.py.
// CPython's limited API only (setup.py tags the wheel cp310-abi3); torch's build may define it too.
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(vae_fast::cpu::isa_name(vae_fast::cpu::cpu_isa()));
}

PyObject* cuda_compiled(PyObject*, PyObject*) {
#ifdef VAE_FAST_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set the CPU kernels use: 'avx512', 'avx2' or 'generic'."},
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "Whether this build contains the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// `import vae_fast._C` loads this library, which runs the TORCH_LIBRARY blocks below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vae_fast, m) {
  m.def("reparameterize(Tensor mu, Tensor logvar, Generator? generator=None) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  // What autograd calls instead: also returns the noise state, int64 [seed, offset] on mu's device
  // (written by the kernel on CUDA, so a captured graph's replays record their own), from which the
  // two ops below draw the same eps again: the backward needs no stored eps and no stored z.
  m.def("reparameterize_sample(Tensor mu, Tensor logvar, Generator? generator=None) -> (Tensor, Tensor)",
        {at::Tag::nondeterministic_seeded});
  // grad_logvar = 0.5 * grad_z * exp(0.5 * logvar) * eps (grad_mu is grad_z itself).
  m.def("reparameterize_backward(Tensor grad_z, Tensor logvar, Tensor noise_state) -> Tensor");
  // eps itself, in logvar's shape and dtype (for a differentiable double backward).
  m.def("reparameterize_noise(Tensor logvar, Tensor noise_state) -> Tensor");
  // Returns (loss, grad_recon, grad_x, grad_mu, grad_logvar, grad_log_scale, grad_zi_logits); a
  // gradient is an empty tensor unless its grad_mask entry is set. Gradients are of the reduced loss
  // (before scaling by grad_output); for reduction "none", grad_log_scale holds each element's own
  // derivative instead, [batch, *per-sample] in the loss dtype, which the backward weighs by sample
  // and reduces.
  // likelihood "bernoulli" (recon: probabilities, or logits when `logits`), "gaussian" or "laplace"
  // (recon: mean / location; log_scale: the scale's log, a tensor, or log_scale_value when None),
  // "poisson", "nb" or "zinb" (recon: log of the mean; nb/zinb: log_scale carries log_theta, the log
  // inverse dispersion, or log_scale_value when None; zinb: zi_logits, recon's shape, the logits of
  // the zero-inflation probability; None for every other likelihood).
  m.def("vae_loss(Tensor recon, Tensor x, Tensor mu, Tensor logvar, Tensor? log_scale, Tensor? zi_logits, "
        "str likelihood, bool logits, float log_scale_value, float beta, str reduction, bool[6] grad_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad *= grad_output (one element) for every grad of the list, in place, in one call (one launch
  // on CUDA), skipped when grad_output is 1: the first backward of vae_loss with reduction
  // "sum"/"mean" for float32/float64 inputs, without a host sync on CUDA. Its ADInplaceOrView kernel
  // (csrc/autograd.cpp) bumps each grad's version on every device, so autograd sees the mutation.
  m.def("scale_by_grad_output_(Tensor(a!)[] grads, Tensor grad_output) -> ()");
  // The gradients of vae_loss's reduced loss ("sum" or "mean") times grad_output (one element),
  // computed again from the inputs into `grads` (the six gradient outputs of vae_loss, in place), so
  // that the factor applies in float before rounding to the gradient's dtype. With keep_if_one and
  // grad_output 1 (the usual `loss.backward()`), grads are left as they are, decided on the device
  // on CUDA (no host sync). Its ADInplaceOrView kernel (csrc/autograd.cpp) bumps each grad's
  // version, so autograd sees the mutation.
  m.def("vae_loss_grads_(Tensor recon, Tensor x, Tensor mu, Tensor logvar, Tensor? log_scale, Tensor? zi_logits, "
        "str likelihood, bool logits, float log_scale_value, float beta, str reduction, bool[6] grad_mask, "
        "Tensor grad_output, bool keep_if_one, Tensor(a!)[] grads) -> ()");
}
