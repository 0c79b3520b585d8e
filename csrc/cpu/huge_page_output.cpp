// Large CPU outputs in memory backed by transparent huge pages.
//
// Why: an op's gradient is a fresh tensor every step (a training step sets .grad to None), and
// glibc maps any block over 32 MiB afresh from the kernel and unmaps it when freed. Every 4 KiB
// page of it then costs a page fault and a zeroing on first touch: at B = 65536, D = 784 (a 205 MB
// gradient) the Gaussian loss's fwd+bwd took 88 ms on the 2-core Zen 4, about three quarters of it
// in the kernel's fault path, against 22 ms with the memory reused. With MADV_HUGEPAGE a fault maps
// 2 MiB at a time (512x fewer faults); the memory still goes back to the system when the tensor
// dies, as with glibc. VAE_FAST_HUGE_PAGES=0 turns this off (plain at::empty).
#include "../output_alloc.h"

#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vae_fast {
namespace {

#if defined(__linux__)
constexpr size_t kHugePage = size_t{2} << 20;

bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("VAE_FAST_HUGE_PAGES");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

struct Mapping {
  void* base;
  size_t length;
};

void unmap(void* context) {
  auto* mapping = static_cast<Mapping*>(context);
  munmap(mapping->base, mapping->length);
  delete mapping;
}
#endif

}  // namespace

at::Tensor empty_huge_page_cpu(at::IntArrayRef sizes, const at::TensorOptions& options, size_t bytes) {
  const auto contiguous = options.memory_format(at::MemoryFormat::Contiguous);
#if defined(__linux__)
  if (!huge_pages_enabled()) return at::empty(sizes, contiguous);
  // One huge page more than needed, so that the data can start on a 2 MiB boundary.
  const size_t length = bytes + kHugePage;
  void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return at::empty(sizes, contiguous);  // let torch's allocator report it
  madvise(base, length, MADV_HUGEPAGE);  // where THP is off this fails, and the mapping is glibc's anyway
  const auto address = reinterpret_cast<uintptr_t>(base);
  void* data = reinterpret_cast<void*>((address + kHugePage - 1) & ~(kHugePage - 1));
  c10::DataPtr data_ptr(data, new Mapping{base, length}, &unmap, at::Device(at::kCPU));
  // Resizable through torch's CPU allocator, as an at::empty tensor is (resize_ copies into new memory).
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data_ptr), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  return at::empty({0}, contiguous).set_(storage, 0, sizes);
#else
  return at::empty(sizes, contiguous);
#endif
}

}  // namespace vae_fast
