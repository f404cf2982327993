#include "dynkv/disk_io.h"

#include <sys/resource.h>
#include <sys/uio.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <climits>

#include "dynkv/check.h"

#if defined(DYNKV_HAVE_ZLIB)
#include <zlib.h>
#endif

namespace dynkv {

bool record_crc_available() {
#if defined(DYNKV_HAVE_ZLIB)
  return true;
#else
  return false;
#endif
}

namespace {

// Records read in one request at most: adjacent records coalesce into reads of up to 64 MiB, the size
// dd streams at; every record still lands in its own header slot and destination.
constexpr int64_t kMaxRequestBytes = int64_t{64} << 20;

// preadv of iov[0..n) from `offset` until full, end of file, or an error other than EINTR; bytes read.
int64_t read_all(int fd, std::vector<iovec> iov, int64_t offset, int* err) {
  int64_t total = 0;
  size_t first = 0;
  while (first < iov.size()) {
    const int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    const ssize_t got = preadv(fd, iov.data() + first, count, offset + total);
    if (got < 0) {
      if (errno == EINTR) continue;
      *err = errno;
      return total;
    }
    if (got == 0) return total;  // end of file: the last records are short
    total += got;
    for (size_t left = static_cast<size_t>(got); left > 0 && first < iov.size();) {
      const size_t take = std::min(left, iov[first].iov_len);
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + take;
      iov[first].iov_len -= take;
      left -= take;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  return total;
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

rusage thread_usage() {
  rusage u{};
#if defined(RUSAGE_THREAD)
  getrusage(RUSAGE_THREAD, &u);
#endif
  return u;
}

int64_t micros(const timeval& t) { return int64_t{t.tv_sec} * 1000000 + t.tv_usec; }

}  // namespace

std::vector<RecordRead> read_records(const std::vector<int>& fds, const std::vector<int64_t>& offsets,
                                     uint64_t header_base, int64_t header_bytes, const std::vector<uint64_t>& dsts,
                                     int64_t payload_bytes, bool checksum, ReadCost* cost) {
  DYNKV_CHECK(fds.size() == offsets.size() && fds.size() == dsts.size(), "length mismatch: ", fds.size(),
              " files, ", offsets.size(), " offsets, ", dsts.size(), " destinations");
  DYNKV_CHECK(header_bytes > 0 && payload_bytes > 0, "header_bytes=", header_bytes, " payload_bytes=",
              payload_bytes, ": expected both > 0");
  DYNKV_CHECK(header_base != 0 || fds.empty(), "header buffer pointer is null");
  for (size_t i = 0; i < dsts.size(); ++i) DYNKV_CHECK(dsts[i] != 0, "destination ", i, " is null");
  const int64_t record = header_bytes + payload_bytes;
  const size_t per_request = static_cast<size_t>(std::max<int64_t>(1, kMaxRequestBytes / record));
  std::vector<RecordRead> out(fds.size());
  const rusage before = cost != nullptr ? thread_usage() : rusage{};
  int64_t read_ns = 0, crc_ns = 0;
  for (size_t i = 0; i < fds.size();) {
    // records i..j-1: one file, back to back
    size_t j = i + 1;
    while (j < fds.size() && j - i < per_request && fds[j] == fds[i] &&
           offsets[j] == offsets[j - 1] + record)
      ++j;
    std::vector<iovec> iov;
    iov.reserve(2 * (j - i));
    for (size_t k = i; k < j; ++k) {
      iov.push_back({reinterpret_cast<char*>(header_base + k * static_cast<uint64_t>(header_bytes)),
                     static_cast<size_t>(header_bytes)});
      iov.push_back({reinterpret_cast<char*>(dsts[k]), static_cast<size_t>(payload_bytes)});
    }
    int err = 0;
    const int64_t t0 = now_ns();
    const int64_t total = read_all(fds[i], std::move(iov), offsets[i], &err);
    const int64_t t1 = now_ns();
    read_ns += t1 - t0;
    for (size_t k = i; k < j; ++k) {
      RecordRead& r = out[k];
      r.got = std::clamp<int64_t>(total - static_cast<int64_t>(k - i) * record, 0, record);
      if (r.got < record) r.err = err;  // a record the failed read did not complete
#if defined(DYNKV_HAVE_ZLIB)
      if (checksum && r.err == 0 && r.got == record) {
        r.crc32 = static_cast<uint32_t>(crc32_z(crc32_z(0L, Z_NULL, 0), reinterpret_cast<const Bytef*>(dsts[k]),
                                                static_cast<z_size_t>(payload_bytes)));
      }
#else
      (void)checksum;
#endif
    }
    crc_ns += now_ns() - t1;
    i = j;
  }
  if (cost != nullptr) {
    const rusage after = thread_usage();
    cost->read_ns = read_ns;
    cost->crc_ns = crc_ns;
    cost->user_us = micros(after.ru_utime) - micros(before.ru_utime);
    cost->sys_us = micros(after.ru_stime) - micros(before.ru_stime);
    cost->minor_faults = after.ru_minflt - before.ru_minflt;
    cost->voluntary_switches = after.ru_nvcsw - before.ru_nvcsw;
    cost->involuntary_switches = after.ru_nivcsw - before.ru_nivcsw;
  }
  return out;
}

}  // namespace dynkv
