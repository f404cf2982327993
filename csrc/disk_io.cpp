#include "dynkv/disk_io.h"

#include <sys/uio.h>

#include <cerrno>

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

// preadv until both buffers are full, end of file, or an error other than EINTR.
RecordRead read_one(int fd, int64_t offset, char* header, int64_t header_bytes, char* dst, int64_t payload_bytes) {
  RecordRead r;
  const int64_t want = header_bytes + payload_bytes;
  while (r.got < want) {
    iovec iov[2];
    int n = 0;
    if (r.got < header_bytes) {
      iov[n++] = {header + r.got, static_cast<size_t>(header_bytes - r.got)};
      iov[n++] = {dst, static_cast<size_t>(payload_bytes)};
    } else {
      const int64_t done = r.got - header_bytes;
      iov[n++] = {dst + done, static_cast<size_t>(payload_bytes - done)};
    }
    const ssize_t got = preadv(fd, iov, n, offset + r.got);
    if (got < 0) {
      if (errno == EINTR) continue;
      r.err = errno;
      return r;
    }
    if (got == 0) return r;  // end of file: a short record
    r.got += got;
  }
  return r;
}

}  // namespace

std::vector<RecordRead> read_records(const std::vector<int>& fds, const std::vector<int64_t>& offsets,
                                     uint64_t header_base, int64_t header_bytes, const std::vector<uint64_t>& dsts,
                                     int64_t payload_bytes, bool checksum) {
  DYNKV_CHECK(fds.size() == offsets.size() && fds.size() == dsts.size(), "length mismatch: ", fds.size(),
              " files, ", offsets.size(), " offsets, ", dsts.size(), " destinations");
  DYNKV_CHECK(header_bytes > 0 && payload_bytes > 0, "header_bytes=", header_bytes, " payload_bytes=",
              payload_bytes, ": expected both > 0");
  DYNKV_CHECK(header_base != 0 || fds.empty(), "header buffer pointer is null");
  std::vector<RecordRead> out(fds.size());
  for (size_t i = 0; i < fds.size(); ++i) {
    DYNKV_CHECK(dsts[i] != 0, "destination ", i, " is null");
    char* header = reinterpret_cast<char*>(header_base + i * static_cast<uint64_t>(header_bytes));
    char* dst = reinterpret_cast<char*>(dsts[i]);
    out[i] = read_one(fds[i], offsets[i], header, header_bytes, dst, payload_bytes);
#if defined(DYNKV_HAVE_ZLIB)
    if (checksum && out[i].err == 0 && out[i].got == header_bytes + payload_bytes) {
      out[i].crc32 = static_cast<uint32_t>(
          crc32_z(crc32_z(0L, Z_NULL, 0), reinterpret_cast<const Bytef*>(dst), static_cast<z_size_t>(payload_bytes)));
    }
#else
    (void)checksum;
#endif
  }
  return out;
}

}  // namespace dynkv
