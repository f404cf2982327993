"""The prefill side: pages exported to decode engines from this engine's host pool.

The leader of a ``kv_producer`` engine owns one :class:`Exporter`. When a
request that asked for a remote decode finishes, :meth:`Exporter.export` pins
its pages (stored, or still being stored) in the host tier and names them in
the ``kv_transfer_params`` vLLM returns. Decode ranks then read them
one-sidedly with NIXL from the registered host pool, after asking the side
channel whether every page has landed (``acquire``); each rank releases the
export when done. Pins go when every rank has released, or after
``export_timeout_s``. The device blocks were freed as soon as the stores
finished: no GPU memory waits for a decode engine.

Threads: the side channel answers on its own thread from a locked table, and
progresses the NIXL agent there (often while decode ranks are at work, rarely
otherwise); the index is only touched from the leader's thread
(:meth:`poll`, called at each leader entry point).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from dynkv.config import DynKVConfig
from dynkv.disagg.nixl import Agent, ucx_devices
from dynkv.disagg.params import CLOCK_SKEW_S, MAX_PAGES, RemotePrefill
from dynkv.disagg.wire import Handshake, SideChannelServer, advertised_host, check_hello
from dynkv.index import PageIndex
from dynkv.keys import ModelFingerprint
from dynkv.layout import PageGeometry
from dynkv.metrics import Metrics
from dynkv.memory import HostPool
from dynkv.tiers.base import HOST

__all__ = ["Exporter"]

log = logging.getLogger("dynkv.disagg")

_MAX_WORLD = 4096
# Side-channel ticks (ms) while decode ranks may be connecting or reading, and how long "may" lasts (s).
_BUSY_TICK_MS, _BUSY_S = 1, 5.0


@dataclass
class _Export:
    req_id: str
    keys: list[bytes]
    slots: list[int]
    deadline: float
    ready: bool = False
    lost: str | None = None  # why its pages are gone (their store failed)
    released: set[int] = field(default_factory=set)
    world: int = 0


class Exporter:
    """Exports of one prefill engine: NIXL agent over its host pool, side channel, pins.

    Parameters
    ----------
    pool
        The engine's host pool (registered with NIXL whole).
    geometry, fingerprint
        The model's page geometry and fingerprint (sent in the handshake).
    page_stride, num_pages
        Layout of the pool.
    engine_id
        vLLM's engine id (named in ``kv_transfer_params`` and logs).
    config
        ``side_channel_host``/``side_channel_port`` and ``export_timeout_s``.
    metrics
        The leader's metrics; exports are counted by outcome.
    """

    def __init__(self, *, pool: HostPool, geometry: PageGeometry, fingerprint: ModelFingerprint, page_stride: int,
                 num_pages: int, engine_id: str, config: DynKVConfig, metrics: Metrics) -> None:
        self.instance = secrets.token_hex(8)
        self.engine_id = engine_id
        self.fingerprint = fingerprint
        self.timeout_s = config.export_timeout_s
        devices, force = ucx_devices(config.side_channel_host, config.ucx_net_devices)
        self._agent = Agent(f"dynkv-prefill-{engine_id}-{os.getpid()}-{self.instance}", pool.ptr, pool.nbytes,
                            net_devices=devices, force=force)
        secret = config.transfer_secret
        self._secret = secret.encode() if secret else None
        self.handshake = Handshake.describe(engine_id=engine_id, fingerprint=fingerprint, geometry=geometry,
                                            page_stride=page_stride, num_pages=num_pages, pool_addr=pool.ptr,
                                            instance=self.instance, agent_name=self._agent.name)
        self._metadata = self._agent.metadata
        self._lock = threading.Lock()
        self._exports: dict[str, _Export] = {}
        self._busy_until = 0.0
        self._outcomes = Counter("dynkv_exports", "Exports to decode engines, by outcome", ["outcome"],
                                 registry=metrics.registry)
        self._pages = Counter("dynkv_exported_pages", "Pages exported to decode engines", registry=metrics.registry)
        try:
            self._server = SideChannelServer(config.side_channel_host, config.side_channel_port, self._serve,
                                             self._progress)
        except BaseException:
            self._agent.close()
            raise
        self.host = advertised_host(config.side_channel_host)
        self.port = self._server.port
        log.info("dynkv: exporting pages of engine %s; side channel %s:%d (bound %s)", engine_id, self.host,
                 self.port, config.side_channel_host)
        if self._secret is None:
            log.warning("dynkv: no transfer_secret (DYNKV_TRANSFER_SECRET): this prefill engine's kv_transfer_params "
                        "carry no MAC, so decode engines cannot tell them from forged ones (decode engines with a "
                        "secret refuse them; those without keep the pulled pages private to each request)")

    # -- leader thread ---------------------------------------------------------

    def export(self, req_id: str, keys: Sequence[bytes], index: PageIndex) -> dict[str, Any] | None:
        """Pin the leading ``keys`` the host tier holds and return the ``kv_transfer_params`` naming them.

        None when the host tier holds not even the first page (it was full).
        """
        slots: list[int] = []
        for key in keys[:MAX_PAGES]:
            slot = index.location(key, HOST, pending=True)
            if slot is None:
                break
            slots.append(slot)
        if not slots:
            self._outcomes.labels("empty").inc()
            return None
        held = list(keys[: len(slots)])
        index.pin(HOST, held)
        transfer = secrets.token_hex(8)
        exp = _Export(req_id, held, slots, time.monotonic() + self.timeout_s)
        exp.ready = self._landed(exp, index)
        with self._lock:
            self._exports[transfer] = exp
        self._pages.inc(len(slots))
        # Signed: the keys are the ones this engine computed from the tokens it prefilled, and the slots hold
        # their pages; a decode engine trusts the pairing only under the deployment's secret.
        expires = int(time.time() + self.timeout_s) + 1
        return RemotePrefill(self.engine_id[:128], self.host, self.port, self.instance, transfer,
                             self.fingerprint.digest().hex(), held[-1].hex(), tuple(slots),
                             expires).signed(self._secret).to_params()

    def poll(self, index: PageIndex) -> None:
        """Mark exports whose pages all landed ready; unpin released and expired ones."""
        now = time.monotonic()
        with self._lock:
            items = list(self._exports.items())
        for transfer, exp in items:
            done = exp.world and len(exp.released) >= exp.world
            if done or now > exp.deadline:
                with self._lock:
                    del self._exports[transfer]
                if exp.lost is None:
                    index.unpin(HOST, exp.keys)
                self._outcomes.labels("released" if done else "expired").inc()
                if not done:
                    log.info("export %s of request %s expired after %g s; its pages are unpinned", transfer,
                             exp.req_id, self.timeout_s)
            elif not exp.ready and exp.lost is None and self._landed(exp, index):
                with self._lock:
                    exp.ready = True

    def forget(self, keys: Sequence[bytes], index: PageIndex) -> None:
        """Pages about to be dropped (their store failed): exports holding them are lost, their pins go."""
        gone = set(keys)
        with self._lock:
            hit = [e for e in self._exports.values() if e.lost is None and gone.intersection(e.keys)]
            for e in hit:
                e.lost = "its pages failed to reach the host tier"
        for e in hit:
            index.unpin(HOST, e.keys)
            self._outcomes.labels("lost").inc()

    def pending(self) -> int:
        """Exports not yet released or expired."""
        with self._lock:
            return len(self._exports)

    def close(self) -> None:
        """Stop the side channel and deregister the pool (before it is unmapped)."""
        self._server.close()
        self._agent.close()

    @staticmethod
    def _landed(exp: _Export, index: PageIndex) -> bool:
        return all(index.location(k, HOST) == s for k, s in zip(exp.keys, exp.slots))

    # -- side-channel thread ------------------------------------------------------

    def _progress(self) -> int:
        self._agent.progress()
        return _BUSY_TICK_MS if time.monotonic() < self._busy_until else 100

    def _serve(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
        op = msg.get("op")
        if op in ("hello", "acquire"):  # a decode rank is about to connect or read
            self._busy_until = time.monotonic() + _BUSY_S
        if op == "hello":
            refused = check_hello(self._secret, msg, CLOCK_SKEW_S)
            if refused is not None:
                self._outcomes.labels("hello_refused").inc()
                return {"ok": False, "error": refused}, []
            return {"ok": True, "handshake": self.handshake.to_json()}, [self._metadata]
        transfer = msg.get("transfer")
        if not isinstance(transfer, str):
            return {"ok": False, "error": f"{op!r} without a transfer id"}, []
        with self._lock:
            exp = self._exports.get(transfer)
            if exp is None:
                return {"ok": False, "error": f"transfer {transfer[:32]!r} is unknown here: it expired after "
                        f"{self.timeout_s:g} s, was released, or the engine restarted"}, []
            if op == "acquire":
                return self._acquire(exp, transfer, msg.get("slots"))
            if op == "release":
                rank, world = msg.get("rank"), msg.get("world")
                if not (isinstance(world, int) and isinstance(rank, int) and 0 <= rank < world <= _MAX_WORLD):
                    return {"ok": False, "error": f"release: rank {rank!r} of world {world!r} is not valid"}, []
                exp.world = world
                exp.released.add(rank)
                return {"ok": True}, []
        return {"ok": False, "error": f"unknown request {op!r}: expected hello, acquire or release"}, []

    @staticmethod
    def _acquire(exp: _Export, transfer: str, slots: Any) -> tuple[dict[str, Any], list[bytes]]:
        if exp.lost is not None:
            return {"ok": False, "error": f"transfer {transfer!r} is lost: {exp.lost}"}, []
        if not isinstance(slots, list) or not set(slots) <= set(exp.slots):
            return {"ok": False, "error": f"acquire names page slots that transfer {transfer!r} did not export"}, []
        return {"ok": True, "ready": exp.ready}, []
