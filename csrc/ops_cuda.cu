// CUDA launchers: kernel path, copy-engine path, host registration, device info.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "dynkv/check.h"
#include "dynkv/cuda.h"
#include "dynkv/kernels.cuh"
#include "dynkv/transfer.h"

#define DYNKV_CUDA_CHECK(expr)                                                      \
  do {                                                                              \
    const cudaError_t err_ = (expr);                                                \
    if (err_ != cudaSuccess) {                                                      \
      DYNKV_FAIL(#expr, " failed: ", cudaGetErrorName(err_), ": ", cudaGetErrorString(err_)); \
    }                                                                               \
  } while (0)

namespace dynkv {

bool cuda_compiled() { return true; }

namespace {

constexpr int kDefaultCtas = 8;
constexpr int kDefaultThreads = 512;
constexpr int64_t kStaticSmemLimit = 48 << 10;

template <int V, class Src, class Dst>
void launch_v(const Transfer<Src, Dst>& t, int ctas, int threads, int64_t per_launch, int64_t smem,
              cudaStream_t stream) {
  const int64_t ntiles = t.space.num_tiles();
  if (smem > kStaticSmemLimit) {
    // Above 48 KiB a kernel must opt in; the GPU refuses what it cannot hold (a clear error, no copy).
    DYNKV_CUDA_CHECK(cudaFuncSetAttribute(copy_tiles_kernel<V, Src, Dst>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  for (int64_t first = 0; first < ntiles; first += per_launch) {
    const int64_t end = std::min(ntiles, first + per_launch);
    copy_tiles_kernel<V, Src, Dst><<<ctas, threads, static_cast<size_t>(smem), stream>>>(
        t.src, t.dst, t.space, t.tile_bytes, first, end);
    DYNKV_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

template <class Src, class Dst>
void launch_kernel(const Transfer<Src, Dst>& t, const ExecConfig& cfg) {
  const int64_t ntiles = t.space.num_tiles();
  if (ntiles == 0) return;
  // ops.cpp checked the launch configuration (check_launch).
  const int threads = cfg.threads > 0 ? cfg.threads : kDefaultThreads;
  const int warps = threads / 32;
  const int64_t per_launch =
      cfg.launch_bytes > 0 ? std::max<int64_t>(1, cfg.launch_bytes / t.tile_bytes) : ntiles;
  const int64_t wanted = (std::min(ntiles, per_launch) + warps - 1) / warps;
  const int ctas = static_cast<int>(std::min<int64_t>(cfg.num_ctas > 0 ? cfg.num_ctas : kDefaultCtas, wanted));
  auto stream = reinterpret_cast<cudaStream_t>(cfg.stream);
  if (cfg.smem_bytes > 0) {
    int device = 0, optin = 0;
    DYNKV_CUDA_CHECK(cudaGetDevice(&device));
    DYNKV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    DYNKV_CHECK(cfg.smem_bytes <= optin, "smem_bytes=", cfg.smem_bytes,
                " is more shared memory than this GPU gives one CTA (", optin, " bytes)");
  }
  switch (t.align) {
    case 16: launch_v<16>(t, ctas, threads, per_launch, cfg.smem_bytes, stream); break;
    case 8: launch_v<8>(t, ctas, threads, per_launch, cfg.smem_bytes, stream); break;
    case 4: launch_v<4>(t, ctas, threads, per_launch, cfg.smem_bytes, stream); break;
    case 2: launch_v<2>(t, ctas, threads, per_launch, cfg.smem_bytes, stream); break;
    default: launch_v<1>(t, ctas, threads, per_launch, cfg.smem_bytes, stream); break;
  }
}

template void launch_kernel(const Transfer<ViewEndpoint, PageEndpoint>&, const ExecConfig&);
template void launch_kernel(const Transfer<PageEndpoint, ViewEndpoint>&, const ExecConfig&);
template void launch_kernel(const Transfer<ViewEndpoint, ViewEndpoint>&, const ExecConfig&);

void memcpy_runs_cuda(const std::vector<Run>& runs, const ExecConfig& cfg) {
  if (runs.empty()) return;
  auto stream = reinterpret_cast<cudaStream_t>(cfg.stream);
  // The batch API refuses the legacy default stream; the loop serves it.
  const bool batch = cfg.backend != Backend::DmaLoop && cfg.stream != 0;
#if CUDART_VERSION >= 12080
  if (batch) {
    constexpr size_t kChunk = 4096;
    std::vector<void*> dsts, srcs;
    std::vector<size_t> sizes;
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attr_idx = 0;
    for (size_t first = 0; first < runs.size(); first += kChunk) {
      const size_t n = std::min(kChunk, runs.size() - first);
      dsts.resize(n);
      srcs.resize(n);
      sizes.resize(n);
      for (size_t i = 0; i < n; ++i) {
        const Run& r = runs[first + i];
        dsts[i] = reinterpret_cast<void*>(r.dst);
        srcs[i] = reinterpret_cast<void*>(r.src);
        sizes[i] = static_cast<size_t>(r.bytes);
      }
#if CUDART_VERSION >= 13000
      DYNKV_CUDA_CHECK(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), n, &attr,
                                            &attr_idx, 1, stream));
#else
      size_t fail_idx = 0;
      DYNKV_CUDA_CHECK(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), n, &attr,
                                            &attr_idx, 1, &fail_idx, stream));
#endif
    }
    return;
  }
#else
  (void)batch;
#endif
  for (const Run& r : runs) {
    DYNKV_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(r.dst), reinterpret_cast<const void*>(r.src),
                                     static_cast<size_t>(r.bytes), cudaMemcpyDefault, stream));
  }
}

void memcpy_pitched_cuda(const std::vector<PitchedRun>& runs, const ExecConfig& cfg) {
  if (std::all_of(runs.begin(), runs.end(), [](const PitchedRun& p) { return p.rows == 1 && p.depth == 1; })) {
    memcpy_runs_cuda(row_runs(runs), cfg);  // plain runs: the 1D batch
    return;
  }
  auto stream = reinterpret_cast<cudaStream_t>(cfg.stream);
  const bool batch = cfg.backend != Backend::DmaLoop && cfg.stream != 0;
#if CUDART_VERSION >= 12080
  if (batch) {
    constexpr size_t kChunk = 4096;
    std::vector<cudaMemcpy3DBatchOp> ops;
    for (size_t first = 0; first < runs.size(); first += kChunk) {
      const size_t n = std::min(kChunk, runs.size() - first);
      ops.assign(n, cudaMemcpy3DBatchOp{});
      for (size_t i = 0; i < n; ++i) {
        const PitchedRun& r = runs[first + i];
        cudaMemcpy3DBatchOp& op = ops[i];
        // Pointer to pointer: elements are bytes; a layer's height in rows is its pitch over the row pitch.
        op.src.type = cudaMemcpyOperandTypePointer;
        op.src.op.ptr.ptr = reinterpret_cast<void*>(r.src);
        op.src.op.ptr.rowLength = static_cast<size_t>(r.src_pitch);
        op.src.op.ptr.layerHeight = static_cast<size_t>(r.depth > 1 ? r.src_layer / r.src_pitch : r.rows);
        op.dst.type = cudaMemcpyOperandTypePointer;
        op.dst.op.ptr.ptr = reinterpret_cast<void*>(r.dst);
        op.dst.op.ptr.rowLength = static_cast<size_t>(r.dst_pitch);
        op.dst.op.ptr.layerHeight = static_cast<size_t>(r.depth > 1 ? r.dst_layer / r.dst_pitch : r.rows);
        op.extent = make_cudaExtent(static_cast<size_t>(r.bytes), static_cast<size_t>(r.rows),
                                    static_cast<size_t>(r.depth));
        op.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
        op.flags = cudaMemcpyFlagPreferOverlapWithCompute;
      }
#if CUDART_VERSION >= 13000
      DYNKV_CUDA_CHECK(cudaMemcpy3DBatchAsync(n, ops.data(), 0, stream));
#else
      size_t fail_idx = 0;
      DYNKV_CUDA_CHECK(cudaMemcpy3DBatchAsync(n, ops.data(), &fail_idx, 0, stream));
#endif
    }
    return;
  }
#else
  (void)batch;
#endif
  for (const PitchedRun& r : runs) {
    for (int64_t d = 0; d < r.depth; ++d) {
      DYNKV_CUDA_CHECK(cudaMemcpy2DAsync(reinterpret_cast<void*>(r.dst + static_cast<uint64_t>(d * r.dst_layer)),
                                         static_cast<size_t>(r.dst_pitch),
                                         reinterpret_cast<const void*>(r.src + static_cast<uint64_t>(d * r.src_layer)),
                                         static_cast<size_t>(r.src_pitch), static_cast<size_t>(r.bytes),
                                         static_cast<size_t>(r.rows), cudaMemcpyDefault, stream));
    }
  }
}

bool cuda_batch_memcpy_available() {
#if CUDART_VERSION >= 12080
  return true;
#else
  return false;
#endif
}

void cuda_set_device(int device) {
  if (device >= 0) DYNKV_CUDA_CHECK(cudaSetDevice(device));
}

void cuda_event_record(uint64_t event, uint64_t stream) {
  DYNKV_CUDA_CHECK(cudaEventRecord(reinterpret_cast<cudaEvent_t>(event), reinterpret_cast<cudaStream_t>(stream)));
}

uint64_t cuda_event_create() {
  cudaEvent_t ev = nullptr;
  DYNKV_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  return reinterpret_cast<uint64_t>(ev);
}

void cuda_event_destroy(uint64_t event) {
  if (event != 0) cudaEventDestroy(reinterpret_cast<cudaEvent_t>(event));  // teardown: nothing to report to
}

void cuda_stream_wait_event(uint64_t stream, uint64_t event) {
  DYNKV_CUDA_CHECK(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), reinterpret_cast<cudaEvent_t>(event), 0));
}

void cuda_host_register(void* ptr, size_t bytes) {
  DYNKV_CUDA_CHECK(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped));
}

void cuda_host_unregister(void* ptr) { DYNKV_CUDA_CHECK(cudaHostUnregister(ptr)); }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: report none
    return 0;
  }
  return n;
}

CudaInfo cuda_info() {
  CudaInfo info;
  info.runtime_version = CUDART_VERSION;
  int drv = 0;
  if (cudaDriverGetVersion(&drv) == cudaSuccess) info.driver_version = drv;
  const int n = cuda_device_count();
  for (int d = 0; d < n; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
    info.devices.push_back(DeviceInfo{prop.name, prop.major * 10 + prop.minor, prop.multiProcessorCount,
                                      static_cast<int64_t>(prop.totalGlobalMem)});
  }
  return info;
}

}  // namespace dynkv
