#include "dynkv/host_pool.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
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

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif

// A memfd labelled `label`; -1 with errno set where it fails (ENOSYS or EINVAL
// on a kernel without memfd_create, or a glibc built before it).
int open_memfd(const std::string& label) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 27))
  return memfd_create(label.c_str(), MFD_CLOEXEC);
#elif defined(SYS_memfd_create)
  return static_cast<int>(syscall(SYS_memfd_create, label.c_str(), MFD_CLOEXEC));
#else
  errno = ENOSYS;
  return -1;
#endif
}

// MemAvailable of /proc/meminfo in bytes; nothing where it cannot be read.
std::optional<unsigned long long> mem_available() {
  std::ifstream f("/proc/meminfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::istringstream is(line.substr(13));
    unsigned long long kib = 0;
    if (is >> kib) return kib * 1024;
    break;
  }
  return std::nullopt;
}

// A memfd's pages are the kernel's shared memory, outside /dev/shm's size
// limit: refuse a pool larger than the memory the machine has to give.
void check_mem_available(size_t bytes) {
  const auto avail = mem_available();
  if (!avail) return;
  DYNKV_CHECK(*avail >= bytes, "the host pool needs ", bytes, " bytes but this machine has ", *avail,
              " bytes available (MemAvailable in /proc/meminfo); lower the host tier size or free memory");
}

}  // namespace

std::unique_ptr<HostPool> HostPool::create(const std::string& name, size_t bytes, bool pin,
                                           size_t chunk_bytes, int threads, bool memfd) {
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
  if (memfd) {
    DYNKV_CHECK(!name.empty(), "a memfd host pool needs a name: it labels the memfd, and names the /dev/shm "
                "segment used instead where the kernel has no memfd_create");
    check_name(name);
    check_mem_available(bytes);
    fd = open_memfd(name);
    if (fd < 0 && errno != ENOSYS && errno != EINVAL) {
      DYNKV_FAIL("memfd_create('", name, "') failed: ", errno_text(errno));
    }
    if (fd >= 0) {
      pool->name_ = name;
      pool->path_ = "/proc/" + std::to_string(getpid()) + "/fd/" + std::to_string(fd);
      pool->memfd_ = true;
      if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        const int err = errno;
        ::close(fd);
        DYNKV_FAIL("ftruncate of host pool '", name, "' (memfd) to ", bytes, " bytes failed: ", errno_text(err));
      }
    }
  }
  if (fd < 0 && !name.empty()) {
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
    pool->path_ = "/dev/shm/" + name;
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
  // An absolute path goes through open(2): glibc's shm_open adds O_NOFOLLOW,
  // and a memfd is reached through a /proc/<pid>/fd link.
  const bool by_path = !name.empty() && name[0] == '/';
  if (by_path) {
    DYNKV_CHECK(name.size() < PATH_MAX, "host pool path of ", name.size(), " characters is not valid: expected "
                "fewer than ", PATH_MAX);
  } else {
    check_name(name);
  }
  DYNKV_CHECK(!name.empty(), "attach needs the name or path of an existing host pool");
  DYNKV_CHECK(chunk_bytes > 0 && chunk_bytes % kOsPage == 0, "chunk_bytes=", chunk_bytes,
              " is not valid: expected a positive multiple of ", kOsPage);
  DYNKV_CHECK(!pin || cuda_compiled(), "pin=True needs the CUDA ops, and this build has none");
  const int fd = by_path ? open(name.c_str(), O_RDWR | O_CLOEXEC) : shm_open(shm_path(name).c_str(), O_RDWR, 0600);
  if (fd < 0) {
    const int err = errno;
    DYNKV_CHECK(false, "cannot attach host pool '", name, "': ", errno_text(err),
                "; the engine's leader creates it before workers attach",
                by_path && err == EACCES ? " (a memfd pool opens only for processes that may read its creator's "
                                           "/proc/<pid>/fd: the same user)" : "");
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    DYNKV_FAIL("fstat of host pool '", name, "' failed: ", errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    DYNKV_CHECK(false, "'", name, "' is not a host pool: expected a memfd or a shared-memory file, found no "
                "regular file; pass a pool's path (HostPool.path) or /dev/shm name");
  }
  std::unique_ptr<HostPool> pool(new HostPool());
  pool->name_ = name;
  pool->path_ = by_path ? name : "/dev/shm/" + name;
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
      if (errno != EINVAL) DYNKV_FAIL(errno_text(errno), " (is memory, or /dev/shm, too small?)");
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
  if (memfd_) path_.clear();  // the fd number is free for another file now
  if (owner_ && !memfd_ && !name_.empty()) {  // a memfd has no name to unlink
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
