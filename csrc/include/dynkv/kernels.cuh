// CUDA copy kernel: one warp per tile, grid-stride over tiles, V-byte vector
// accesses, U vectors per lane in flight before the first store. Pinned host
// pages are reached through UVA, so one kernel serves H2D, D2H and D2D.
#pragma once

#include <cstdint>

#include "dynkv/geometry.h"

namespace dynkv {

template <int V>
struct VecType;
template <>
struct VecType<16> { using type = uint4; };
template <>
struct VecType<8> { using type = uint2; };
template <>
struct VecType<4> { using type = unsigned int; };
template <>
struct VecType<2> { using type = unsigned short; };
template <>
struct VecType<1> { using type = unsigned char; };

// Streaming hints (evict-first) keep copies from flushing L2 under attention
// and GEMMs; the narrow fallbacks use plain accesses.
template <class T>
__device__ __forceinline__ T load_stream(uint64_t a) {
  if constexpr (sizeof(T) >= 4) {
    return __ldcs(reinterpret_cast<const T*>(a));
  } else {
    return *reinterpret_cast<const volatile T*>(a);
  }
}
template <class T>
__device__ __forceinline__ void store_stream(uint64_t a, T v) {
  if constexpr (sizeof(T) >= 4) {
    __stcs(reinterpret_cast<T*>(a), v);
  } else {
    *reinterpret_cast<T*>(a) = v;
  }
}

constexpr int kUnroll = 4;

template <int V, class Src, class Dst>
__global__ void __launch_bounds__(1024) copy_tiles_kernel(const Src src, const Dst dst,
                                                          const TileSpace space,
                                                          const int64_t tile_bytes,
                                                          const int64_t first_tile,
                                                          const int64_t end_tile) {
  using T = typename VecType<V>::type;
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_cta = blockDim.x >> 5;
  const int64_t stride = gridDim.x * warps_per_cta;
  const int64_t nvec = tile_bytes / V;
  const bool flat = src.contiguous() && dst.contiguous();
  for (int64_t t = first_tile + blockIdx.x * warps_per_cta + (threadIdx.x >> 5); t < end_tile; t += stride) {
    int64_t e, h, l;
    space.decompose(t, e, h, l);
    const uint64_t sb = src.tile(e, h, l);
    const uint64_t db = dst.tile(e, h, l);
    for (int64_t k0 = lane; k0 < nvec; k0 += 32 * kUnroll) {
      T r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k0 + u * 32;
        if (k < nvec) {
          const int64_t o = k * V;
          r[u] = load_stream<T>(flat ? sb + o : src.addr(sb, o));
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k0 + u * 32;
        if (k < nvec) {
          const int64_t o = k * V;
          store_stream<T>(flat ? db + o : dst.addr(db, o), r[u]);
        }
      }
    }
  }
}

}  // namespace dynkv
