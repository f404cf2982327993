// Disk-tier record reads with the interpreter lock released for a whole batch.
//
// The disk tier's I/O threads share the Python process of vLLM's scheduler,
// whose thread stays busy while a disk hit loads: a read that takes the lock
// back after every system call waits for it each time. This reads a batch of
// records (a 4 KiB header into a header buffer, the payload into its
// destination, one preadv each) and checksums the payloads in one call; Python
// checks the headers afterwards.
#pragma once

#include <cstdint>
#include <vector>

namespace dynkv {

struct RecordRead {
  int64_t got = 0;     // bytes read (header + payload); short at end of file
  int err = 0;         // errno of a failed read, else 0
  uint32_t crc32 = 0;  // CRC-32 (zlib's) of the payload, when read whole and checksums are on
};

// What one read_records call cost its thread: wall time in preadv and in checksums, and the thread's
// own getrusage(RUSAGE_THREAD) over the call (CPU time, page faults, context switches). Tells a read
// that waits on the device (little CPU, voluntary switches) from one starved of a core (involuntary
// switches) or busy in the kernel (system time: pinning destination pages).
struct ReadCost {
  int64_t read_ns = 0;
  int64_t crc_ns = 0;
  int64_t user_us = 0;
  int64_t sys_us = 0;
  int64_t minor_faults = 0;
  int64_t voluntary_switches = 0;
  int64_t involuntary_switches = 0;
};

// True when this build checksums payloads (linked with zlib); else crc32 stays 0.
bool record_crc_available();

// Record i: its header_bytes at offsets[i] go to header_base + i * header_bytes, its payload_bytes after
// them to dsts[i]. Records back to back in one file are read with one preadv (up to 64 MiB).
std::vector<RecordRead> read_records(const std::vector<int>& fds, const std::vector<int64_t>& offsets,
                                     uint64_t header_base, int64_t header_bytes, const std::vector<uint64_t>& dsts,
                                     int64_t payload_bytes, bool checksum, ReadCost* cost = nullptr);

}  // namespace dynkv
