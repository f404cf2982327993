// pybind11 surface of dynkv._C. Conversions only: checks live in ops.cpp.
#include <algorithm>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "dynkv/check.h"
#include "dynkv/cpu.h"
#include "dynkv/cuda.h"
#include "dynkv/disk_io.h"
#include "dynkv/host_pool.h"
#include "dynkv/ops.h"
#include "dynkv/signal.h"

namespace py = pybind11;
using namespace dynkv;

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

IdList id_list(const I64Array& a, uint64_t device_ptr, const char* what) {
  DYNKV_CHECK(a.ndim() == 1, what, " must be one-dimensional, got ", a.ndim(), " dimensions");
  return IdList{a.data(), reinterpret_cast<const int64_t*>(device_ptr), static_cast<int64_t>(a.size())};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dynkv copy engine: paged KV blocks <-> TP-agnostic pages (CPU and CUDA)";

  // Module-local, and handling every std::exception itself: the global
  // translator chain lives in pybind11 internals shared with other extensions
  // (torch's), whose pybind11 may differ from ours.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const std::bad_alloc&) {
      PyErr_SetString(PyExc_MemoryError, "out of memory");
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  py::enum_<Backend>(m, "Backend")
      .value("AUTO", Backend::Auto)
      .value("KERNEL", Backend::Kernel)
      .value("DMA_BATCH", Backend::DmaBatch)
      .value("DMA_LOOP", Backend::DmaLoop);

  py::class_<ExecConfig>(m, "ExecConfig")
      .def(py::init([](Backend backend, int num_ctas, int threads, uint64_t stream, int64_t dma_min_run,
                       int64_t launch_bytes, int64_t smem_bytes) {
             return ExecConfig{backend, num_ctas, threads, stream, dma_min_run, launch_bytes, smem_bytes};
           }),
           py::arg("backend") = Backend::Auto, py::arg("num_ctas") = 0, py::arg("threads") = 0,
           py::arg("stream") = 0, py::arg("dma_min_run") = 0, py::arg("launch_bytes") = 0,
           py::arg("smem_bytes") = 0)
      .def_readonly("backend", &ExecConfig::backend)
      .def_readonly("num_ctas", &ExecConfig::num_ctas)
      .def_readonly("threads", &ExecConfig::threads)
      .def_readonly("stream", &ExecConfig::stream)
      .def_readonly("dma_min_run", &ExecConfig::dma_min_run)
      .def_readonly("launch_bytes", &ExecConfig::launch_bytes)
      .def_readonly("smem_bytes", &ExecConfig::smem_bytes);

  py::class_<PageGeom>(m, "PageGeom")
      .def_readonly("num_layers", &PageGeom::num_layers)
      .def_readonly("num_heads", &PageGeom::num_heads)
      .def_readonly("block_size", &PageGeom::block_size)
      .def_readonly("token_bytes", &PageGeom::token_bytes)
      .def_readonly("elem_bytes", &PageGeom::elem_bytes)
      .def_property_readonly("tile_bytes", &PageGeom::tile_bytes)
      .def_property_readonly("page_bytes", &PageGeom::page_bytes);

  py::class_<BlockView>(m, "BlockView")
      .def_readonly("num_layers", &BlockView::num_layers)
      .def_readonly("num_blocks", &BlockView::num_blocks)
      .def_readonly("num_heads", &BlockView::num_heads)
      .def_readonly("head_start", &BlockView::head_start)
      .def_property_readonly("tile_contiguous", &BlockView::tile_contiguous)
      .def_property_readonly("run_bytes", &BlockView::run_bytes)
      .def("layer_ptrs_equal", [](const BlockView& a, const BlockView& b) {
        return a.num_layers == b.num_layers && std::equal(a.layer_ptr, a.layer_ptr + a.num_layers, b.layer_ptr);
      });

  py::class_<PageSet>(m, "PageSet")
      .def_readonly("base", &PageSet::base)
      .def_readonly("num_pages", &PageSet::num_pages)
      .def_readonly("page_stride", &PageSet::page_stride)
      .def_readonly("reg_pages", &PageSet::reg_pages)
      .def_readonly("reg_phase", &PageSet::reg_phase);

  m.def("make_geom", &make_geom, py::arg("num_layers"), py::arg("num_heads"), py::arg("block_size"),
        py::arg("token_bytes"), py::arg("elem_bytes"));
  m.def("make_view", &make_view, py::arg("geom"), py::arg("layer_ptrs"), py::arg("num_blocks"),
        py::arg("num_heads"), py::arg("head_start"), py::arg("num_parts"), py::arg("block_stride"),
        py::arg("head_stride"), py::arg("token_stride"), py::arg("part_stride"));
  m.def("make_pages", &make_pages, py::arg("geom"), py::arg("base"), py::arg("num_pages"),
        py::arg("page_stride"), py::arg("reg_pages") = 0, py::arg("reg_phase") = 0);

  m.def("record_crc_available", &record_crc_available);
  m.def(
      "read_records",
      [](const std::vector<int>& fds, const std::vector<int64_t>& offsets, uint64_t header_base,
         int64_t header_bytes, const std::vector<uint64_t>& dsts, int64_t payload_bytes, bool checksum) {
        std::vector<RecordRead> rs;
        ReadCost cost;
        {
          py::gil_scoped_release nogil;
          rs = read_records(fds, offsets, header_base, header_bytes, dsts, payload_bytes, checksum, &cost);
        }
        py::list out;
        for (const RecordRead& r : rs) out.append(py::make_tuple(r.got, r.err, r.crc32));
        py::dict c;
        c["read_ms"] = cost.read_ns / 1e6;
        c["crc_ms"] = cost.crc_ns / 1e6;
        c["user_ms"] = cost.user_us / 1e3;
        c["sys_ms"] = cost.sys_us / 1e3;
        c["minor_faults"] = cost.minor_faults;
        c["voluntary_switches"] = cost.voluntary_switches;
        c["involuntary_switches"] = cost.involuntary_switches;
        return py::make_tuple(out, c);
      },
      py::arg("fds"), py::arg("offsets"), py::arg("header_base"), py::arg("header_bytes"), py::arg("dsts"),
      py::arg("payload_bytes"), py::arg("checksum") = true,
      "Read disk-tier records (header, payload) with the GIL released: ([(bytes read, errno, payload crc32)], "
      "the call's cost to its thread (read_ms, crc_ms, user_ms, sys_ms, minor_faults, voluntary_switches, "
      "involuntary_switches)).");
  m.def(
      "gather",
      [](const PageGeom& g, const BlockView& v, const PageSet& p, const I64Array& ids, const I64Array& slots,
         const ExecConfig& cfg, int device, uint64_t ids_dev, uint64_t slots_dev, int64_t layer_begin,
         int64_t layer_end) {
        const IdList a = id_list(ids, ids_dev, "block_ids"), b = id_list(slots, slots_dev, "slots");
        py::gil_scoped_release nogil;
        gather(g, v, p, a, b, cfg, device, LayerRange{layer_begin, layer_end});
      },
      py::arg("geom"), py::arg("view"), py::arg("pages"), py::arg("block_ids"), py::arg("slots"), py::arg("cfg"),
      py::arg("device") = -1, py::arg("block_ids_dev") = 0, py::arg("slots_dev") = 0, py::arg("layer_begin") = 0,
      py::arg("layer_end") = -1);
  m.def(
      "scatter",
      [](const PageGeom& g, const PageSet& p, const BlockView& v, const I64Array& slots, const I64Array& ids,
         const ExecConfig& cfg, int device, uint64_t slots_dev, uint64_t ids_dev, int64_t layer_begin,
         int64_t layer_end) {
        const IdList a = id_list(slots, slots_dev, "slots"), b = id_list(ids, ids_dev, "block_ids");
        py::gil_scoped_release nogil;
        scatter(g, p, v, a, b, cfg, device, LayerRange{layer_begin, layer_end});
      },
      py::arg("geom"), py::arg("pages"), py::arg("view"), py::arg("slots"), py::arg("block_ids"), py::arg("cfg"),
      py::arg("device") = -1, py::arg("slots_dev") = 0, py::arg("block_ids_dev") = 0, py::arg("layer_begin") = 0,
      py::arg("layer_end") = -1);
  m.def(
      "scatter_groups",
      [](const PageGeom& g, const PageSet& p, const BlockView& v, const I64Array& slots, const I64Array& ids,
         const ExecConfig& cfg, int device, uint64_t slots_dev, uint64_t ids_dev,
         const std::vector<std::pair<int64_t, int64_t>>& groups, const std::vector<uint64_t>& events) {
        const IdList a = id_list(slots, slots_dev, "slots"), b = id_list(ids, ids_dev, "block_ids");
        std::vector<LayerRange> ranges;
        ranges.reserve(groups.size());
        for (const auto& [begin, end] : groups) ranges.push_back(LayerRange{begin, end});
        py::gil_scoped_release nogil;
        scatter_groups(g, p, v, a, b, cfg, device, ranges, events);
      },
      py::arg("geom"), py::arg("pages"), py::arg("view"), py::arg("slots"), py::arg("block_ids"), py::arg("cfg"),
      py::arg("device"), py::arg("slots_dev"), py::arg("block_ids_dev"), py::arg("groups"),
      py::arg("events") = std::vector<uint64_t>{},
      "scatter in layer groups [begin, end), one call: each group one launch, events[i] recorded after group i.");
  m.def(
      "copy_blocks",
      [](const PageGeom& g, const BlockView& src, const BlockView& dst, const I64Array& src_ids,
         const I64Array& dst_ids, const ExecConfig& cfg, int device, uint64_t src_dev, uint64_t dst_dev) {
        const IdList a = id_list(src_ids, src_dev, "src_ids"), b = id_list(dst_ids, dst_dev, "dst_ids");
        py::gil_scoped_release nogil;
        copy_blocks(g, src, dst, a, b, cfg, device);
      },
      py::arg("geom"), py::arg("src"), py::arg("dst"), py::arg("src_ids"), py::arg("dst_ids"), py::arg("cfg"),
      py::arg("device") = -1, py::arg("src_ids_dev") = 0, py::arg("dst_ids_dev") = 0);
  m.def(
      "memcpy_batch",
      [](const U64Array& srcs, const U64Array& dsts, const I64Array& sizes, const ExecConfig& cfg, int device) {
        DYNKV_CHECK(srcs.ndim() == 1 && dsts.ndim() == 1 && sizes.ndim() == 1,
                    "srcs, dsts and sizes must be one-dimensional");
        DYNKV_CHECK(srcs.size() == dsts.size() && srcs.size() == sizes.size(), "length mismatch: srcs has ",
                    srcs.size(), ", dsts ", dsts.size(), ", sizes ", sizes.size(), " entries");
        std::vector<Run> runs(static_cast<size_t>(srcs.size()));
        for (size_t i = 0; i < runs.size(); ++i) runs[i] = Run{srcs.data()[i], dsts.data()[i], sizes.data()[i]};
        py::gil_scoped_release nogil;
        memcpy_batch(runs, cfg, device);
      },
      py::arg("srcs"), py::arg("dsts"), py::arg("sizes"), py::arg("cfg"), py::arg("device") = -1);
  py::class_<GroupSignal>(m, "GroupSignal",
                          "How many of a load's layer groups are issued: set by the thread issuing them "
                          "(staged_scatter's after), waited for by another, without the GIL.")
      .def(py::init<int64_t>(), py::arg("num_groups"))
      .def("set", &GroupSignal::set, py::arg("group"), "groups [0, group] are issued",
           py::call_guard<py::gil_scoped_release>())
      .def("set_all", &GroupSignal::set_all, "the launch is over: nothing waits any longer",
           py::call_guard<py::gil_scoped_release>())
      .def("wait", &GroupSignal::wait, py::arg("group"), "until group `group` is issued (or set_all)",
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("issued", &GroupSignal::issued)
      .def_property_readonly("num_groups", &GroupSignal::num_groups);
  py::class_<StagingRing>(m, "StagingRing")
      .def(py::init<const PageSet&, int64_t, int, uint64_t>(), py::arg("pages"), py::arg("chunk_pages"),
           py::arg("device"), py::arg("dma_stream"))
      .def_property_readonly("chunk_pages", &StagingRing::chunk_pages)
      .def_property_readonly("num_slots", &StagingRing::num_slots)
      .def_property_readonly("device", &StagingRing::device);
  m.def(
      "staged_copy_plan",
      [](const PageGeom& g, const PageSet& p, const BlockView& v, const I64Array& slots, const StagingRing& ring,
         const std::vector<std::pair<int64_t, int64_t>>& groups) {
        std::vector<LayerRange> ranges;
        for (const auto& [begin, end] : groups) ranges.push_back(LayerRange{begin, end});
        return staged_copy_plan(g, p, v, id_list(slots, 0, "slots"), ring, ranges);
      },
      py::arg("geom"), py::arg("pages"), py::arg("view"), py::arg("slots"), py::arg("ring"),
      py::arg("groups") = std::vector<std::pair<int64_t, int64_t>>{},
      "The copy-engine operations of a staged scatter: (group, first slot, pages, rows) each");
  m.def(
      "staged_scatter",
      [](const PageGeom& g, const PageSet& p, const BlockView& v, const I64Array& slots, const I64Array& ids,
         const I64Array& stage, StagingRing& ring, const ExecConfig& cfg, uint64_t ids_dev, uint64_t stage_dev,
         const std::vector<std::pair<int64_t, int64_t>>& groups, const std::vector<uint64_t>& events,
         const py::object& after) {
        const IdList a = id_list(slots, 0, "slots"), b = id_list(ids, ids_dev, "block_ids"),
                     c = id_list(stage, stage_dev, "staging slots");
        std::vector<LayerRange> ranges;
        ranges.reserve(groups.size());
        for (const auto& [begin, end] : groups) ranges.push_back(LayerRange{begin, end});
        std::function<void(size_t)> done;  // destroyed after nogil below, so with the GIL held
        if (py::isinstance<GroupSignal>(after)) {  // set without the GIL: no wait for a busy Python thread
          GroupSignal* signal = after.cast<GroupSignal*>();
          done = [signal](size_t i) { signal->set(static_cast<int64_t>(i)); };
        } else if (!after.is_none()) {
          done = [after](size_t i) {
            py::gil_scoped_acquire gil;
            after(i);
          };
        }
        py::gil_scoped_release nogil;
        staged_scatter(g, p, v, a, b, c, ring, cfg, ranges, events, done);
      },
      py::arg("geom"), py::arg("pages"), py::arg("view"), py::arg("slots"), py::arg("block_ids"), py::arg("stage"),
      py::arg("ring"), py::arg("cfg"), py::arg("block_ids_dev") = 0, py::arg("stage_dev") = 0,
      py::arg("groups") = std::vector<std::pair<int64_t, int64_t>>{}, py::arg("events") = std::vector<uint64_t>{},
      py::arg("after") = py::none(),
      "pages -> blocks through the staging ring in layer groups (none: all layers); events[i], then after(i), "
      "once group i is issued.");
  m.def(
      "staged_gather",
      [](const PageGeom& g, const BlockView& v, const PageSet& p, const I64Array& ids, const I64Array& slots,
         const I64Array& stage, StagingRing& ring, const ExecConfig& cfg, uint64_t ids_dev, uint64_t stage_dev) {
        const IdList a = id_list(ids, ids_dev, "block_ids"), b = id_list(slots, 0, "slots"),
                     c = id_list(stage, stage_dev, "staging slots");
        py::gil_scoped_release nogil;
        staged_gather(g, v, p, a, b, c, ring, cfg);
      },
      py::arg("geom"), py::arg("view"), py::arg("pages"), py::arg("block_ids"), py::arg("slots"), py::arg("stage"),
      py::arg("ring"), py::arg("cfg"), py::arg("block_ids_dev") = 0, py::arg("stage_dev") = 0,
      "blocks -> pages through the staging ring; complete on cfg.stream.");
  m.def("resolve_backend", &resolve_backend, py::arg("cfg"), py::arg("avg_run_bytes"));

  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_batch_memcpy_available", &cuda_batch_memcpy_available);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("max_cpu_threads", &max_cpu_threads);
  m.def("cuda_info", []() {
    const CudaInfo info = cuda_info();
    py::list devices;
    for (const DeviceInfo& d : info.devices) {
      py::dict e;
      e["name"] = d.name;
      e["compute_capability"] = d.compute_capability;
      e["num_sms"] = d.num_sms;
      e["total_memory"] = d.total_memory;
      devices.append(e);
    }
    py::dict out;
    out["runtime_version"] = info.runtime_version;
    out["driver_version"] = info.driver_version;
    out["devices"] = devices;
    return out;
  });

  py::class_<HostPool>(m, "HostPool")
      .def_static(
          "create",
          [](const std::string& name, size_t bytes, bool pin, size_t chunk_bytes, int threads, bool memfd) {
            py::gil_scoped_release nogil;
            return HostPool::create(name, bytes, pin, chunk_bytes, threads, memfd);
          },
          py::arg("name"), py::arg("bytes"), py::arg("pin"), py::arg("chunk_bytes"), py::arg("threads"),
          py::arg("memfd") = false)
      .def_static(
          "attach",
          [](const std::string& name, bool pin, size_t chunk_bytes, int threads) {
            py::gil_scoped_release nogil;
            return HostPool::attach(name, pin, chunk_bytes, threads);
          },
          py::arg("name"), py::arg("pin"), py::arg("chunk_bytes"), py::arg("threads"))
      .def_static("unlink", &HostPool::unlink, py::arg("name"))
      .def("close", &HostPool::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("ptr", &HostPool::ptr)
      .def_property_readonly("size", &HostPool::size)
      .def_property_readonly("name", &HostPool::name)
      .def_property_readonly("path", &HostPool::path)
      .def_property_readonly("memfd", &HostPool::memfd)
      .def_property_readonly("owner", &HostPool::owner)
      .def_property_readonly("pinned", &HostPool::pinned)
      .def_property_readonly("chunk_bytes", &HostPool::chunk_bytes)
      .def_property_readonly("populate_seconds", &HostPool::populate_seconds)
      .def_property_readonly("pin_seconds", &HostPool::pin_seconds);
}
