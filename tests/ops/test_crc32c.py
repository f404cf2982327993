"""``dynkv.ops.crc32c``: the standard CRC-32C of any contiguous buffer, in one call or in pieces."""

from __future__ import annotations

import numpy as np
import pytest

from dynkv import _C
from dynkv.ops import crc32c, crc32c_hardware

PATHS = list(range(_C.crc32c_level() + 1))  # 0 table, 1 CRC-32C instruction, 2 folding: those this CPU has


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
    assert crc32c_hardware() == (len(PATHS) > 1)
    print("crc32c paths on this CPU:", PATHS)


# The instruction: one stream under 3 KiB, above three stripes and a lead of 0-23 bytes (every lead length).
# Folding: from 1 KiB by 256 bytes, then a tail of 0-255 bytes (every tail length). Odd sizes.
SIZES = [1, 7, 8, 9, 63, 255, 256, 257, 1023, 1024, 3071, 3072, 3073, *(24 * 200 + k for k in range(24)),
         *(2048 + k for k in range(1, 256, 2)), 2048, 2048 + 254, 12 * 1024 + 40, 65537]


@pytest.mark.parametrize("n", SIZES)
def test_equals_the_bytewise_definition(n: int, rng: np.random.Generator) -> None:
    data = rng.integers(0, 256, n, dtype=np.uint8)
    want = reference(data.tobytes())
    assert crc32c(data) == want
    assert crc32c(memoryview(data.tobytes())) == want
    cut = int(rng.integers(0, n + 1))
    assert crc32c(data[cut:], crc32c(data[:cut])) == want  # in two pieces
    for path in PATHS:
        assert _C.crc32c_with(path, data.tobytes()) == want, f"path {path}"
        assert _C.crc32c_with(path, data[cut:].tobytes(), _C.crc32c_with(path, data[:cut].tobytes())) == want


def test_a_path_the_cpu_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="not available on this CPU"):
        _C.crc32c_with(PATHS[-1] + 1, b"x")


def test_one_flipped_bit_changes_it(rng: np.random.Generator) -> None:
    data = rng.integers(0, 256, 512 * 1024, dtype=np.uint8)
    before = crc32c(data)
    assert all(_C.crc32c_with(path, data.tobytes()) == before for path in PATHS)
    for pos in [0, 1, 255, 256, data.size - 1, *rng.integers(0, data.size, 8)]:
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
