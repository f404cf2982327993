// Built instead of ops_cuda.cu when CUDA is off: every GPU entry point
// reports that this build has no CUDA ops.
#include <stdexcept>

#include "dynkv/check.h"
#include "dynkv/cuda.h"
#include "dynkv/transfer.h"

namespace dynkv {

namespace {
[[noreturn]] void no_cuda() {
  DYNKV_FAIL("dynkv was built without CUDA ops (no nvcc at build time, or DYNKV_CUDA=OFF); "
             "rebuild with CUDA to copy GPU memory");
}
}  // namespace

bool cuda_compiled() { return false; }

template <class Src, class Dst>
void launch_kernel(const Transfer<Src, Dst>&, const ExecConfig&) {
  no_cuda();
}
template void launch_kernel(const Transfer<ViewEndpoint, PageEndpoint>&, const ExecConfig&);
template void launch_kernel(const Transfer<PageEndpoint, ViewEndpoint>&, const ExecConfig&);
template void launch_kernel(const Transfer<ViewEndpoint, ViewEndpoint>&, const ExecConfig&);

void memcpy_runs_cuda(const std::vector<Run>&, const ExecConfig&) { no_cuda(); }
void memcpy_pitched_cuda(const std::vector<PitchedRun>&, const ExecConfig&) { no_cuda(); }
bool cuda_batch_memcpy_available() { return false; }
void cuda_set_device(int) { no_cuda(); }
void cuda_event_record(uint64_t, uint64_t) { no_cuda(); }
uint64_t cuda_event_create() { no_cuda(); }
void cuda_event_destroy(uint64_t) {}
void cuda_stream_wait_event(uint64_t, uint64_t) { no_cuda(); }
void cuda_host_register(void*, size_t) { no_cuda(); }
void cuda_host_unregister(void*) { no_cuda(); }
int cuda_device_count() { return 0; }
CudaInfo cuda_info() { return CudaInfo{}; }

}  // namespace dynkv
