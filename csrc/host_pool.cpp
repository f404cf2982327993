#include "dynkv/host_pool.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include "dynkv/check.h"
#include "dynkv/cuda.h"
#include "dynkv/transfer.h"

namespace dynkv {

namespace {

constexpr size_t kOsPage = 4096;
#ifdef MADV_POPULATE_WRITE
constexpr int kMadvPopulateWrite = MADV_POPULATE_WRITE;
#else
constexpr int kMadvPopulateWrite = 23;
#endif

std::string shm_path(const std::string& name) { return "/" + name; }

void check_name(const std::string& name) {
  DYNKV_CHECK(name.size() <= 200 && name.find('/') == std::string::npos && name != "." && name != "..",
              "host pool name '", name, "' is not valid: expected at most 200 characters and no '/'");
}

std::string errno_text(int err) { return std::string(std::strerror(err)); }

}  // namespace

std::unique_ptr<HostPool> HostPool::create(const std::string& name, size_t bytes, bool pin,
                                           size_t chunk_bytes, int threads) {
  DYNKV_CHECK(bytes > 0, "host pool size must be positive, got 0 bytes");
  DYNKV_CHECK(chunk_bytes > 0 && chunk_bytes % kOsPage == 0, "chunk_bytes=", chunk_bytes,
              " is not valid: expected a positive multiple of ", kOsPage);
  DYNKV_CHECK(!pin || cuda_compiled(), "pin=True needs the CUDA ops, and this build has none");
  bytes = (bytes + kOsPage - 1) / kOsPage * kOsPage;
  std::unique_ptr<HostPool> pool(new HostPool());
  pool->bytes_ = bytes;
  pool->chunk_bytes_ = chunk_bytes;
  pool->owner_ = true;
  int fd = -1;
  if (!name.empty()) {
    check_name(name);
    // tmpfs hands out pages lazily: a pool larger than /dev/shm would fault
    // (SIGBUS) mid-run, so refuse it here with the numbers.
    struct statvfs vfs {};
    if (statvfs("/dev/shm", &vfs) == 0) {
      const unsigned long long avail = static_cast<unsigned long long>(vfs.f_bavail) * vfs.f_frsize;
      DYNKV_CHECK(avail >= bytes, "/dev/shm has ", avail, " bytes free but the host pool needs ", bytes,
                  "; enlarge /dev/shm (e.g. docker --shm-size, or mount -o remount,size=...) or lower "
                  "the host tier size");
    }
    fd = shm_open(shm_path(name).c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0 && errno == EEXIST) {
      DYNKV_CHECK(false, "host pool '", name, "' already exists in /dev/shm; attach to it, or remove a stale one "
                  "with dynkv.ops.HostPool.unlink('", name, "')");
    }
    if (fd < 0) DYNKV_FAIL("shm_open('/", name, "') failed: ", errno_text(errno));
    pool->name_ = name;
    if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      const int err = errno;
      ::close(fd);
      shm_unlink(shm_path(name).c_str());
      DYNKV_FAIL("ftruncate of host pool '", name, "' to ", bytes, " bytes failed: ", errno_text(err));
    }
  }
  try {
    pool->map(fd, /*populate=*/true, pin, threads);
  } catch (...) {
    pool->close();
    throw;
  }
  return pool;
}

std::unique_ptr<HostPool> HostPool::attach(const std::string& name, bool pin, size_t chunk_bytes,
                                           int threads) {
  check_name(name);
  DYNKV_CHECK(!name.empty(), "attach needs the name of an existing host pool");
  DYNKV_CHECK(chunk_bytes > 0 && chunk_bytes % kOsPage == 0, "chunk_bytes=", chunk_bytes,
              " is not valid: expected a positive multiple of ", kOsPage);
  DYNKV_CHECK(!pin || cuda_compiled(), "pin=True needs the CUDA ops, and this build has none");
  const int fd = shm_open(shm_path(name).c_str(), O_RDWR, 0600);
  DYNKV_CHECK(fd >= 0, "cannot attach host pool '", name, "': ", errno_text(errno),
              "; the engine's leader creates it before workers attach");
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    DYNKV_FAIL("fstat of host pool '", name, "' failed: ", errno_text(err));
  }
  std::unique_ptr<HostPool> pool(new HostPool());
  pool->name_ = name;
  pool->bytes_ = static_cast<size_t>(st.st_size);
  pool->chunk_bytes_ = chunk_bytes;
  try {
    DYNKV_CHECK(pool->bytes_ > 0, "host pool '", name, "' is empty (its creator failed or is still sizing it)");
    pool->map(fd, /*populate=*/false, pin, threads);
  } catch (...) {
    if (pool->fd_ < 0) ::close(fd);
    pool->close();
    throw;
  }
  return pool;
}

void HostPool::map(int fd, bool populate, bool pin, int threads) {
  fd_ = fd;
  const int flags = fd >= 0 ? MAP_SHARED : (MAP_SHARED | MAP_ANONYMOUS);
  void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, flags, fd, 0);
  if (p == MAP_FAILED) DYNKV_FAIL("mmap of ", bytes_, " bytes for host pool failed: ", errno_text(errno));
  base_ = p;
  madvise(base_, bytes_, MADV_HUGEPAGE);  // a hint; tmpfs may ignore it

  // Each phase spreads pieces of the pool over the threads; the first error wins.
  auto each_piece = [&](size_t piece, auto&& fn) {
    const size_t npieces = (bytes_ + piece - 1) / piece;
    const int nthreads = static_cast<int>(std::max<size_t>(1, std::min<size_t>(std::max(threads, 1), npieces)));
    std::mutex mu;
    std::string error;
    auto work = [&](int tid) {
      for (size_t c = static_cast<size_t>(tid); c < npieces; c += static_cast<size_t>(nthreads)) {
        char* start = static_cast<char*>(base_) + c * piece;
        try {
          fn(c, start, std::min(piece, bytes_ - c * piece));
        } catch (const std::exception& e) {
          std::lock_guard<std::mutex> lk(mu);
          if (error.empty()) error = e.what();
          return;
        }
      }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < nthreads; ++t) pool.emplace_back(work, t);
    work(0);
    for (auto& t : pool) t.join();
    return error;
  };
  using clock = std::chrono::steady_clock;
  if (populate) {
    const auto t0 = clock::now();
    // Small pieces keep every thread busy to the end; 2 MiB keeps them
    // aligned to huge pages where tmpfs uses them.
    const size_t piece = std::max<size_t>(
        2u << 20, (bytes_ / (static_cast<size_t>(std::max(threads, 1)) * 8)) & ~((size_t{2} << 20) - 1));
    const std::string error = each_piece(piece, [](size_t, char* start, size_t len) {
      // MADV_POPULATE_WRITE faults a range in one call and reports a full
      // tmpfs as an error instead of a SIGBUS (Linux >= 5.14). Older kernels
      // get one write per OS page; tmpfs hands back zeroed pages.
      if (madvise(start, len, kMadvPopulateWrite) == 0) return;
      if (errno != EINVAL) DYNKV_FAIL(errno_text(errno), " (is /dev/shm or memory too small?)");
      for (size_t off = 0; off < len; off += kOsPage) start[off] = 0;
    });
    populate_seconds_ = std::chrono::duration<double>(clock::now() - t0).count();
    if (!error.empty()) DYNKV_FAIL("faulting in host pool failed: ", error);
  }
  if (pin) {
    const auto t0 = clock::now();
    registered_.assign((bytes_ + chunk_bytes_ - 1) / chunk_bytes_, nullptr);
    const std::string error = each_piece(chunk_bytes_, [this](size_t c, char* start, size_t len) {
      cuda_host_register(start, len);
      registered_[c] = start;
    });
    pin_seconds_ = std::chrono::duration<double>(clock::now() - t0).count();
    registered_.erase(std::remove(registered_.begin(), registered_.end(), nullptr), registered_.end());
    if (!error.empty()) {
      DYNKV_FAIL("pinning host pool (", bytes_, " bytes in chunks of ", chunk_bytes_, ") failed: ", error);
    }
  }
}

void HostPool::close() {
  for (void* p : registered_) {
    try {
      cuda_host_unregister(p);
    } catch (const std::exception&) {
      // The context may already be gone at interpreter exit; the OS unpins on unmap.
    }
  }
  registered_.clear();
  if (base_ != nullptr) {
    munmap(base_, bytes_);
    base_ = nullptr;
  }
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  if (owner_ && !name_.empty()) {
    shm_unlink(shm_path(name_).c_str());
    owner_ = false;
  }
}

bool HostPool::unlink(const std::string& name) {
  check_name(name);
  return shm_unlink(shm_path(name).c_str()) == 0;
}

HostPool::~HostPool() { close(); }

}  // namespace dynkv
