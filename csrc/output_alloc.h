// Where the ops' outputs (gradients, samples) are allocated: at::empty, except large CPU outputs,
// which get memory that the kernel backs with 2 MiB pages (csrc/cpu/huge_page_output.cpp).
#pragma once

#include <ATen/ATen.h>

namespace vae_fast {

// A CPU tensor of `sizes` (contiguous) at least this large is mapped with huge pages. Below it,
// glibc serves the block from its heap, whose freed memory the next call reuses without faults.
constexpr size_t kHugePageOutputBytes = size_t{32} << 20;  // glibc's largest mmap threshold

// `bytes`: what `sizes` of options' dtype hold (the caller has it already).
at::Tensor empty_huge_page_cpu(at::IntArrayRef sizes, const at::TensorOptions& options, size_t bytes);

// A contiguous uninitialized output of `sizes` with `options`.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(options.dtype().toScalarType());
  if (options.device().is_cpu() && bytes >= kHugePageOutputBytes) return empty_huge_page_cpu(sizes, options, bytes);
  return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
}

// A contiguous output of t's shape and options (the kernels index outputs as flat arrays).
inline at::Tensor empty_like_contiguous(const at::Tensor& t) {
  return empty_output(t.sizes(), t.options());
}

}  // namespace vae_fast
