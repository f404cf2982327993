#include "dynkv/crc32c.h"

#include <algorithm>
#include <cstring>

#include "dynkv/check.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
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

#if defined(DYNKV_CRC32C_X86)
// Joining CRCs (the stripes, the folds): arithmetic modulo the polynomial.

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

// x^e modulo the polynomial.
uint32_t xnmodp(uint64_t e) {
  uint32_t result = 1u << 31, sq = 1u << 30;  // 1, and x
  while (e) {
    if (e & 1) result = multmodp(sq, result);
    sq = multmodp(sq, sq);
    e >>= 1;
  }
  return result;
}

// x^(8 n) modulo the polynomial: shifts a CRC past n zero bytes.
uint32_t x8nmodp(uint64_t n) { return xnmodp(8 * n); }

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

// Folding with carry-less multiplies, 256 bytes a step in four 512-bit accumulators (each 128-bit
// lane a running remainder): a 128-bit block B at bit distance D before block C becomes
// lo64(B) * x^(D+31) + hi64(B) * x^(D-33) + C (bit-reflected, as the CRC's data is), the same
// remainder; the last 16 bytes and the tail go through the CRC instruction. n >= 256.
struct FoldKeys {
  uint64_t k2048[2], k512[2], k128[2];
  FoldKeys() {
    const uint64_t d[3] = {2048, 512, 128};
    uint64_t* out[3] = {k2048, k512, k128};
    for (int i = 0; i < 3; ++i) {
      out[i][0] = xnmodp(d[i] + 31);
      out[i][1] = xnmodp(d[i] - 33);
    }
  }
};

const FoldKeys& fold_keys() {
  static const FoldKeys keys;
  return keys;
}

__attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2"))) inline __m512i fold512(__m512i a, __m512i k, __m512i next) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(a, k, 0x00), _mm512_clmulepi64_epi128(a, k, 0x11), next,
                                   0x96);  // a ^ b ^ c
}

__attribute__((target("pclmul,sse4.2"))) inline __m128i fold128(__m128i a, __m128i k, __m128i next) {
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k, 0x00), _mm_clmulepi64_si128(a, k, 0x11)), next);
}

__attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2"))) uint32_t fold_crc32c(uint32_t crc, const uint8_t* p,
                                                                                  size_t n) {
  if (n < 256) return hw_crc32c(crc, p, n);
  const FoldKeys& keys = fold_keys();
  const __m512i k2048 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keys.k2048)));
  const __m512i k512 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keys.k512)));
  const __m128i k128 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys.k128));
  // The CRC's starting value goes into the first 4 bytes: the rest starts from 0.
  __m512i a0 = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(~crc))));
  __m512i a1 = _mm512_loadu_si512(p + 64), a2 = _mm512_loadu_si512(p + 128), a3 = _mm512_loadu_si512(p + 192);
  p += 256;
  n -= 256;
  for (; n >= 256; p += 256, n -= 256) {
    a0 = fold512(a0, k2048, _mm512_loadu_si512(p));
    a1 = fold512(a1, k2048, _mm512_loadu_si512(p + 64));
    a2 = fold512(a2, k2048, _mm512_loadu_si512(p + 128));
    a3 = fold512(a3, k2048, _mm512_loadu_si512(p + 192));
  }
  a1 = fold512(a0, k512, a1);
  a2 = fold512(a1, k512, a2);
  a3 = fold512(a2, k512, a3);
  __m128i r = _mm512_extracti32x4_epi32(a3, 0);
  r = fold128(r, k128, _mm512_extracti32x4_epi32(a3, 1));
  r = fold128(r, k128, _mm512_extracti32x4_epi32(a3, 2));
  r = fold128(r, k128, _mm512_extracti32x4_epi32(a3, 3));
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(r)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(r, 1)));
  return ~hw_update(static_cast<uint32_t>(c), p, n);
}

bool has_fold() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq") &&
                          __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.2");
  return yes;
}

bool has_sse42() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}
#endif

}  // namespace

int crc32c_level() {
#if defined(DYNKV_CRC32C_X86)
  if (has_fold()) return 2;
  if (has_sse42()) return 1;
#endif
  return 0;
}

uint32_t crc32c_with(int path, uint32_t crc, const uint8_t* data, size_t n) {
  DYNKV_CHECK(path >= 0 && path <= crc32c_level(), "crc32c: path ", path, " is not available on this CPU (0 to ",
              crc32c_level(), ")");
#if defined(DYNKV_CRC32C_X86)
  if (path == 2) return fold_crc32c(crc, data, n);
  if (path == 1) return hw_crc32c(crc, data, n);
#endif
  return ~sw_update(~crc, data, n);
}

uint32_t crc32c(uint32_t crc, const uint8_t* data, size_t n) {
  const int level = crc32c_level();
  return crc32c_with(n >= 1024 ? level : std::min(level, 1), crc, data, n);
}

bool crc32c_hardware() { return crc32c_level() > 0; }

}  // namespace dynkv
