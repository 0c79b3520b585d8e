// Small device helpers shared by the CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace vae_fast {
namespace cuda {

constexpr int kWarp = 32;

// N elements loaded or stored as one aligned memory transaction (16 bytes for float4-sized packs).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, N>*>(ptr);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(ptr) = pack;
}

// The same N elements read or written one by one, for pointers that are not pack-aligned: kernels
// keep the packed traversal (hence the packed order of their sums), so a misaligned view gives the
// bits of an aligned copy.
template <typename T, int N, bool kAligned>
__device__ __forceinline__ Pack<T, N> load_pack_any(const T* ptr) {
  if constexpr (kAligned) {
    return load_pack<T, N>(ptr);
  } else {
    Pack<T, N> pack;
#pragma unroll
    for (int k = 0; k < N; ++k) pack.v[k] = ptr[k];
    return pack;
  }
}

template <typename T, int N, bool kAligned>
__device__ __forceinline__ void store_pack_any(T* ptr, const Pack<T, N>& pack) {
  if constexpr (kAligned) {
    store_pack(ptr, pack);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) ptr[k] = pack.v[k];
  }
}

// Butterfly sum over a warp: a fixed order, so the same inputs give the same bits every run.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

inline bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace cuda
}  // namespace vae_fast
