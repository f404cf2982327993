// Index math shared by the CPU path and the CUDA kernels.
//
// A vLLM KV cache is a logical [L, B, H, N, C] array (layers, blocks, this
// rank's KV heads, tokens per block, bytes per token of one head) in any
// physical stride order, with C contiguous. Some backends keep K and V apart
// (C split into `num_parts` parts `part_stride` bytes apart); every stride is
// carried explicitly, so all six stride orders and per-layer or cross-layer
// tensors are the same code.
//
// A page is the TP-agnostic copy of one block of the whole model: contiguous
// bytes laid out [H_total, L, N, C]. The unit of work is a tile: one (block,
// layer, head), N*C logical bytes, contiguous in the page. Inside a tile the
// logical offset o = n*C + p*(C/parts) + c maps to the device address
// base + n*token_stride + p*part_stride + c.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DYNKV_HD __host__ __device__ __forceinline__
#else
#define DYNKV_HD inline
#endif

namespace dynkv {

// Upper bound on layers per view; the table travels as a kernel parameter.
constexpr int kMaxLayers = 256;

// Page layout [H_total, L, N, C].
struct PageGeom {
  int64_t num_layers;
  int64_t num_heads;   // H_total: all KV heads of the model (1 for MLA)
  int64_t block_size;  // N: tokens per block
  int64_t token_bytes; // C: bytes of one token of one head (K and V together)
  int64_t elem_bytes;  // dtype size; every address and stride is a multiple

  DYNKV_HD int64_t tile_bytes() const { return block_size * token_bytes; }
  DYNKV_HD int64_t page_bytes() const { return num_heads * num_layers * tile_bytes(); }
  // Byte offset of tile (head, layer) inside a page.
  DYNKV_HD int64_t tile_offset(int64_t head, int64_t layer) const {
    return (head * num_layers + layer) * tile_bytes();
  }
};

// One rank's paged KV cache: logical [L, B, H_local, N, C] with byte strides.
struct BlockView {
  uint64_t layer_ptr[kMaxLayers];
  int64_t num_layers;
  int64_t num_blocks;
  int64_t num_heads;   // heads held by this rank
  int64_t head_start;  // global index of local head 0
  int64_t block_size;
  int64_t token_bytes;
  int64_t num_parts;   // 1: K and V packed in C (or MLA); 2: K and V apart
  int64_t block_stride;
  int64_t head_stride;
  int64_t token_stride;
  int64_t part_stride;

  DYNKV_HD int64_t part_bytes() const { return token_bytes / num_parts; }
  DYNKV_HD int64_t tile_bytes() const { return block_size * token_bytes; }
  // True when one tile's N*C bytes are one contiguous run on the device.
  DYNKV_HD bool tile_contiguous() const {
    return (num_parts == 1 || part_stride == part_bytes()) &&
           (block_size == 1 || token_stride == token_bytes);
  }
  // True when a token's C bytes are contiguous (parts adjacent).
  DYNKV_HD bool token_contiguous() const {
    return num_parts == 1 || part_stride == part_bytes();
  }
  // Longest run of bytes that is contiguous both in the tile's logical order
  // and on the device; runs start at multiples of this length.
  DYNKV_HD int64_t run_bytes() const {
    if (tile_contiguous()) return tile_bytes();
    if (token_contiguous()) return token_bytes;
    return part_bytes();
  }
  DYNKV_HD uint64_t tile_base(int64_t layer, int64_t block, int64_t head) const {
    return layer_ptr[layer] + static_cast<uint64_t>(block * block_stride + head * head_stride);
  }
  // Device byte offset, from the tile base, of logical tile offset `o`.
  DYNKV_HD int64_t offset_in_tile(int64_t o) const {
    if (tile_contiguous()) return o;
    const int64_t n = o / token_bytes;
    const int64_t in_token = o - n * token_bytes;
    if (token_contiguous()) return n * token_stride + in_token;
    const int64_t pb = part_bytes();
    const int64_t p = in_token / pb;
    return n * token_stride + p * part_stride + (in_token - p * pb);
  }
};

// A set of pages: num_pages pages, page_stride bytes apart (>= page bytes;
// padding lets the disk tier keep pages aligned).
struct PageSet {
  uint64_t base;
  int64_t num_pages;
  int64_t page_stride;
  // Pinned in registrations of `reg_pages` pages (0: one registration, or none), the first holding
  // `reg_pages - reg_phase` of these pages: no copy-engine operation may span two registrations.
  int64_t reg_pages = 0;
  int64_t reg_phase = 0;
  bool starts_registration(int64_t slot) const { return reg_pages > 0 && (slot + reg_phase) % reg_pages == 0; }
};

// The tile space of one transfer: `count` entries, each covering this rank's
// heads of every layer. Tile t decomposes as (entry, local head, layer), layer
// fastest, so consecutive tiles are adjacent in a page.
struct TileSpace {
  int64_t count;
  int64_t num_heads;
  int64_t num_layers;

  DYNKV_HD int64_t num_tiles() const { return count * num_heads * num_layers; }
  DYNKV_HD void decompose(int64_t t, int64_t& entry, int64_t& head, int64_t& layer) const {
    const int64_t per_entry = num_heads * num_layers;
    entry = t / per_entry;
    const int64_t rem = t - entry * per_entry;
    head = rem / num_layers;
    layer = rem - head * num_layers;
  }
};

// Endpoint: blocks of a BlockView selected by an id list.
struct ViewEndpoint {
  BlockView view;
  const int64_t* ids;

  DYNKV_HD uint64_t tile(int64_t entry, int64_t head, int64_t layer) const {
    return view.tile_base(layer, ids[entry], head);
  }
  DYNKV_HD uint64_t addr(uint64_t tile_base, int64_t o) const {
    return tile_base + static_cast<uint64_t>(view.offset_in_tile(o));
  }
  DYNKV_HD bool contiguous() const { return view.tile_contiguous(); }
  void set_ids(const int64_t* p) { ids = p; }
};

// Endpoint: pages of a PageSet selected by a slot list; `head_start` places
// this rank's local head 0 at its global head in the page.
struct PageEndpoint {
  PageSet pages;
  PageGeom geom;
  int64_t head_start;
  const int64_t* slots;

  DYNKV_HD uint64_t tile(int64_t entry, int64_t head, int64_t layer) const {
    return pages.base + static_cast<uint64_t>(slots[entry] * pages.page_stride +
                                              geom.tile_offset(head_start + head, layer));
  }
  DYNKV_HD uint64_t addr(uint64_t tile_base, int64_t o) const {
    return tile_base + static_cast<uint64_t>(o);
  }
  DYNKV_HD bool contiguous() const { return true; }
  void set_ids(const int64_t* p) { slots = p; }
};

}  // namespace dynkv
