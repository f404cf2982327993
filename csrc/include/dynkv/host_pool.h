// Host page pool on shared memory: every TP rank of one engine maps the same
// pages, so host memory is not multiplied by TP. The creator faults the pages
// in with parallel threads and, with CUDA, pins them in chunks (one huge
// registration is slow and can fail); each attaching process pins its own
// mapping.
//
// Three kinds: a memfd (memfd_create; no name anywhere in the file system,
// freed by the kernel once the last process that holds its descriptor or a
// mapping is gone, however it ends), reached by other processes through
// path() = /proc/<creator pid>/fd/<fd>; a named POSIX shm segment in /dev/shm,
// which the creator unlinks on close (a killed creator leaves it behind); and
// an anonymous mapping (one process, or its forked children).
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
  // memfd: name labels a memfd; where the kernel has no memfd_create (ENOSYS,
  // EINVAL) the pool is the named /dev/shm segment instead (memfd() says which).
  static std::unique_ptr<HostPool> create(const std::string& name, size_t bytes, bool pin,
                                          size_t chunk_bytes, int threads, bool memfd = false);
  // name_or_path: a /dev/shm name, or an absolute path (a creator's path(), or
  // a symlink to one) opened with open(2).
  static std::unique_ptr<HostPool> attach(const std::string& name_or_path, bool pin, size_t chunk_bytes,
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
  // Where another process opens the pool: /proc/<pid>/fd/<fd> for a memfd,
  // /dev/shm/<name> for a named segment, the path attached by; "" if anonymous
  // (and for a memfd once closed).
  const std::string& path() const { return path_; }
  bool memfd() const { return memfd_; }
  bool owner() const { return owner_; }
  bool pinned() const { return !registered_.empty(); }
  size_t chunk_bytes() const { return chunk_bytes_; }
  double populate_seconds() const { return populate_seconds_; }
  double pin_seconds() const { return pin_seconds_; }

 private:
  HostPool() = default;
  void map(int fd, bool populate, bool pin, int threads);

  std::string name_;
  std::string path_;
  bool memfd_ = false;
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
