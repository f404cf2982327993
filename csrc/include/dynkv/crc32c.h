// CRC-32C (Castagnoli; iSCSI, ext4) of a buffer: the shared tier's page checksum.
//
// zlib's CRC-32 runs at 1-4 GB/s a core; a store that moves pages by memcpy
// runs at 6-12, so a check that slow is most of a shared-tier read. Where the
// CPU has AVX-512 carry-less multiplies (VPCLMULQDQ), buffers from 1 KiB are
// folded 256 bytes a step (about 55 GB/s at 512 KiB on the development VM).
// Else CRC-32C's own instruction (SSE4.2): one 8-byte step a cycle when three
// independent streams keep it busy (its latency is three cycles); the buffer is
// cut into three stripes, checksummed side by side, and the three CRCs joined
// (28 GB/s there). Without either, a table does it a byte at a time. Every
// way gives the standard CRC-32C.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dynkv {

// Standard CRC-32C of data[0, n) continued from `crc` (0 for a fresh one; a
// previous result to checksum a buffer in pieces).
uint32_t crc32c(uint32_t crc, const uint8_t* data, size_t n);

// Whether crc32c() uses the CPU's instructions (else a table: ~10x slower).
bool crc32c_hardware();

// The fastest way this CPU has: 2 carry-less multiplies on 512-bit vectors (AVX-512 VPCLMULQDQ)
// from 1 KiB up, 1 the CRC-32C instruction (SSE4.2), 0 the table.
int crc32c_level();

// crc32c() the given way (0 to crc32c_level()), for tests that check every way against the others.
uint32_t crc32c_with(int path, uint32_t crc, const uint8_t* data, size_t n);

}  // namespace dynkv
