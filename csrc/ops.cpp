#include "dynkv/ops.h"

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "dynkv/check.h"
#include "dynkv/cuda.h"

namespace dynkv {

namespace {

// Largest of 16/8/4/2/1 that divides x (0 is divisible by all).
int pow2_align(uint64_t x) {
  for (int a : {16, 8, 4, 2}) {
    if (x % static_cast<uint64_t>(a) == 0) return a;
  }
  return 1;
}

int view_align(const BlockView& v) {
  int a = 16;
  for (int64_t l = 0; l < v.num_layers; ++l) a = std::min(a, pow2_align(v.layer_ptr[l]));
  for (int64_t s : {v.block_stride, v.head_stride, v.token_stride, v.part_stride, v.part_bytes()})
    a = std::min(a, pow2_align(static_cast<uint64_t>(s)));
  return a;
}

int pages_align(const PageGeom& g, const PageSet& p) {
  int a = pow2_align(p.base);
  for (int64_t s : {p.page_stride, g.tile_bytes(), g.token_bytes})
    a = std::min(a, pow2_align(static_cast<uint64_t>(s)));
  return a;
}

void check_multiple(int64_t value, int64_t elem, const char* what) {
  DYNKV_CHECK(value % elem == 0, what, "=", value, " is misaligned: expected a multiple of the dtype size ",
              elem, " bytes");
}

void check_ids(const IdList& ids, int64_t bound, const char* what, const char* bound_what, bool unique) {
  DYNKV_CHECK(ids.n >= 0 && (ids.n == 0 || ids.host != nullptr), what, ": missing host array");
  for (int64_t i = 0; i < ids.n; ++i) {
    const int64_t v = ids.host[i];
    DYNKV_CHECK(v >= 0 && v < bound, what, "[", i, "]=", v, " is out of range: expected [0, ", bound, ") (",
                bound_what, ")");
  }
  if (unique && ids.n > 1) {
    std::vector<int64_t> sorted(ids.host, ids.host + ids.n);
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    DYNKV_CHECK(dup == sorted.end(), what, " has ", *dup,
                " more than once: a destination may appear only once per call");
  }
}

void check_lengths(const IdList& a, const IdList& b, const char* an, const char* bn) {
  DYNKV_CHECK(a.n == b.n, "length mismatch: ", an, " has ", a.n, " entries but ", bn, " has ", b.n);
}

void check_view_matches(const PageGeom& g, const BlockView& v, const char* what) {
  DYNKV_CHECK(v.num_layers == g.num_layers && v.block_size == g.block_size && v.token_bytes == g.token_bytes,
              what, " does not match the page geometry: view has L=", v.num_layers, " N=", v.block_size,
              " C=", v.token_bytes, ", geometry has L=", g.num_layers, " N=", g.block_size, " C=", g.token_bytes);
  DYNKV_CHECK(v.head_start >= 0 && v.head_start + v.num_heads <= g.num_heads, what, " head range [",
              v.head_start, ", ", v.head_start + v.num_heads, ") lies outside the geometry's ", g.num_heads,
              " heads");
}

// A transfer narrowed to layers [r.begin, r.end): the view keeps those layers' pointers and the pages'
// base moves to the first one's tile. The page geometry keeps every layer, so a head's tiles stay
// num_layers tiles apart.
struct LayerSlice {
  BlockView view;
  PageSet pages;
};

LayerSlice select_layers(const PageGeom& g, const BlockView& v, const PageSet& p, LayerRange r) {
  check_view_matches(g, v, "view");
  const int64_t end = r.end < 0 ? v.num_layers : r.end;
  DYNKV_CHECK(r.begin >= 0 && r.begin < end && end <= v.num_layers, "layers [", r.begin, ", ", end,
              ") is not a range of the view's ", v.num_layers, " layers");
  LayerSlice s{v, p};
  if (r.begin == 0 && end == v.num_layers) return s;
  for (int64_t l = r.begin; l < end; ++l) s.view.layer_ptr[l - r.begin] = v.layer_ptr[l];
  s.view.num_layers = end - r.begin;
  s.pages.base += static_cast<uint64_t>(r.begin * g.tile_bytes());
  return s;
}

// Average contiguous run of the first entry: what Auto decides on.
template <class Src, class Dst>
int64_t first_entry_avg_run(const Transfer<Src, Dst>& t) {
  Transfer<Src, Dst> one = t;
  one.space.count = std::min<int64_t>(t.space.count, 1);
  const std::vector<Run> runs = plan_runs(one);
  if (runs.empty()) return 0;
  int64_t total = 0;
  for (const Run& r : runs) total += r.bytes;
  return total / static_cast<int64_t>(runs.size());
}

void check_launch(const ExecConfig& cfg) {
  DYNKV_CHECK(cfg.threads == 0 || (cfg.threads % 32 == 0 && cfg.threads >= 32 && cfg.threads <= 1024),
              "threads=", cfg.threads, " per CTA is not valid: expected a multiple of 32 in [32, 1024]");
  DYNKV_CHECK(cfg.num_ctas >= 0, "num_ctas=", cfg.num_ctas, " is negative");
  DYNKV_CHECK(cfg.launch_bytes >= 0, "launch_bytes=", cfg.launch_bytes, " is negative");
  DYNKV_CHECK(cfg.smem_bytes >= 0, "smem_bytes=", cfg.smem_bytes, " is negative");  // the GPU's limit: at launch
}

template <class Src, class Dst>
void dispatch(Transfer<Src, Dst> t, const ExecConfig& cfg, int device, const int64_t* src_dev,
              const int64_t* dst_dev) {
  if (t.space.count == 0) return;
  if (device < 0) {
    run_cpu(plan_runs(t), cfg.threads);
    return;
  }
  check_launch(cfg);
  cuda_set_device(device);
  const Backend b = resolve_backend(cfg, cfg.backend == Backend::Auto ? first_entry_avg_run(t) : 0);
  if (b == Backend::DmaBatch || b == Backend::DmaLoop) {
    ExecConfig c = cfg;
    c.backend = b;
    memcpy_runs_cuda(plan_runs(t), c);
    return;
  }
  DYNKV_CHECK(src_dev != nullptr && dst_dev != nullptr,
              "the kernel path needs the id lists in GPU memory as well (dynkv.ops passes them)");
  t.src.set_ids(src_dev);
  t.dst.set_ids(dst_dev);
  launch_kernel(t, cfg);
}

}  // namespace

PageGeom make_geom(int64_t num_layers, int64_t num_heads, int64_t block_size, int64_t token_bytes,
                   int64_t elem_bytes) {
  DYNKV_CHECK(elem_bytes == 1 || elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8, "elem_bytes=",
              elem_bytes, " is not a dtype size: expected 1, 2, 4 or 8");
  DYNKV_CHECK(num_layers >= 1 && num_layers <= kMaxLayers, "num_layers=", num_layers,
              " is not valid: expected 1..", kMaxLayers);
  DYNKV_CHECK(num_heads >= 1, "num_heads=", num_heads, " is not valid: expected >= 1");
  DYNKV_CHECK(block_size >= 1, "block_size=", block_size, " is not valid: expected >= 1");
  DYNKV_CHECK(token_bytes >= 1, "token_bytes=", token_bytes, " is not valid: expected >= 1");
  check_multiple(token_bytes, elem_bytes, "token_bytes");
  return PageGeom{num_layers, num_heads, block_size, token_bytes, elem_bytes};
}

BlockView make_view(const PageGeom& geom, const std::vector<uint64_t>& layer_ptrs, int64_t num_blocks,
                    int64_t num_heads, int64_t head_start, int64_t num_parts, int64_t block_stride,
                    int64_t head_stride, int64_t token_stride, int64_t part_stride) {
  DYNKV_CHECK(static_cast<int64_t>(layer_ptrs.size()) == geom.num_layers, "length mismatch: ",
              layer_ptrs.size(), " layer pointers for a geometry of ", geom.num_layers, " layers");
  DYNKV_CHECK(num_blocks >= 0, "num_blocks=", num_blocks, " is not valid: expected >= 0");
  DYNKV_CHECK(num_heads >= 1, "num_heads=", num_heads, " is not valid: expected >= 1");
  DYNKV_CHECK(head_start >= 0 && head_start + num_heads <= geom.num_heads, "head range [", head_start, ", ",
              head_start + num_heads, ") lies outside the geometry's ", geom.num_heads, " heads");
  DYNKV_CHECK(num_parts == 1 || num_parts == 2, "num_parts=", num_parts,
              " is not valid: expected 1 (K and V packed) or 2 (K and V apart)");
  DYNKV_CHECK(geom.token_bytes % (num_parts * geom.elem_bytes) == 0, "token_bytes=", geom.token_bytes,
              " does not split into ", num_parts, " parts of whole elements");
  const int64_t e = geom.elem_bytes;
  check_multiple(block_stride, e, "block_stride");
  check_multiple(head_stride, e, "head_stride");
  check_multiple(token_stride, e, "token_stride");
  check_multiple(part_stride, e, "part_stride");
  BlockView v{};
  for (size_t l = 0; l < layer_ptrs.size(); ++l) {
    DYNKV_CHECK(layer_ptrs[l] != 0, "layer pointer ", l, " is null");
    DYNKV_CHECK(layer_ptrs[l] % static_cast<uint64_t>(e) == 0, "layer pointer ", l, " (0x", std::hex,
                layer_ptrs[l], std::dec, ") is misaligned: expected a multiple of the dtype size ", e, " bytes");
    v.layer_ptr[l] = layer_ptrs[l];
  }
  v.num_layers = geom.num_layers;
  v.num_blocks = num_blocks;
  v.num_heads = num_heads;
  v.head_start = head_start;
  v.block_size = geom.block_size;
  v.token_bytes = geom.token_bytes;
  v.num_parts = num_parts;
  v.block_stride = block_stride;
  v.head_stride = head_stride;
  v.token_stride = token_stride;
  v.part_stride = part_stride;
  return v;
}

PageSet make_pages(const PageGeom& geom, uint64_t base, int64_t num_pages, int64_t page_stride, int64_t reg_pages,
                   int64_t reg_phase) {
  DYNKV_CHECK(base != 0, "page buffer pointer is null");
  DYNKV_CHECK(base % static_cast<uint64_t>(geom.elem_bytes) == 0, "page buffer pointer (0x", std::hex, base,
              std::dec, ") is misaligned: expected a multiple of the dtype size ", geom.elem_bytes, " bytes");
  DYNKV_CHECK(num_pages >= 0, "num_pages=", num_pages, " is not valid: expected >= 0");
  DYNKV_CHECK(page_stride >= geom.page_bytes(), "page buffer too small: page_stride=", page_stride,
              " bytes but a page of this geometry needs ", geom.page_bytes());
  check_multiple(page_stride, geom.elem_bytes, "page_stride");
  DYNKV_CHECK(reg_pages >= 0 && reg_phase >= 0 && (reg_phase < reg_pages || reg_phase == 0), "reg_pages=", reg_pages,
              ", reg_phase=", reg_phase, " is not valid: expected reg_pages >= 0 and 0 <= reg_phase < reg_pages");
  return PageSet{base, num_pages, page_stride, reg_pages, reg_phase};
}

Backend resolve_backend(const ExecConfig& cfg, int64_t avg_run_bytes) {
  if (cfg.backend != Backend::Auto) return cfg.backend;
  return (cfg.dma_min_run > 0 && avg_run_bytes >= cfg.dma_min_run) ? Backend::DmaBatch : Backend::Kernel;
}

void gather(const PageGeom& geom, const BlockView& full_view, const PageSet& all_pages, const IdList& block_ids,
            const IdList& slots, const ExecConfig& cfg, int device, LayerRange layers) {
  const auto [view, pages] = select_layers(geom, full_view, all_pages, layers);
  check_lengths(block_ids, slots, "block_ids", "slots");
  check_ids(block_ids, view.num_blocks, "block_ids", "the view's blocks", false);
  check_ids(slots, pages.num_pages, "slots", "the page buffer's pages", true);
  Transfer<ViewEndpoint, PageEndpoint> t{ViewEndpoint{view, block_ids.host},
                                         PageEndpoint{pages, geom, view.head_start, slots.host},
                                         TileSpace{block_ids.n, view.num_heads, view.num_layers},
                                         geom.tile_bytes(),
                                         std::min(view_align(view), pages_align(geom, pages))};
  dispatch(t, cfg, device, block_ids.device, slots.device);
}

void scatter(const PageGeom& geom, const PageSet& all_pages, const BlockView& full_view, const IdList& slots,
             const IdList& block_ids, const ExecConfig& cfg, int device, LayerRange layers) {
  const auto [view, pages] = select_layers(geom, full_view, all_pages, layers);
  check_lengths(slots, block_ids, "slots", "block_ids");
  check_ids(slots, pages.num_pages, "slots", "the page buffer's pages", false);
  check_ids(block_ids, view.num_blocks, "block_ids", "the view's blocks", true);
  Transfer<PageEndpoint, ViewEndpoint> t{PageEndpoint{pages, geom, view.head_start, slots.host},
                                         ViewEndpoint{view, block_ids.host},
                                         TileSpace{block_ids.n, view.num_heads, view.num_layers},
                                         geom.tile_bytes(),
                                         std::min(view_align(view), pages_align(geom, pages))};
  dispatch(t, cfg, device, slots.device, block_ids.device);
}

void scatter_groups(const PageGeom& geom, const PageSet& pages, const BlockView& view, const IdList& slots,
                    const IdList& block_ids, const ExecConfig& cfg, int device,
                    const std::vector<LayerRange>& groups, const std::vector<uint64_t>& events) {
  DYNKV_CHECK(events.empty() || events.size() == groups.size(), "scatter_groups got ", events.size(),
              " events for ", groups.size(), " layer groups: expected one per group, or none");
  DYNKV_CHECK(events.empty() || device >= 0, "events are recorded on a GPU stream; this scatter runs on the CPU");
  for (size_t i = 0; i < groups.size(); ++i) {
    scatter(geom, pages, view, slots, block_ids, cfg, device, groups[i]);
    if (!events.empty()) cuda_event_record(events[i], cfg.stream);
  }
}

void copy_blocks(const PageGeom& geom, const BlockView& src, const BlockView& dst, const IdList& src_ids,
                 const IdList& dst_ids, const ExecConfig& cfg, int device) {
  check_view_matches(geom, src, "source view");
  check_view_matches(geom, dst, "destination view");
  DYNKV_CHECK(src.num_heads == dst.num_heads && src.head_start == dst.head_start,
              "copy_blocks needs the same heads on both sides: source holds [", src.head_start, ", ",
              src.head_start + src.num_heads, "), destination [", dst.head_start, ", ",
              dst.head_start + dst.num_heads, "); re-layout across TP goes through pages");
  check_lengths(src_ids, dst_ids, "src_ids", "dst_ids");
  check_ids(src_ids, src.num_blocks, "src_ids", "the source view's blocks", false);
  check_ids(dst_ids, dst.num_blocks, "dst_ids", "the destination view's blocks", true);
  Transfer<ViewEndpoint, ViewEndpoint> t{ViewEndpoint{src, src_ids.host}, ViewEndpoint{dst, dst_ids.host},
                                         TileSpace{src_ids.n, src.num_heads, src.num_layers}, geom.tile_bytes(),
                                         std::min(view_align(src), view_align(dst))};
  dispatch(t, cfg, device, src_ids.device, dst_ids.device);
}

// ------------------------------------------------------------------------------------------ staged

StagingRing::StagingRing(const PageSet& pages, int64_t chunk_pages, int device, uint64_t dma_stream)
    : pages_(pages), chunk_pages_(chunk_pages), num_slots_(0), device_(device), dma_stream_(dma_stream) {
  DYNKV_CHECK(chunk_pages >= 1, "chunk_pages=", chunk_pages, " is not valid: expected >= 1");
  DYNKV_CHECK(pages.num_pages >= chunk_pages, "staging too small: ", pages.num_pages,
              " staging pages hold no chunk of ", chunk_pages, " pages");
  num_slots_ = pages.num_pages / chunk_pages;
  if (device_ >= 0) {
    DYNKV_CHECK(dma_stream != 0, "the staged path needs a stream of its own for the copy engines (got 0)");
    cuda_set_device(device_);
    try {
      for (int64_t i = 0; i < num_slots_; ++i) {
        ready_.push_back(cuda_event_create());
        freed_.push_back(cuda_event_create());
      }
    } catch (...) {
      for (uint64_t e : ready_) cuda_event_destroy(e);
      for (uint64_t e : freed_) cuda_event_destroy(e);
      throw;
    }
  }
}

StagingRing::~StagingRing() {
  for (uint64_t e : ready_) cuda_event_destroy(e);
  for (uint64_t e : freed_) cuda_event_destroy(e);
}

namespace {

// One layer group [begin, end) of a staged call. In a staging slot each page's group slice is packed:
// this rank's heads of the group's layers, [H_local, g, N, C], `stride` bytes apart (256-aligned), so a
// slot holds more pages the fewer layers a group has and a group's chunk is as many bytes as a chunk of
// whole slices. On the host each head's layers of the group are one contiguous run of the page.
struct GroupPlan {
  BlockView view;       // the group's layers only
  PageSet pages;        // the host pages, based at the group's first layer's tile of head 0
  PageGeom stage_geom;  // a staging page: H_local heads x g layers
  int64_t stride;       // bytes between staging pages
  int64_t per_chunk;    // pages per chunk
};

GroupPlan plan_group(const PageGeom& geom, const BlockView& view, const PageSet& pages, const StagingRing& ring,
                     LayerRange r) {
  const auto [v, p] = select_layers(geom, view, pages, r);
  PageGeom sg = geom;
  sg.num_layers = v.num_layers;
  sg.num_heads = v.num_heads;
  const int64_t bytes = sg.page_bytes();
  const int64_t stride = (bytes + 255) / 256 * 256;
  const int64_t slice = view.num_heads * geom.num_layers * geom.tile_bytes();
  const int64_t slot_bytes = ring.chunk_pages() * ring.pages().page_stride;
  // A staging page of the ring holds at least a whole page, so at least one group slice fits a slot.
  const int64_t per_chunk = std::max<int64_t>(1, std::min(ring.chunk_pages() * slice / bytes, slot_bytes / stride));
  return GroupPlan{v, p, sg, stride, per_chunk};
}

// The plans of a staged scatter's layer groups (none: every layer at once), each range checked.
std::vector<GroupPlan> plan_groups(const PageGeom& geom, const BlockView& view, const PageSet& pages,
                                   const StagingRing& ring, const std::vector<LayerRange>& groups) {
  std::vector<GroupPlan> plans;
  if (groups.empty()) plans.push_back(plan_group(geom, view, pages, ring, LayerRange{}));
  for (const LayerRange& r : groups) plans.push_back(plan_group(geom, view, pages, ring, r));
  return plans;
}

// A staged scatter's chunks of `n` pages in issue order: chunk(group, plan, ring slot, first, end), chunk k
// taking slot k % num_slots across groups; group_done(group) after each group's chunks.
template <class Chunk, class GroupDone>
void for_each_chunk(const std::vector<GroupPlan>& plans, int64_t n, int64_t num_slots, Chunk&& chunk,
                    GroupDone&& group_done) {
  int64_t k = 0;
  for (size_t gi = 0; gi < plans.size(); ++gi) {
    const GroupPlan& g = plans[gi];
    for (int64_t first = 0; first < n; first += g.per_chunk, ++k) {
      chunk(gi, g, k % num_slots, first, std::min(n, first + g.per_chunk));
    }
    group_done(gi);
  }
}

uint64_t slot_base(const StagingRing& ring, int64_t slot) {
  return ring.pages().base + static_cast<uint64_t>(slot * ring.chunk_pages() * ring.pages().page_stride);
}

// The chunk [first, end) of a group as a transfer between its staging slot and the view. `stage` is
// 0, 1, ..., n-1: the kernel reads the chunk's staging pages 0..end-first-1 from it.
template <bool ToView>
auto chunk_transfer(const GroupPlan& g, const StagingRing& ring, int64_t slot, const int64_t* ids,
                    const int64_t* stage, int64_t first, int64_t end) {
  const PageSet staging{slot_base(ring, slot), g.per_chunk, g.stride};
  PageEndpoint staged{staging, g.stage_geom, 0, stage};
  ViewEndpoint blocks{g.view, ids + first};
  const TileSpace space{end - first, g.view.num_heads, g.view.num_layers};
  const int align = std::min(view_align(g.view), pages_align(g.stage_geom, staging));
  if constexpr (ToView) {
    return Transfer<PageEndpoint, ViewEndpoint>{staged, blocks, space, g.stage_geom.tile_bytes(), align};
  } else {
    return Transfer<ViewEndpoint, PageEndpoint>{blocks, staged, space, g.stage_geom.tile_bytes(), align};
  }
}

// The copies between host pages and the staging slot of chunk [first, end): one pitched copy per page,
// a row per head of the group's layers (one row where the group is every layer, as the rank's heads are
// then adjacent in a page too). Pages in adjacent host slots (a fresh pool hands a prompt's pages out in
// order) join one 3D copy where the strides allow, as their staging pages are adjacent too, but never
// across a pinned registration's end. The CPU path copies the rows one by one.
std::vector<PitchedRun> chunk_runs(const PageGeom& geom, const GroupPlan& g, const StagingRing& ring, int64_t slot,
                                   const IdList& slots, int64_t first, int64_t end, bool to_staging) {
  const int64_t run = g.view.num_layers * geom.tile_bytes();
  const bool whole = g.view.num_layers == geom.num_layers;
  const int64_t heads = whole ? 1 : g.view.num_heads;
  const int64_t bytes = whole ? g.view.num_heads * run : run;
  const int64_t head_pitch = whole ? bytes : geom.tile_offset(1, 0);  // a page is [H, L, N, C]
  const int64_t stage_pitch = whole ? bytes : run;
  const int64_t host_layer = g.pages.page_stride;
  const bool join = !whole && host_layer % head_pitch == 0 && g.stride % run == 0;
  const uint64_t base = slot_base(ring, slot);
  std::vector<PitchedRun> runs;
  runs.reserve(static_cast<size_t>(end - first));
  for (int64_t i = first; i < end; ++i) {
    if (join && i > first && slots.host[i] == slots.host[i - 1] + 1 && !g.pages.starts_registration(slots.host[i])) {
      ++runs.back().depth;
      continue;
    }
    const uint64_t page = g.pages.base + static_cast<uint64_t>(slots.host[i] * g.pages.page_stride);
    const uint64_t host = page + static_cast<uint64_t>(geom.tile_offset(g.view.head_start, 0));
    const uint64_t dev = base + static_cast<uint64_t>((i - first) * g.stride);
    runs.push_back(to_staging ? PitchedRun{host, dev, bytes, heads, head_pitch, stage_pitch, 1, host_layer, g.stride}
                              : PitchedRun{dev, host, bytes, heads, stage_pitch, head_pitch, 1, g.stride, host_layer});
  }
  return runs;
}

void check_staged(const PageGeom& geom, const PageSet& pages, const BlockView& view, const IdList& slots,
                  const IdList& block_ids, const IdList& stage, const StagingRing& ring, bool unique_slots,
                  bool unique_blocks) {
  check_view_matches(geom, view, "view");
  check_lengths(slots, block_ids, "slots", "block_ids");
  check_lengths(slots, stage, "slots", "staging slots");
  check_ids(slots, pages.num_pages, "slots", "the page buffer's pages", unique_slots);
  check_ids(block_ids, view.num_blocks, "block_ids", "the view's blocks", unique_blocks);
  DYNKV_CHECK(ring.pages().page_stride >= geom.page_bytes(), "staging pages of ", ring.pages().page_stride,
              " bytes are smaller than a page of this geometry (", geom.page_bytes(), ")");
  DYNKV_CHECK(stage.n == 0 || stage.host != nullptr, "staging slots: missing host array");
  for (int64_t i = 0; i < stage.n; ++i) {
    DYNKV_CHECK(stage.host[i] == i, "staging slot ", i, " is ", stage.host[i], ", expected ", i,
                " (a chunk's pages take a slot's staging pages in order)");
  }
  const int device = ring.device();
  DYNKV_CHECK(device < 0 || block_ids.n == 0 || (block_ids.device != nullptr && stage.device != nullptr),
              "the staged path's kernel needs the block ids and staging slots in GPU memory (dynkv.ops passes them)");
}

}  // namespace

std::vector<std::array<int64_t, 4>> staged_copy_plan(const PageGeom& geom, const PageSet& pages, const BlockView& view,
                                                     const IdList& slots, const StagingRing& ring,
                                                     const std::vector<LayerRange>& groups) {
  check_ids(slots, pages.num_pages, "slots", "the page buffer's pages", true);
  std::vector<std::array<int64_t, 4>> out;
  for_each_chunk(
      plan_groups(geom, view, pages, ring, groups), slots.n, ring.num_slots(),
      [&](size_t gi, const GroupPlan& g, int64_t s, int64_t first, int64_t end) {
        int64_t i = first;  // a copy's pages are the chunk's next `depth`
        for (const PitchedRun& r : chunk_runs(geom, g, ring, s, slots, first, end, true)) {
          out.push_back({static_cast<int64_t>(gi), slots.host[i], r.depth, r.rows});
          i += r.depth;
        }
      },
      [](size_t) {});
  return out;
}

void staged_scatter(const PageGeom& geom, const PageSet& pages, const BlockView& view, const IdList& slots,
                    const IdList& block_ids, const IdList& stage, StagingRing& ring, const ExecConfig& cfg,
                    const std::vector<LayerRange>& groups, const std::vector<uint64_t>& events,
                    const std::function<void(size_t)>& after) {
  check_staged(geom, pages, view, slots, block_ids, stage, ring, false, true);
  const int device = ring.device();
  DYNKV_CHECK(events.empty() || device >= 0, "events are recorded on a GPU stream; this scatter runs on the CPU");
  const size_t num_groups = groups.empty() ? 1 : groups.size();
  DYNKV_CHECK(events.empty() || events.size() == num_groups, "staged_scatter got ", events.size(), " events for ",
              num_groups, " layer groups: expected one per group, or none");
  const std::vector<GroupPlan> plans = plan_groups(geom, view, pages, ring, groups);
  const int64_t n = slots.n;
  if (device < 0) {  // the same chunks and slots, one after the other
    for_each_chunk(
        plans, n, ring.num_slots(),
        [&](size_t, const GroupPlan& g, int64_t s, int64_t first, int64_t end) {
          run_cpu(row_runs(chunk_runs(geom, g, ring, s, slots, first, end, true)), cfg.threads);
          run_cpu(plan_runs(chunk_transfer<true>(g, ring, s, block_ids.host, stage.host, first, end)), cfg.threads);
        },
        [&](size_t gi) {
          if (after) after(gi);
        });
    return;
  }
  check_launch(cfg);
  cuda_set_device(device);
  ExecConfig dma{};
  dma.backend = Backend::DmaBatch;
  dma.stream = ring.dma_stream();
  for_each_chunk(
      plans, n, ring.num_slots(),
      [&](size_t, const GroupPlan& g, int64_t s, int64_t first, int64_t end) {
        cuda_stream_wait_event(dma.stream, ring.freed(s));  // the kernel has read what the slot held before
        memcpy_pitched_cuda(chunk_runs(geom, g, ring, s, slots, first, end, true), dma);
        cuda_event_record(ring.ready(s), dma.stream);
        cuda_stream_wait_event(cfg.stream, ring.ready(s));
        launch_kernel(chunk_transfer<true>(g, ring, s, block_ids.device, stage.device, first, end), cfg);
        cuda_event_record(ring.freed(s), cfg.stream);
      },
      [&](size_t gi) {
        if (!events.empty()) cuda_event_record(events[gi], cfg.stream);
        if (after) after(gi);
      });
}

void staged_gather(const PageGeom& geom, const BlockView& view, const PageSet& pages, const IdList& block_ids,
                   const IdList& slots, const IdList& stage, StagingRing& ring, const ExecConfig& cfg) {
  check_staged(geom, pages, view, slots, block_ids, stage, ring, true, false);
  const int device = ring.device();
  const GroupPlan g = plan_group(geom, view, pages, ring, LayerRange{});
  const int64_t n = slots.n, c = g.per_chunk;
  if (device < 0) {
    for (int64_t first = 0, k = 0; first < n; first += c, ++k) {
      const int64_t end = std::min(n, first + c), s = k % ring.num_slots();
      run_cpu(plan_runs(chunk_transfer<false>(g, ring, s, block_ids.host, stage.host, first, end)), cfg.threads);
      run_cpu(row_runs(chunk_runs(geom, g, ring, s, slots, first, end, false)), cfg.threads);
    }
    return;
  }
  if (n == 0) return;
  check_launch(cfg);
  cuda_set_device(device);
  ExecConfig dma{};
  dma.backend = Backend::DmaBatch;
  dma.stream = ring.dma_stream();
  int64_t last = 0;
  for (int64_t first = 0, k = 0; first < n; first += c, ++k) {
    const int64_t end = std::min(n, first + c), s = k % ring.num_slots();
    cuda_stream_wait_event(cfg.stream, ring.freed(s));  // the copy engines have read what the slot held before
    launch_kernel(chunk_transfer<false>(g, ring, s, block_ids.device, stage.device, first, end), cfg);
    cuda_event_record(ring.ready(s), cfg.stream);
    cuda_stream_wait_event(dma.stream, ring.ready(s));
    memcpy_pitched_cuda(chunk_runs(geom, g, ring, s, slots, first, end, false), dma);
    cuda_event_record(ring.freed(s), dma.stream);
    last = s;
  }
  cuda_stream_wait_event(cfg.stream, ring.freed(last));  // the caller's stream completes with the last DMA
}

void memcpy_batch(const std::vector<Run>& all_runs, const ExecConfig& cfg, int device) {
  std::vector<Run> runs;
  runs.reserve(all_runs.size());
  for (size_t i = 0; i < all_runs.size(); ++i) {
    const Run& r = all_runs[i];
    DYNKV_CHECK(r.bytes >= 0, "sizes[", i, "]=", r.bytes, " is negative");
    DYNKV_CHECK(r.bytes == 0 || (r.src != 0 && r.dst != 0), "copy ", i, " has a null pointer");
    if (r.bytes > 0) runs.push_back(r);  // the copy engines refuse empty copies
  }
  if (device < 0) {
    run_cpu(runs, cfg.threads);
    return;
  }
  cuda_set_device(device);
  memcpy_runs_cuda(runs, cfg);
}

}  // namespace dynkv
