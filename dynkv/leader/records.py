"""The leader's records: one per load job, store job and live request, and each job's acknowledgements.

A leaf module, so the leader and its flows (:mod:`dynkv.leader.tier_flow`,
:mod:`dynkv.leader.remote_flow`) share the records without importing one
another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Acks", "LoadRecord", "RequestRecord", "StoreRecord"]


@dataclass
class LoadRecord:
    job: int
    req_id: str
    block_ids: list[int]
    slots: list[int | None]
    host_keys: list[bytes] = field(default_factory=list)  # pinned in the host tier while loading
    staged: list[int] = field(default_factory=list)  # staging slots read for it (dynkv.leader.staging)
    failed: list[int] = field(default_factory=list)
    waiting: int = 0  # disk and shared-tier reads outstanding
    disk_reads: int = 0  # of them, disk reads
    shared_waiting: int = 0  # shared-tier reads outstanding
    cancelled: bool = False
    remote: Any = None  # the RemotePrefill pulled from
    pulls: list[tuple[int, int]] = field(default_factory=list)  # (host slot, remote slot)
    pulled_keys: list[bytes] = field(default_factory=list)  # pending in the host tier until pulled
    sync: bool = False  # computed in the step of its plan (LoadOp.sync)
    started: float = 0.0  # perf_counter at begin_load
    read_until: float = 0.0  # perf_counter when its last disk or shared-tier read completed
    reads: list[tuple[int, Any]] = field(default_factory=list)  # (index in the load, Future) of its disk reads
    given_up: bool = False  # went out without its unread disk pages (recomputed); reads still running land as cache
    probe: str | None = None  # the tier whose reads are a cost-model probe (dynkv.policy.cost)


@dataclass
class StoreRecord:
    job: int
    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    slots: list[int]
    # Of them, pages written around the host tier: key -> (staging slot, pending disk slot) (DiskFlow._write_around).
    around: dict[bytes, tuple[int, int]] = field(default_factory=dict)


@dataclass
class RequestRecord:
    match: list[tuple[str, int, bytes]] = field(default_factory=list)  # pinned by lookup, not yet loading
    remote: Any = None  # RemotePrefill of REMOTE matches
    remote_slots: dict[bytes, int] = field(default_factory=dict)
    pull_failed: bool = False  # vLLM reschedules the request: it recomputes rather than pulls again
    looked_up: bool = False
    probe: str | None = None  # the tier the match probes (dynkv.policy.cost): only its first pages were kept
    load: LoadRecord | None = None
    stores: set[int] = field(default_factory=set)
    finished: bool = False


@dataclass
class Acks:
    done: int = 0
    failed: int = 0
