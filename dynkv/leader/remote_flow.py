"""The leader's part in disaggregated serving: pages a prefill engine exports, pages a decode engine pulls.

A part of :class:`dynkv.leader.leader.Leader` (a base class of it), like
:mod:`dynkv.leader.tier_flow`. A prefill engine (``kv_producer``) serves its host
pages to decode engines through an exporter (:meth:`RemoteFlow.start_export`,
:meth:`RemoteFlow.export`); a decode engine extends a request's lookup with
the pages a prefill engine exported (:meth:`RemoteFlow.match_remote`), each
given a fresh host slot that its load job pulls into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dynkv.tiers.base import HOST, REMOTE

if TYPE_CHECKING:
    from dynkv.config import DynKVConfig
    from dynkv.index import PageIndex
    from dynkv.keys import ModelFingerprint
    from dynkv.layout import PageGeometry
    from dynkv.leader.records import RequestRecord
    from dynkv.metrics import Metrics
    from dynkv.memory import HostPool

__all__ = ["RemoteFlow"]


class RemoteFlow:
    """Export and pull bookkeeping of the leader; :class:`dynkv.leader.leader.Leader` sets these attributes up."""

    config: DynKVConfig
    index: PageIndex
    metrics: Metrics
    geometry: PageGeometry
    fingerprint: ModelFingerprint
    pool: HostPool
    page_stride: int
    num_host_pages: int
    engine_id: str
    exporter: Any
    _reqs: dict[str, RequestRecord]
    _importing: set[bytes]

    if TYPE_CHECKING:
        def _release_match(self, req: RequestRecord) -> None: ...
        def _drain_io(self) -> None: ...

    def match_remote(self, req_id: str, keys: Sequence[bytes], start: int, remote: Any) -> int | None:
        """Extend the request's :meth:`lookup` with pages a prefill engine exported.

        ``keys[i]`` for ``i >= start`` is matched to ``remote.slots[i]`` (a
        :class:`dynkv.disagg.RemotePrefill`) and gets a fresh host slot to be
        pulled into; a page the host tier already stores is loaded from there
        instead. Stops at the first page with no host slot to spare. Returns
        how many pages were added, or None while another request is pulling
        one of them: ask again later rather than pull it twice. A request
        whose pull failed matches nothing more: vLLM reschedules it, and it
        is recomputed rather than sent to a peer that just failed.

        Pulled pages join the host tier only when ``remote.trusted`` (its MAC
        verified, :meth:`dynkv.disagg.RemotePrefill.verify`); otherwise they
        are dropped once the request's load is done.
        """
        req = self._reqs.get(req_id)
        if req is None or not req.looked_up:
            raise ValueError(f"request {req_id!r}: match_remote() before lookup()")
        if req.pull_failed:
            return 0
        added = 0
        for i in range(start, min(len(keys), len(remote.slots))):
            key = keys[i]
            slot = self.index.location(key, HOST)
            if slot is not None:
                self.index.pin(HOST, [key])
                req.match.append((HOST, slot, key))
            elif self.index.holds(key, HOST):
                if key in self._importing:
                    self._release_match(req)
                    return None
                break  # still being stored here: recomputing the rest beats waiting
            else:
                got = self.index.allocate(HOST, [key], gate=False)
                if not got:  # the index counts the refusal (Leader._update_gauges reports it)
                    break
                self._importing.add(key)
                req.match.append((REMOTE, got[0][1], key))
                req.remote_slots[key] = remote.slots[i]
            added += 1
        req.remote = remote
        return added

    def start_export(self) -> tuple[str, int]:
        """Serve this engine's host pages to decode engines (``kv_producer``); returns the side channel's address.

        Raises
        ------
        dynkv.disagg.nixl.NixlUnavailable
            NIXL is not installed.
        ValueError
            The side channel cannot bind its address.
        """
        from dynkv.disagg.exporter import Exporter

        if self.exporter is None:
            self.exporter = Exporter(pool=self.pool, geometry=self.geometry, fingerprint=self.fingerprint,
                                     page_stride=self.page_stride, num_pages=self.num_host_pages,
                                     engine_id=self.engine_id, config=self.config, metrics=self.metrics)
        return self.exporter.host, self.exporter.port

    def export(self, req_id: str, keys: Sequence[bytes]) -> dict[str, Any] | None:
        """Pin a finished request's pages ``keys`` for a decode engine; its ``kv_transfer_params`` (or None)."""
        if self.exporter is None:
            raise RuntimeError(f"request {req_id!r}: export() before start_export()")
        self._drain_io()
        return self.exporter.export(req_id, keys, self.index)
