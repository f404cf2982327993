"""An engine's KV snapshot: every block it holds, for a router that lost its KV events' history.

vLLM's replay socket keeps its last ``buffer_steps`` event batches; a router
that starts later, or misses batches older than that, cannot rebuild its view
of the engine from events. It asks the engine for a :class:`KVSnapshot`
instead (``GET /kv/snapshot`` on dynkv's ``metrics_port``): the blocks of
vLLM's device cache (hashes only: vLLM keeps no tokens per cached block) and
the pages of dynkv's host and disk tiers (hash, parent, tokens, LoRA).

Why no sequence number is needed: every batch acts on each medium's set of
blocks as ``A -> (A - removed) | stored`` (a clear removes all), and such a
map, or any run of them, gives the same set applied twice as once. Each
medium's part of a snapshot is copied at one moment; taken while batch ``n``
was being built, it is that medium after batch ``n - 1`` with the first of
batch ``n``'s changes made. So a router that had batch ``L`` before it asked
(every change of ``L`` and earlier is then in the snapshot) sets its view to
the snapshot and applies every batch after ``L``, those the snapshot already
holds included: the result is the engine's state, with no change lost. Connector and router share this module: it needs neither
vLLM nor ZMQ.
"""

from __future__ import annotations

import msgspec

__all__ = ["KVSnapshot", "SnapshotPage", "decode_snapshot", "encode_snapshot"]


class SnapshotPage(msgspec.Struct, array_like=True, gc=False):
    """One block of a tier below vLLM's: vLLM's hash, its parent's, its tokens, its LoRA."""

    block_hash: bytes | int  # as vLLM publishes it (an int under VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)
    parent: bytes | int | None
    tokens: list[int]
    lora_id: int | None = None
    lora_name: str | None = None


class KVSnapshot(msgspec.Struct, gc=False):
    """What one engine holds.

    ``device`` is None when the engine's vLLM does not let its cached device
    blocks be listed; ``media`` maps a KV-events medium (``CPU``, ``STORAGE``)
    to its pages.
    """

    block_size: int
    device: list[bytes | int] | None
    media: dict[str, list[SnapshotPage]]


_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(KVSnapshot)


def encode_snapshot(snapshot: KVSnapshot) -> bytes:
    """``snapshot`` as msgpack."""
    return _ENC.encode(snapshot)


def decode_snapshot(data: bytes) -> KVSnapshot:
    """A snapshot from its msgpack; raises ``msgspec.DecodeError`` or ``msgspec.ValidationError`` when it is not
    one."""
    return _DEC.decode(data)
