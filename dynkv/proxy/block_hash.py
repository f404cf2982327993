"""vLLM's prefix-cache block hashes, computed outside vLLM (for routing by cached prefix).

vLLM names a full block of ``block_size`` tokens by a chained hash::

    hash[i] = H((hash[i-1], tuple(tokens of block i), extra_keys[i]))
    hash[-1] = NONE_HASH = H(seed)

with ``H`` the engine's ``--prefix-caching-hash-algo`` (``sha256``: SHA-256
of the pickled tuple, the default; ``sha256_cbor``: SHA-256 of its canonical
CBOR) and ``seed`` the engine's ``PYTHONHASHSEED`` when set, else
``"vllm-none-hash"`` (vLLM's fixed seed for cryptographic hashes). The
``xxhash`` algorithms draw a random seed per process unless
``PYTHONHASHSEED`` is set, so a router can follow them only with that seed.
Its KV events carry these hashes as bytes, or as their low 64 bits (big
endian) under ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``; :func:`normalize`
maps both to one int, the prefix index's key.

A router and its engines must agree on the algorithm and the seed:
:func:`stored_hash_ok` checks an engine's stored event against this module,
and the router stops predicting for an engine whose hashes differ.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DEFAULT_SEED", "HASH_ALGOS", "block_hashes", "hash_function", "none_hash", "normalize",
           "stored_hash_ok"]

DEFAULT_SEED = "vllm-none-hash"
HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
_MASK64 = (1 << 64) - 1


def _sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _cbor(obj: Any) -> bytes:
    import cbor2

    return cbor2.dumps(obj, canonical=True)


def hash_function(algo: str) -> Callable[[Any], bytes]:
    """The function vLLM's ``--prefix-caching-hash-algo=algo`` hashes blocks with."""
    if algo == "sha256":
        return _sha256
    if algo == "sha256_cbor":
        return lambda obj: hashlib.sha256(_cbor(obj)).digest()
    if algo in ("xxhash", "xxhash_cbor"):
        try:
            import xxhash
        except ImportError:
            raise ValueError(f"hash algorithm {algo!r} needs the xxhash package: pip install xxhash") from None
        if algo == "xxhash":
            return lambda obj: xxhash.xxh3_128_digest(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        return lambda obj: xxhash.xxh3_128_digest(_cbor(obj))
    raise ValueError(f"hash algorithm {algo!r}: expected one of {', '.join(HASH_ALGOS)} "
                     "(the engines' --prefix-caching-hash-algo)")


def none_hash(algo: str, seed: str | None = None) -> bytes:
    """vLLM's ``NONE_HASH``: the parent of every first block.

    ``seed`` is the engines' ``PYTHONHASHSEED``; None means unset, which the
    xxhash algorithms do not allow (their seed is then random per engine).
    """
    if seed is None:
        if algo.startswith("xxhash"):
            raise ValueError(f"hash algorithm {algo!r} draws a random seed per engine unless PYTHONHASHSEED is "
                             "set: set it to one value for the engines and pass it as the hash seed, or use sha256")
        seed = DEFAULT_SEED
    return hash_function(algo)(seed)


def block_hashes(token_ids: Sequence[int], block_size: int, *, algo: str = "sha256", seed: str | None = None,
                 first_extra: tuple[Any, ...] | None = None) -> list[bytes]:
    """vLLM's hashes of the full blocks of ``token_ids`` (a partial last block gets none).

    ``first_extra`` is the first block's extra keys (vLLM puts a request's
    ``cache_salt`` there as ``(("cache_salt", salt),)``); later blocks have
    none. Requests with LoRA adapters or multimodal inputs mix more into
    their hashes and are not predicted.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: expected an integer >= 1")
    fn = hash_function(algo)
    parent = none_hash(algo, seed)
    out: list[bytes] = []
    for i in range(len(token_ids) // block_size):
        parent = fn((parent, tuple(token_ids[i * block_size : (i + 1) * block_size]), first_extra if i == 0 else None))
        out.append(parent)
    return out


def normalize(block_hash: bytes | int) -> int:
    """One int per block hash, whether an event carries it as bytes or as its low 64 bits."""
    if isinstance(block_hash, int) and not isinstance(block_hash, bool):
        return block_hash & _MASK64
    if isinstance(block_hash, (bytes, bytearray)):
        return int.from_bytes(block_hash, "big") & _MASK64
    raise ValueError(f"block hash {block_hash!r}: expected bytes or int")


def stored_hash_ok(parent: bytes | int | None, token_ids: Sequence[int], block_size: int, hashes: Sequence[bytes | int],
                   *, algo: str, seed: str | None) -> bool | None:
    """Whether a ``BlockStored`` event's hashes are what this module computes for its tokens.

    None when the event cannot tell: its parent is an int (the first block's
    hash can still be checked when it has no parent), or its token ids do not
    cover its blocks.
    """
    if len(token_ids) != block_size * len(hashes) or not hashes:
        return None
    fn = hash_function(algo)
    if parent is None:
        prev: bytes = none_hash(algo, seed)
    elif isinstance(parent, (bytes, bytearray)):
        prev = bytes(parent)
    else:
        return None
    for i, h in enumerate(hashes):
        prev = fn((prev, tuple(token_ids[i * block_size : (i + 1) * block_size]), None))
        if normalize(prev) != normalize(h):
            return False
    return True
