"""Stable 128-bit page keys: a chained hash over full blocks of tokens.

A page's key names its content: the model (:class:`ModelFingerprint`), every
token before and in its block, and the block's extra keys (LoRA, multimodal
hashes, cache salt). Key ``i`` is

    blake2b-128(key[i-1] || tokens of block i as little-endian uint32 || enc(extra_i))

with ``key[-1]`` the fingerprint's digest, so one key stands for the whole
prefix. ``enc`` is a tagged, length-prefixed encoding, so no two different
inputs hash the same bytes. Keys never use Python's ``hash()`` (salted per
process): disk pages and peers must agree on them across processes, hosts and
restarts. Changing anything here changes every key; bump
``PAGE_FORMAT_VERSION`` when the page bytes change.
"""

from __future__ import annotations

import array
import hashlib
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

__all__ = [
    "KEY_BYTES",
    "PAGE_FORMAT_VERSION",
    "ModelFingerprint",
    "block_keys",
    "encode_extra",
    "group_keys",
    "key_from_hex",
    "key_hex",
]

KEY_BYTES = 16
PAGE_FORMAT_VERSION = 1
_PERSON_MODEL = b"dynkv.model"
_PERSON_BLOCK = b"dynkv.block"
_PERSON_GROUP = b"dynkv.group"
_BLOCK_HASHER = hashlib.blake2b(digest_size=KEY_BYTES, person=_PERSON_BLOCK)  # copied for each block
_U32 = struct.Struct("<I")


def _tagged(tag: bytes, payload: bytes) -> bytes:
    return tag + _U32.pack(len(payload)) + payload


def encode_extra(value: Any) -> bytes:
    """Canonical bytes of an extra key (or of a block's tuple of them).

    None, bool, int (any size), str (UTF-8), bytes, and tuples or lists of
    these; each value is tagged with its type and length-prefixed, so
    ``("ab", "c")`` and ``("a", "bc")`` encode differently, as do ``1``,
    ``"1"`` and ``True``. A list encodes like a tuple.

    Raises
    ------
    TypeError
        For any other type (floats included: their text is not canonical).
    """
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"T" if value else b"F"
    if isinstance(value, int):
        n = (value.bit_length() + 8) // 8
        return _tagged(b"I", value.to_bytes(n, "little", signed=True))
    if isinstance(value, str):
        return _tagged(b"S", value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _tagged(b"B", bytes(value))
    if isinstance(value, (tuple, list)):
        return b"L" + _U32.pack(len(value)) + b"".join(encode_extra(v) for v in value)
    raise TypeError(
        f"extra key {value!r} has type {type(value).__name__}: expected None, bool, int, str, "
        "bytes, or a tuple/list of these"
    )


@dataclass(frozen=True)
class ModelFingerprint:
    """What must match for two engines to share pages; seeds every key chain.

    Parameters
    ----------
    model_id
        The model's name or path as served (include the revision when it
        matters).
    dtype
        KV-cache dtype, e.g. ``"bfloat16"`` or ``"fp8_e4m3"``; a
        ``torch.dtype`` is accepted and stored without its ``torch.`` prefix.
    num_layers
        Attention layers holding KV.
    num_kv_heads
        All KV heads of the model (not one TP rank's): pages are TP-agnostic.
    head_size
        Per-head size (MLA: the latent's size, with ``num_kv_heads=1``).
    block_size
        Tokens per block (page).
    page_format_version
        dynkv's page format; default the current ``PAGE_FORMAT_VERSION``.
    weights
        The weights' identity (:func:`dynkv.identity.weights_identity`, or a
        user-given ``model_version``): new weights or a new ``config.json`` at
        the same path never match the old pages.
    """

    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    page_format_version: int = PAGE_FORMAT_VERSION
    weights: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str):
            raise ValueError(f"weights={self.weights!r}: expected a string")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id={self.model_id!r}: expected a non-empty string")
        dtype = str(self.dtype).removeprefix("torch.")
        if not dtype:
            raise ValueError("dtype is empty: expected a dtype name such as 'bfloat16'")
        object.__setattr__(self, "dtype", dtype)
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size", "page_format_version"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an integer >= 1")
            object.__setattr__(self, name, int(v))

    @cached_property
    def _digest(self) -> bytes:
        fields = (
            self.model_id,
            self.dtype,
            self.num_layers,
            self.num_kv_heads,
            self.head_size,
            self.block_size,
            self.page_format_version,
        ) + ((self.weights,) if self.weights else ())  # no identity: the digest of fingerprints before it existed
        return hashlib.blake2b(encode_extra(fields), digest_size=KEY_BYTES, person=_PERSON_MODEL).digest()

    def digest(self) -> bytes:
        """16-byte digest of every field: the parent of each chain's first block."""
        return self._digest


# Token lists are packed with the array module (4x numpy's conversion of a list) where its "I" is 32 bits.
_ARRAY_U32 = array.array("I").itemsize == 4


def _token_bytes(token_ids: Sequence[int] | np.ndarray, block_size: int) -> tuple[bytes, int]:
    if type(token_ids) is list and _ARRAY_U32:
        n_full = len(token_ids) // block_size
        try:
            packed = array.array("I", token_ids[: n_full * block_size])
        except (OverflowError, TypeError) as e:
            raise ValueError(f"token ids ({e}): expected integer ids in [0, 2**32)") from None
        if sys.byteorder != "little":
            packed.byteswap()
        return packed.tobytes(), n_full
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token_ids has shape {arr.shape}: expected one dimension")
    n_full = arr.shape[0] // block_size
    arr = arr[: n_full * block_size]
    if arr.size == 0:
        return b"", 0
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "O":
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"token_ids have dtype {arr.dtype}: expected integers")
    if arr.dtype.itemsize > 4 or arr.dtype.kind == "i":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= 2**32:
            raise ValueError(f"token ids span [{lo}, {hi}]: expected ids in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes(), n_full


def block_keys(
    fingerprint: ModelFingerprint,
    token_ids: Sequence[int] | np.ndarray,
    block_size: int | None = None,
    extra_keys: Sequence[Any] | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """Keys of the full blocks of ``token_ids``; a partial trailing block gets none.

    Parameters
    ----------
    fingerprint
        The model; its digest seeds the chain when ``parent`` is None.
    token_ids
        Token ids: a list of ints or a 1-D integer numpy array (both packed
        without per-token Python work), or another sequence of ints. Each id
        must lie in ``[0, 2**32)``.
    block_size
        Tokens per block; default and only accepted value
        ``fingerprint.block_size``.
    extra_keys
        Per-block extra keys (vLLM's block-hash extra keys: a tuple, or None
        for none), one per full block or one per block including the partial
        one (whose entry is ignored); None for no extra keys at all.
    parent
        Key of the block just before ``token_ids[0]``, to extend a chain
        (``token_ids`` then starts at a block boundary); None starts at the
        first block of a sequence.

    Returns
    -------
    list[bytes]
        One 16-byte key per full block, in order.
    """
    if block_size is None:
        block_size = fingerprint.block_size
    if block_size != fingerprint.block_size:
        raise ValueError(
            f"block_size={block_size} differs from the fingerprint's block_size={fingerprint.block_size}: "
            "keys of one model use one block size"
        )
    if parent is None:
        parent = fingerprint.digest()
    elif not isinstance(parent, bytes) or len(parent) != KEY_BYTES:
        raise ValueError(f"parent {parent!r}: expected a {KEY_BYTES}-byte key or None")
    data, n_full = _token_bytes(token_ids, block_size)
    n_total = -(-len(token_ids) // block_size)
    if extra_keys is not None and len(extra_keys) not in (n_full, n_total):
        raise ValueError(
            f"extra_keys has {len(extra_keys)} entries for {n_full} full blocks of {len(token_ids)} "
            f"tokens: expected {n_full} (or {n_total}, counting the partial block)"
        )
    width = 4 * block_size
    view = memoryview(data)
    keys: list[bytes] = []
    # Copying a set-up hasher is cheaper than making one per block; the digest is the same.
    fresh = _BLOCK_HASHER.copy
    no_extra = encode_extra(None)
    for i in range(n_full):
        h = fresh()
        h.update(parent)
        h.update(view[i * width : (i + 1) * width])
        h.update(no_extra if extra_keys is None else encode_extra(extra_keys[i]))
        parent = h.digest()
        keys.append(parent)
    return keys


def group_keys(keys: Sequence[bytes], tag: bytes) -> list[bytes]:
    """The keys of one KV-cache group's pages: ``blake2b-128(enc(tag) || key)`` for each prefix key.

    A hybrid model (several KV-cache groups: full and sliding-window
    attention layers) keeps one block per group for each block of tokens; the
    group's ``tag`` (its index, kind, window and layers) makes its pages'
    keys differ from every other group's, so a page of one group is never
    found for another.
    """
    head = _tagged(b"g", tag)
    return [hashlib.blake2b(head + k, digest_size=KEY_BYTES, person=_PERSON_GROUP).digest() for k in keys]


def key_hex(key: bytes) -> str:
    """A key as 32 lowercase hex digits (for logs, file names, events)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"key has {len(key)} bytes: expected {KEY_BYTES}")
    return key.hex()


def key_from_hex(text: str) -> bytes:
    """Inverse of :func:`key_hex`."""
    key = bytes.fromhex(text)
    if len(key) != KEY_BYTES:
        raise ValueError(f"{text!r} is {len(key)} bytes: expected {2 * KEY_BYTES} hex digits")
    return key
