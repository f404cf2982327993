// The public copy ops: validate at the boundary, plan, dispatch to the CPU
// path, the CUDA kernel or the copy engines. Raw pointers only.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <vector>

#include "dynkv/geometry.h"
#include "dynkv/transfer.h"

namespace dynkv {

// Block ids or page slots: the host copy is validated and planned from; the
// device copy (same values, already on the GPU) is what the kernel reads.
struct IdList {
  const int64_t* host = nullptr;
  const int64_t* device = nullptr;
  int64_t n = 0;
};

PageGeom make_geom(int64_t num_layers, int64_t num_heads, int64_t block_size, int64_t token_bytes,
                   int64_t elem_bytes);

BlockView make_view(const PageGeom& geom, const std::vector<uint64_t>& layer_ptrs, int64_t num_blocks,
                    int64_t num_heads, int64_t head_start, int64_t num_parts, int64_t block_stride,
                    int64_t head_stride, int64_t token_stride, int64_t part_stride);

PageSet make_pages(const PageGeom& geom, uint64_t base, int64_t num_pages, int64_t page_stride, int64_t reg_pages = 0,
                   int64_t reg_phase = 0);

// Layers [begin, end) of a gather or scatter; end < 0 means the last layer.
struct LayerRange {
  int64_t begin = 0;
  int64_t end = -1;
};

// gather: device blocks -> this rank's slice of pages.
void gather(const PageGeom& geom, const BlockView& view, const PageSet& pages, const IdList& block_ids,
            const IdList& slots, const ExecConfig& cfg, int device, LayerRange layers = {});
// scatter: this rank's slice of pages -> device blocks.
void scatter(const PageGeom& geom, const PageSet& pages, const BlockView& view, const IdList& slots,
             const IdList& block_ids, const ExecConfig& cfg, int device, LayerRange layers = {});
// scatter_groups: scatter in layer groups, one launch each and in order; on a GPU,
// events[i] (if given) is recorded on cfg.stream once group i is launched.
void scatter_groups(const PageGeom& geom, const PageSet& pages, const BlockView& view, const IdList& slots,
                    const IdList& block_ids, const ExecConfig& cfg, int device,
                    const std::vector<LayerRange>& groups, const std::vector<uint64_t>& events);
// copy_blocks: block to block between two views of the same geometry.
void copy_blocks(const PageGeom& geom, const BlockView& src, const BlockView& dst, const IdList& src_ids,
                 const IdList& dst_ids, const ExecConfig& cfg, int device);
// memcpy_batch: plain runs (copy engines on CUDA; the thread pool on CPU).
void memcpy_batch(const std::vector<Run>& runs, const ExecConfig& cfg, int device);

// The staged path: page slices cross PCIe on the copy engines as long runs into a ring of staging
// memory on the device, and an on-device kernel moves them between staging and the paged KV cache.
// The ring has `num_slots` slots of `chunk_pages` staging pages; chunk k of a call uses slot k %
// num_slots, so the copy engines fill one slot while the kernel drains another. A call in layer
// groups moves group by group; in a slot each page's group slice is packed ([H_local, g, N, C]), so
// a chunk is about as many bytes whatever the group, and each head's layers of a group cross as one
// run. On the CPU (device < 0) the same chunks run with memcpys, staging in host memory.
class StagingRing {
 public:
  // `pages`: num_slots * chunk_pages staging pages (device memory on a GPU); `dma_stream`: the copy
  // engines' stream (GPU only).
  StagingRing(const PageSet& pages, int64_t chunk_pages, int device, uint64_t dma_stream);
  ~StagingRing();
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;

  const PageSet& pages() const { return pages_; }
  int64_t chunk_pages() const { return chunk_pages_; }
  int64_t num_slots() const { return num_slots_; }
  int device() const { return device_; }
  uint64_t dma_stream() const { return dma_stream_; }
  uint64_t ready(int64_t slot) const { return ready_[static_cast<size_t>(slot)]; }
  uint64_t freed(int64_t slot) const { return freed_[static_cast<size_t>(slot)]; }

 private:
  PageSet pages_;
  int64_t chunk_pages_;
  int64_t num_slots_;
  int device_;
  uint64_t dma_stream_;
  std::vector<uint64_t> ready_;  // slot filled (loads: DMA landed; stores: the kernel wrote it)
  std::vector<uint64_t> freed_;  // slot drained (loads: the kernel read it; stores: DMA read it)
};

// Staged scatter: host pages `slots` -> this rank's heads of `block_ids`, in layer `groups` (none:
// every layer at once), in order; events[i] (if given: one per group) is recorded on cfg.stream once
// group i is in, and `after(i)` (if given) runs once group i is issued (GPU: its event recorded; CPU:
// copied), so that another thread can wait for a group's event before the whole load is queued.
// `stage` holds 0, 1, ..., n-1 (its device copy is what the kernel reads as a chunk's staging pages).
void staged_scatter(const PageGeom& geom, const PageSet& pages, const BlockView& view, const IdList& slots,
                    const IdList& block_ids, const IdList& stage, StagingRing& ring, const ExecConfig& cfg,
                    const std::vector<LayerRange>& groups, const std::vector<uint64_t>& events,
                    const std::function<void(size_t)>& after = {});
// The copy-engine operations of a staged scatter: (group, first slot, pages, rows) each, in issue order.
std::vector<std::array<int64_t, 4>> staged_copy_plan(const PageGeom& geom, const PageSet& pages, const BlockView& view,
                                                     const IdList& slots, const StagingRing& ring,
                                                     const std::vector<LayerRange>& groups);
// Staged gather: this rank's heads of `block_ids` -> host pages `slots`. Complete on cfg.stream.
void staged_gather(const PageGeom& geom, const BlockView& view, const PageSet& pages, const IdList& block_ids,
                   const IdList& slots, const IdList& stage, StagingRing& ring, const ExecConfig& cfg);

// Which path a transfer of this shape takes on the GPU (for reporting).
Backend resolve_backend(const ExecConfig& cfg, int64_t avg_run_bytes);

}  // namespace dynkv
