// Host page pool on POSIX shared memory: every TP rank of one engine maps the
// same pages, so host memory is not multiplied by TP. The creator faults the
// pages in with parallel threads and, with CUDA, pins them in chunks (one huge
// registration is slow and can fail); each attaching process pins its own
// mapping. The creator unlinks the name on close.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dynkv {

class HostPool {
 public:
  // name "" makes an anonymous mapping (one process, or its forked children).
  static std::unique_ptr<HostPool> create(const std::string& name, size_t bytes, bool pin,
                                          size_t chunk_bytes, int threads);
  static std::unique_ptr<HostPool> attach(const std::string& name, bool pin, size_t chunk_bytes,
                                          int threads);
  // Removes a stale name left by a process that died; true if one existed.
  static bool unlink(const std::string& name);

  ~HostPool();
  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  void close();
  uint64_t ptr() const { return reinterpret_cast<uint64_t>(base_); }
  size_t size() const { return bytes_; }
  const std::string& name() const { return name_; }
  bool owner() const { return owner_; }
  bool pinned() const { return !registered_.empty(); }
  size_t chunk_bytes() const { return chunk_bytes_; }
  double populate_seconds() const { return populate_seconds_; }
  double pin_seconds() const { return pin_seconds_; }

 private:
  HostPool() = default;
  void map(int fd, bool populate, bool pin, int threads);

  std::string name_;
  int fd_ = -1;
  void* base_ = nullptr;
  size_t bytes_ = 0;
  size_t chunk_bytes_ = 0;
  bool owner_ = false;
  std::vector<void*> registered_;
  double populate_seconds_ = 0.0;
  double pin_seconds_ = 0.0;
};

}  // namespace dynkv
