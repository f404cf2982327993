// CRC-32C (Castagnoli; iSCSI, ext4) of a buffer: the shared tier's page checksum.
//
// zlib's CRC-32 runs at 1-4 GB/s a core; a store that moves pages by memcpy
// runs at 6-12, so a check that slow is most of a shared-tier read. CRC-32C has
// an instruction on x86-64 (SSE4.2): one 8-byte step a cycle when three
// independent streams keep it busy (its latency is three cycles). The buffer is
// cut into three stripes, checksummed side by side, and the three CRCs joined
// into the CRC of the whole (the same value a byte-at-a-time CRC-32C gives).
// Without the instruction, a table does it a byte at a time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dynkv {

// Standard CRC-32C of data[0, n) continued from `crc` (0 for a fresh one; a
// previous result to checksum a buffer in pieces).
uint32_t crc32c(uint32_t crc, const uint8_t* data, size_t n);

// Whether crc32c() uses the CPU's instruction (else a table: ~10x slower).
bool crc32c_hardware();

}  // namespace dynkv
