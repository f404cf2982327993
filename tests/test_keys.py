"""Page keys: stable across processes, sensitive to every input, chained, pinned by a known answer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from dynkv.keys import (
    KEY_BYTES,
    PAGE_FORMAT_VERSION,
    ModelFingerprint,
    block_keys,
    encode_extra,
    key_from_hex,
    key_hex,
)

BS = 16
FP = ModelFingerprint("meta-llama/Llama-3.1-8B", "bfloat16", 32, 8, 128, BS)

# Computed once by this module's encoding; a change here means every stored
# page key changes: bump PAGE_FORMAT_VERSION (and say so) rather than edit this.
KNOWN_FP_DIGEST = "8b6261dd36bf74602f7c1e1bc3c81d49"
KNOWN_KEYS = [
    "2b7c3e3637b1ef45dd9e1ef768e00b0c",
    "7d41179626796387aff7d732148a4690",
]


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, 128_000, size=n).tolist()


def test_known_answer() -> None:
    fp = ModelFingerprint("dynkv/known-answer", "bfloat16", 2, 4, 64, 4, page_format_version=1)
    keys = block_keys(fp, list(range(9)), 4, extra_keys=[None, ("lora-a", 7, b"\x01", ("mm", 0))])
    assert key_hex(fp.digest()) == KNOWN_FP_DIGEST
    assert [key_hex(k) for k in keys] == KNOWN_KEYS


def test_encoding_as_documented() -> None:
    # Rebuild the first two keys from the written spec, independently of block_keys.
    fp = ModelFingerprint("m", "float16", 1, 1, 8, 2)
    extra = ("lora", 3)

    def h(*parts: bytes) -> bytes:
        d = hashlib.blake2b(digest_size=16, person=b"dynkv.block")
        for p in parts:
            d.update(p)
        return d.digest()

    enc_lora = b"S" + struct.pack("<I", 4) + b"lora"
    enc_extra = b"L" + struct.pack("<I", 2) + enc_lora + b"I" + struct.pack("<I", 1) + b"\x03"
    k0 = h(fp.digest(), struct.pack("<2I", 5, 70000), b"N")
    k1 = h(k0, struct.pack("<2I", 2**32 - 1, 0), enc_extra)
    assert block_keys(fp, [5, 70000, 2**32 - 1, 0], 2, [None, extra]) == [k0, k1]


def test_same_keys_in_another_process(rng: np.random.Generator) -> None:
    tokens = _tokens(rng, 10 * BS + 3)
    extra = [None] * 5 + [("salt", i) for i in range(5)]
    here = [k.hex() for k in block_keys(FP, tokens, BS, extra)]
    script = (
        "import json, sys\n"
        "from dynkv.keys import ModelFingerprint, block_keys\n"
        "a = json.loads(sys.stdin.read())\n"
        "fp = ModelFingerprint(*a['fp'])\n"
        "extra = [None if e is None else tuple(e) for e in a['extra']]\n"
        "print(json.dumps([k.hex() for k in block_keys(fp, a['tokens'], a['bs'], extra)]))\n"
    )
    fp_fields = [getattr(FP, f.name) for f in dataclasses.fields(FP)]
    payload = json.dumps({"fp": fp_fields, "tokens": tokens, "bs": BS, "extra": extra})
    for hash_seed in ("0", "12345"):  # Python's hash() salt must not matter
        out = subprocess.run(
            [sys.executable, "-c", script],
            input=payload,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert json.loads(out.stdout) == here


def test_keys_are_16_bytes_and_deterministic(rng: np.random.Generator) -> None:
    tokens = _tokens(rng, 5 * BS)
    a = block_keys(FP, tokens, BS)
    b = block_keys(FP, list(tokens), BS)
    assert a == b
    assert len(a) == 5 and all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in a)
    assert len(set(a)) == 5


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint16])
def test_numpy_input_matches_list(rng: np.random.Generator, dtype: type) -> None:
    tokens = rng.integers(0, 60_000, size=7 * BS + 5)
    assert block_keys(FP, tokens.astype(dtype), BS) == block_keys(FP, tokens.tolist(), BS)


@pytest.mark.parametrize("blocks", [1, 3, 300 // BS + 1])
def test_short_and_long_lists_key_alike(rng: np.random.Generator, blocks: int) -> None:
    """Short lists (a decode step's blocks) are packed without numpy; every input form keys the same."""
    tokens = rng.integers(0, 2**32, size=blocks * BS + 3, dtype=np.uint64)
    tokens[0] = 2**32 - 1
    as_list = [int(t) for t in tokens]
    want = block_keys(FP, tokens.astype(np.uint32), BS)
    assert block_keys(FP, as_list, BS) == want
    assert block_keys(FP, [np.int64(t) for t in as_list], BS) == want
    assert block_keys(FP, tokens, BS) == want


@pytest.mark.parametrize("n", [BS, 300])
@pytest.mark.parametrize("bad", [-1, 2**32, 1.5])
def test_out_of_range_ids_fail_in_short_and_long_lists(n: int, bad: object) -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)|expected integers"):
        block_keys(FP, [bad] + [0] * (n - 1), BS)


def test_partial_trailing_block_gets_no_key(rng: np.random.Generator) -> None:
    tokens = _tokens(rng, 3 * BS)
    full = block_keys(FP, tokens, BS)
    assert block_keys(FP, tokens[:-1], BS) == full[:2]
    assert block_keys(FP, tokens + [1, 2, 3], BS) == full
    assert block_keys(FP, tokens[: BS - 1], BS) == []
    assert block_keys(FP, [], BS) == []


def test_any_token_change_changes_its_block_and_all_later(rng: np.random.Generator) -> None:
    tokens = _tokens(rng, 6 * BS)
    base = block_keys(FP, tokens, BS)
    for pos in rng.choice(len(tokens), size=12, replace=False):
        changed = list(tokens)
        changed[pos] = (changed[pos] + 1) % 128_000
        keys = block_keys(FP, changed, BS)
        b = pos // BS
        assert keys[:b] == base[:b]
        assert all(k != o for k, o in zip(keys[b:], base[b:]))


def test_changing_block_zero_changes_every_key(rng: np.random.Generator) -> None:
    tokens = _tokens(rng, 8 * BS)
    changed = [tokens[0] + 1] + tokens[1:]
    assert not set(block_keys(FP, tokens, BS)) & set(block_keys(FP, changed, BS))


def test_block_boundary_matters() -> None:
    # The same tokens split into blocks differently (another fingerprint's
    # block size) must not produce the same keys.
    fp8 = dataclasses.replace(FP, block_size=8)
    tokens = list(range(32))
    k16 = block_keys(FP, tokens, 16)
    k8 = block_keys(fp8, tokens, 8)
    assert not set(k16) & set(k8)
    assert k16[0] not in block_keys(fp8, tokens[:16], 8)


def test_chain_extends_with_parent(rng: np.random.Generator) -> None:
    tokens = _tokens(rng, 7 * BS + 2)
    extra = [("x", i) for i in range(7)]
    whole = block_keys(FP, tokens, BS, extra)
    head = block_keys(FP, tokens[: 3 * BS], BS, extra[:3])
    tail = block_keys(FP, tokens[3 * BS :], BS, extra[3:], parent=head[-1])
    assert head + tail == whole


def test_fingerprint_fields_all_matter(rng: np.random.Generator) -> None:
    tokens = _tokens(rng, 2 * BS)
    changes = {
        "model_id": "meta-llama/Llama-3.1-8B-Instruct",
        "dtype": "float16",
        "num_layers": 31,
        "num_kv_heads": 4,
        "head_size": 64,
        "page_format_version": PAGE_FORMAT_VERSION + 1,
    }
    digests = {FP.digest()}
    first = {block_keys(FP, tokens, BS)[0]}
    for name, value in changes.items():
        fp = dataclasses.replace(FP, **{name: value})
        digests.add(fp.digest())
        first.add(block_keys(fp, tokens, BS)[0])
    assert len(digests) == len(changes) + 1
    assert len(first) == len(changes) + 1


def test_fingerprint_normalizes_torch_dtype() -> None:
    torch = pytest.importorskip("torch")
    fp = ModelFingerprint("m", torch.bfloat16, 2, 2, 64, 16)  # type: ignore[arg-type]
    assert fp.dtype == "bfloat16"
    assert fp.digest() == ModelFingerprint("m", "bfloat16", 2, 2, 64, 16).digest()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (None, ()),
        (("ab", "c"), ("a", "bc")),
        (("a",), "a"),
        ((1,), ("1",)),
        ((True,), (1,)),
        ((b"a",), ("a",)),
        ((0,), (None,)),
        ((-1,), (255,)),
        ((("a", "b"),), ("a", "b")),
        (("lora", 1), ("lora", 1, None)),
        (("", ""), ("",)),
    ],
)
def test_extra_keys_are_unambiguous(rng: np.random.Generator, a: object, b: object) -> None:
    assert encode_extra(a) != encode_extra(b)
    tokens = _tokens(rng, 2 * BS)
    ka = block_keys(FP, tokens, BS, [None, a])
    kb = block_keys(FP, tokens, BS, [None, b])
    assert ka[0] == kb[0] and ka[1] != kb[1]


def test_list_encodes_like_tuple() -> None:
    assert encode_extra(["a", 1]) == encode_extra(("a", 1))


def test_big_ints_encode() -> None:
    assert encode_extra(2**200) != encode_extra(2**200 + 1)
    assert encode_extra(-(2**63)) != encode_extra(2**63)


def test_extra_keys_per_full_or_every_block(rng: np.random.Generator) -> None:
    tokens = _tokens(rng, 2 * BS + 1)
    assert block_keys(FP, tokens, BS, [None, ("s",)]) == block_keys(FP, tokens, BS, [None, ("s",), ("ignored",)])
    assert block_keys(FP, tokens, BS, [None, None]) == block_keys(FP, tokens, BS)
    with pytest.raises(ValueError, match="extra_keys has 1 entries for 2 full blocks"):
        block_keys(FP, tokens, BS, [None])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"token_ids": [-1] * BS}, r"\[0, 2\*\*32\)"),
        ({"token_ids": [2**32] * BS}, r"\[0, 2\*\*32\)"),
        ({"token_ids": np.zeros(BS, dtype=np.float32)}, "expected integers"),
        ({"token_ids": np.zeros((2, BS), dtype=np.int32)}, "one dimension"),
        ({"block_size": 8}, "differs from the fingerprint"),
        ({"parent": b"short"}, "16-byte key"),
        ({"extra_keys": [(1.5,)]}, "float"),
    ],
)
def test_bad_inputs(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"token_ids": list(range(BS)), "block_size": BS}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        block_keys(FP, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"model_id": ""}, {"num_layers": 0}, {"block_size": True}, {"head_size": 1.5}, {"dtype": ""}],
)
def test_bad_fingerprint(kwargs: dict[str, object]) -> None:
    fields = {"model_id": "m", "dtype": "bfloat16", "num_layers": 2, "num_kv_heads": 2}
    fields.update(head_size=64, block_size=16)
    fields.update(kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ModelFingerprint(**fields)  # type: ignore[arg-type]


def test_hex_round_trip(rng: np.random.Generator) -> None:
    k = block_keys(FP, _tokens(rng, BS), BS)[0]
    assert key_from_hex(key_hex(k)) == k
    assert len(key_hex(k)) == 32
    with pytest.raises(ValueError, match="expected 16"):
        key_hex(b"abc")
    with pytest.raises(ValueError, match="32 hex digits"):
        key_from_hex("abcd")


def test_group_keys_name_each_groups_pages_apart() -> None:
    from dynkv.keys import group_keys

    fp = ModelFingerprint("m", "float16", 2, 2, 4, 4)
    keys = block_keys(fp, list(range(12)), 4)
    a, b = group_keys(keys, b"0|sliding:64:0|l0,l2"), group_keys(keys, b"1|full|l1,l3")
    assert len(set(a) | set(b) | set(keys)) == 9  # no page key of one group is another's, or a prefix key
    assert a == group_keys(keys, b"0|sliding:64:0|l0,l2")  # stable
    assert all(len(k) == 16 for k in a)
