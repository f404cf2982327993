// A transfer: tiles moved from one endpoint to another, and the host-side
// planning shared by the CPU path and the copy-engine (DMA) path.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dynkv/geometry.h"

namespace dynkv {

enum class Backend : int { Auto = 0, Kernel = 1, DmaBatch = 2, DmaLoop = 3 };

struct ExecConfig {
  Backend backend = Backend::Auto;
  int num_ctas = 0;     // 0: the default for the direction
  int threads = 0;      // CUDA: threads per CTA; CPU: worker threads (0: default)
  uint64_t stream = 0;  // cudaStream_t as an integer (0: legacy default stream)
  // Auto picks DMA when the average contiguous run is at least this long.
  int64_t dma_min_run = 0;
  // Kernel path: split a transfer into launches of about this many bytes
  // (0: one launch). Short launches let a GEMM launched meanwhile get its
  // SMs back within one launch instead of waiting for the whole transfer.
  int64_t launch_bytes = 0;
  // Kernel path: dynamic shared memory reserved by each CTA (never used), so
  // no other kernel's CTA fits beside a copy CTA on its SM and the forward's
  // kernels are placed on the other SMs instead of sharing one with a copy
  // that stalls on PCIe (0: none).
  int64_t smem_bytes = 0;
};

// One contiguous copy.
struct Run {
  uint64_t src;
  uint64_t dst;
  int64_t bytes;
};

// `depth` layers of `rows` runs of `bytes` each: rows `src_pitch` / `dst_pitch` bytes apart, layers
// `src_layer` / `dst_layer` bytes apart (whole multiples of the row pitches). One pitched (3D) copy.
struct PitchedRun {
  uint64_t src;
  uint64_t dst;
  int64_t bytes;
  int64_t rows;
  int64_t src_pitch;
  int64_t dst_pitch;
  int64_t depth = 1;
  int64_t src_layer = 0;
  int64_t dst_layer = 0;
};

inline std::vector<Run> row_runs(const std::vector<PitchedRun>& pitched) {
  std::vector<Run> runs;
  for (const PitchedRun& p : pitched) {
    for (int64_t d = 0; d < p.depth; ++d) {
      for (int64_t r = 0; r < p.rows; ++r) {
        runs.push_back(Run{p.src + static_cast<uint64_t>(d * p.src_layer + r * p.src_pitch),
                           p.dst + static_cast<uint64_t>(d * p.dst_layer + r * p.dst_pitch), p.bytes});
      }
    }
  }
  return runs;
}

inline int64_t endpoint_run_bytes(const ViewEndpoint& e) { return e.view.run_bytes(); }
inline int64_t endpoint_run_bytes(const PageEndpoint& e) { return e.geom.tile_bytes(); }

template <class Src, class Dst>
struct Transfer {
  Src src;
  Dst dst;
  TileSpace space;
  int64_t tile_bytes;
  int align;  // largest of 16/8/4/2/1 dividing every address, stride and run

  // Runs are contiguous on both sides; the finer side decides their length.
  int64_t run_bytes() const { return std::min(endpoint_run_bytes(src), endpoint_run_bytes(dst)); }
  int64_t total_bytes() const { return space.num_tiles() * tile_bytes; }
};

// Every contiguous run of a transfer, with adjacent runs of one entry merged
// (never across entries: the host pool pins memory in chunks that hold whole
// pages, and a copy-engine run must not straddle two registrations).
template <class Src, class Dst>
std::vector<Run> plan_runs(const Transfer<Src, Dst>& t) {
  std::vector<Run> runs;
  const int64_t rb = t.run_bytes();
  const int64_t per_tile = t.tile_bytes / rb;
  runs.reserve(static_cast<size_t>(t.space.num_tiles() * (per_tile > 1 ? per_tile : 1)));
  int64_t prev_entry = -1;
  for (int64_t e = 0; e < t.space.count; ++e) {
    for (int64_t h = 0; h < t.space.num_heads; ++h) {
      for (int64_t l = 0; l < t.space.num_layers; ++l) {
        const uint64_t sb = t.src.tile(e, h, l);
        const uint64_t db = t.dst.tile(e, h, l);
        for (int64_t r = 0; r < per_tile; ++r) {
          const int64_t o = r * rb;
          const uint64_t s = t.src.addr(sb, o);
          const uint64_t d = t.dst.addr(db, o);
          if (prev_entry == e && !runs.empty()) {
            Run& last = runs.back();
            if (last.src + static_cast<uint64_t>(last.bytes) == s &&
                last.dst + static_cast<uint64_t>(last.bytes) == d) {
              last.bytes += rb;
              continue;
            }
          }
          runs.push_back(Run{s, d, rb});
          prev_entry = e;
        }
      }
    }
  }
  return runs;
}

// CPU path (ops_cpu.cpp).
void run_cpu(const std::vector<Run>& runs, int threads);

// CUDA path (ops_cuda.cu, or stubs that raise when CUDA was not compiled in).
bool cuda_compiled();
template <class Src, class Dst>
void launch_kernel(const Transfer<Src, Dst>& t, const ExecConfig& cfg);
void memcpy_runs_cuda(const std::vector<Run>& runs, const ExecConfig& cfg);
// One copy-engine operation per pitched run (batched where the runtime has cudaMemcpy3DBatchAsync).
void memcpy_pitched_cuda(const std::vector<PitchedRun>& runs, const ExecConfig& cfg);

}  // namespace dynkv
