#include "dynkv/crc32c.h"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define DYNKV_CRC32C_X86 1
#endif

namespace dynkv {

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // Castagnoli, bit-reversed

struct Table {
  uint32_t t[256];
  Table() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ kPoly : c >> 1;
      t[i] = c;
    }
  }
};

const Table& table() {
  static const Table tab;
  return tab;
}

// Raw (not pre/post inverted) CRC state over bytes.
uint32_t sw_update(uint32_t c, const uint8_t* p, size_t n) {
  const uint32_t* t = table().t;
  for (size_t i = 0; i < n; ++i) c = t[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c;
}

// a * b modulo the polynomial, in the bit-reversed representation (x^0 is the top bit).
uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = b & 1 ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

// x^(8 n) modulo the polynomial: shifts a CRC past n zero bytes.
uint32_t x8nmodp(uint64_t n) {
  uint32_t result = 1u << 31, sq = 1u << 23;  // 1, and x^8
  while (n) {
    if (n & 1) result = multmodp(sq, result);
    sq = multmodp(sq, sq);
    n >>= 1;
  }
  return result;
}

// x^(8 n) for the stripe length of the last call on this thread: pages of one size share it.
uint32_t shift_of(uint64_t n) {
  thread_local uint64_t last_n = 0;
  thread_local uint32_t last = 1u << 31;
  if (n != last_n) {
    last = x8nmodp(n);
    last_n = n;
  }
  return last;
}

#if defined(DYNKV_CRC32C_X86)
__attribute__((target("sse4.2"))) uint32_t hw_update(uint32_t c, const uint8_t* p, size_t n) {
  uint64_t c64 = c;
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c64 = _mm_crc32_u64(c64, w);
  }
  c = static_cast<uint32_t>(c64);
  for (; n; ++p, --n) c = _mm_crc32_u8(c, *p);
  return c;
}

// Three stripes at once: the instruction's latency hidden behind the other two streams. The first
// stripe takes the bytes left over (under 24) in front, so the three CRCs join with one shift:
// crc(A B C) = (crc(A) x^8|B| + crc(B)) x^8|C| + crc(C), with |B| = |C|.
__attribute__((target("sse4.2"))) uint32_t hw_crc32c(uint32_t crc, const uint8_t* p, size_t n) {
  constexpr size_t kMinStriped = 3 * 1024;  // below, joining costs more than it saves
  if (n < kMinStriped) return ~hw_update(~crc, p, n);
  const size_t s = n / 24 * 8;  // stripe bytes, a multiple of 8
  const size_t lead = n - 3 * s;
  uint64_t c0 = hw_update(~crc, p, lead), c1 = 0xFFFFFFFFu, c2 = 0xFFFFFFFFu;
  const uint8_t* p0 = p + lead;
  const uint8_t* p1 = p0 + s;
  const uint8_t* p2 = p1 + s;
  for (size_t i = 0; i < s; i += 8) {
    uint64_t w0, w1, w2;
    std::memcpy(&w0, p0 + i, 8);
    std::memcpy(&w1, p1 + i, 8);
    std::memcpy(&w2, p2 + i, 8);
    c0 = _mm_crc32_u64(c0, w0);
    c1 = _mm_crc32_u64(c1, w1);
    c2 = _mm_crc32_u64(c2, w2);
  }
  const uint32_t shift = shift_of(s);
  const uint32_t r01 = multmodp(shift, ~static_cast<uint32_t>(c0)) ^ ~static_cast<uint32_t>(c1);
  return multmodp(shift, r01) ^ ~static_cast<uint32_t>(c2);
}

bool has_sse42() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}
#endif

}  // namespace

uint32_t crc32c(uint32_t crc, const uint8_t* data, size_t n) {
#if defined(DYNKV_CRC32C_X86)
  if (has_sse42()) return hw_crc32c(crc, data, n);
#endif
  return ~sw_update(~crc, data, n);
}

bool crc32c_hardware() {
#if defined(DYNKV_CRC32C_X86)
  return has_sse42();
#else
  return false;
#endif
}

}  // namespace dynkv
