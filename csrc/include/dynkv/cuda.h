// The CUDA runtime surface the rest of dynkv uses; stubs that raise stand in
// when the extension is built without CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dynkv {

struct DeviceInfo {
  std::string name;
  int compute_capability;
  int num_sms;
  int64_t total_memory;
};

struct CudaInfo {
  int runtime_version = 0;
  int driver_version = 0;
  std::vector<DeviceInfo> devices;
};

bool cuda_batch_memcpy_available();
void cuda_set_device(int device);
// cudaEventRecord of an event created elsewhere (torch), both as integers.
void cuda_event_record(uint64_t event, uint64_t stream);
// Events dynkv owns (no timing), and a stream's wait on one; integers as above.
uint64_t cuda_event_create();
void cuda_event_destroy(uint64_t event);
void cuda_stream_wait_event(uint64_t stream, uint64_t event);
void cuda_host_register(void* ptr, size_t bytes);
void cuda_host_unregister(void* ptr);
int cuda_device_count();
CudaInfo cuda_info();

}  // namespace dynkv
