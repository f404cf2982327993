"""An engine's KV snapshot: every block it holds, for a router that lost its KV events' history.

vLLM's replay socket keeps its last ``buffer_steps`` event batches; a router
that starts later, or misses batches older than that, cannot rebuild its view
of the engine from events. It asks the engine for a :class:`KVSnapshot`
instead (``GET /kv/snapshot`` on dynkv's ``metrics_port``): the blocks of
vLLM's device cache (hashes only: vLLM keeps no tokens per cached block) and
the pages of dynkv's host and disk tiers (hash, parent, tokens, LoRA), as the
engine holds them at the end of one step.

The engine publishes that step's event batch with a marker event in it, a
``BlockRemoved`` of no blocks whose medium is :data:`MARKER_PREFIX` plus the
snapshot's id (a no-op for every other consumer of vLLM's events). The
snapshot is the engine's state after the batch carrying its marker: the router
sets the engine's view to the snapshot, takes the marker's sequence number as
the last one applied, and goes on with the batches after it. Connector and
router share this module: it needs neither vLLM nor ZMQ.
"""

from __future__ import annotations

import msgspec

__all__ = ["MARKER_PREFIX", "KVSnapshot", "SnapshotPage", "decode_snapshot", "encode_snapshot", "marker_id"]

MARKER_PREFIX = "dynkv-snapshot/"


class SnapshotPage(msgspec.Struct, array_like=True, gc=False):
    """One block of a tier below vLLM's: vLLM's hash, its parent's, its tokens, its LoRA."""

    block_hash: bytes | int  # as vLLM publishes it (an int under VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)
    parent: bytes | int | None
    tokens: list[int]
    lora_id: int | None = None
    lora_name: str | None = None


class KVSnapshot(msgspec.Struct, gc=False):
    """What one engine holds at the end of the step whose batch carries ``marker``.

    ``device`` is None when the engine's vLLM does not let its cached device
    blocks be listed; ``media`` maps a KV-events medium (``CPU``, ``STORAGE``)
    to its pages.
    """

    marker: str
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


def marker_id(medium: str | None) -> str | None:
    """The snapshot id a marker event's medium names; None for an ordinary medium."""
    if medium is None or not medium.startswith(MARKER_PREFIX):
        return None
    return medium[len(MARKER_PREFIX):]
