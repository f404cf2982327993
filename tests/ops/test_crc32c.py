"""``dynkv.ops.crc32c``: the standard CRC-32C of any contiguous buffer, in one call or in pieces."""

from __future__ import annotations

import numpy as np
import pytest

from dynkv.ops import crc32c, crc32c_hardware


def _table() -> list[int]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return out


TABLE = _table()


def reference(data: bytes, crc: int = 0) -> int:
    """CRC-32C a byte at a time (RFC 3720's definition)."""
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def test_known_values() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(bytes(range(32))) == 0x46DD794E  # RFC 3720 B.4: ascending bytes
    assert isinstance(crc32c_hardware(), bool)


# Under 3 KiB one stream; above, three stripes and a lead of 0-23 bytes: every lead length, odd sizes.
SIZES = [1, 7, 8, 9, 63, 3071, 3072, 3073, *(24 * 200 + k for k in range(24)), 12 * 1024 + 40, 65537]


@pytest.mark.parametrize("n", SIZES)
def test_equals_the_bytewise_definition(n: int, rng: np.random.Generator) -> None:
    data = rng.integers(0, 256, n, dtype=np.uint8)
    want = reference(data.tobytes())
    assert crc32c(data) == want
    assert crc32c(memoryview(data.tobytes())) == want
    cut = int(rng.integers(0, n + 1))
    assert crc32c(data[cut:], crc32c(data[:cut])) == want  # in two pieces


def test_one_flipped_bit_changes_it(rng: np.random.Generator) -> None:
    data = rng.integers(0, 256, 512 * 1024, dtype=np.uint8)
    before = crc32c(data)
    for pos in rng.integers(0, data.size, 8):
        bit = np.uint8(1 << int(rng.integers(0, 8)))
        data[pos] ^= bit
        assert crc32c(data) != before
        data[pos] ^= bit
    assert crc32c(data) == before


def test_a_non_contiguous_buffer_is_refused() -> None:
    a = np.zeros((4, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="contiguous buffer.*ndarray"):
        crc32c(a[:, ::2])
    with pytest.raises(ValueError, match="contiguous buffer.*str"):
        crc32c("not a buffer")
