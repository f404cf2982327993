"""The decode side: one rank pulls its head slice of a prefill engine's pages with NIXL.

A page is ``[H, L, N, C]`` bytes, heads outermost, so the part TP rank ``r``
of ``t`` needs is one contiguous run at the same offset in every page,
whatever TP size wrote it: a decode engine of any TP size reads from a
prefill engine of any other. Each rank reads its run of each remote page
straight into the same run of a page of its own engine's host pool, which
then holds a whole page once every rank is done (and keeps it as a cached
page); the worker then scatters the rank's slice into its device blocks.

Before reading, the rank shakes hands with the prefill engine once (NIXL
metadata; model, geometry and version must match) and asks whether the
pages have landed in the prefill engine's host pool. Every remote slot is
checked against the handshake. Any failure (an engine gone, refused,
incompatible, or too slow) raises :class:`PullError` within
``transfer_timeout_s``; the blocks are then recomputed.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from dynkv.disagg.nixl import Agent, NixlError
from dynkv.disagg.wire import Handshake, IncompatibleError, SideChannelClient, hello_auth
from dynkv.protocol import PullSpec

__all__ = ["PullError", "Puller"]

log = logging.getLogger("dynkv.disagg")

# First and longest pause between two ``acquire`` polls while the prefill engine's stores finish.
_ACQUIRE_POLL_S = (5e-4, 2e-2)


class _NotReady(TimeoutError):
    """The prefill engine answers, but the pages of this transfer did not land in time."""


class PullError(RuntimeError):
    """Pages could not be pulled; ``blocks`` (set by the worker) are recomputed."""

    def __init__(self, message: str, blocks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.blocks = blocks


@dataclass
class _Peer:
    client: SideChannelClient
    handshake: Handshake
    agent_name: str


class Puller:
    """One decode rank's NIXL agent over its engine's host pool, and its prefill peers.

    Parameters
    ----------
    local
        This engine's handshake fields (model, geometry, version) to match,
        and its pool: ``pool_addr``, ``page_stride``, ``num_pages``.
    pool_bytes
        Size of the local pool (registered with NIXL whole).
    head_range
        ``[h0, h1)``: the KV heads this rank reads.
    rank, world_size
        This rank (for releases: an export is released once every rank is done).
    timeout_s
        Bound on one pull, handshake and waiting for the prefill engine included.
    net_devices, force_devices
        The network devices UCX may use (:func:`dynkv.disagg.nixl.ucx_devices`).
    secret
        The deployment's ``transfer_secret``: prefill engines that have one
        hand their NIXL metadata only to a ``hello`` signed under it.
    """

    def __init__(self, local: Handshake, pool_bytes: int, head_range: tuple[int, int], *, rank: int,
                 world_size: int, timeout_s: float, net_devices: str | None = None,
                 force_devices: bool = False, secret: bytes | None = None) -> None:
        self._secret = secret
        self.local = local
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        h0, h1 = head_range
        run = local.num_layers * local.block_size * local.token_bytes
        self._offset, self._length = h0 * run, (h1 - h0) * run
        self._agent = Agent(f"dynkv-decode-{local.engine_id}-{rank}-{os.getpid()}-{secrets.token_hex(4)}",
                            local.pool_addr, pool_bytes, net_devices=net_devices, force=force_devices)
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._lock = threading.Lock()
        self._hello = threading.Lock()
        # (host, port, instance) -> time.monotonic() of its last failed pull (timeout, lost connection)
        self._failed: dict[tuple[str, int, str], float] = {}

    def pull(self, spec: PullSpec, *, admitted: float | None = None) -> int:
        """Read this rank's slice of ``spec``'s pages into the local pool; returns the bytes read.

        ``admitted`` (``time.monotonic()``, default now) is when the request's
        pull was queued: its deadline is ``timeout_s`` after that, time spent
        waiting for a pull thread included, and a pull queued before its peer
        failed another pull fails at once instead of waiting out its own
        timeout on the same dead peer.

        Raises
        ------
        PullError
            Any failure; the message says what, and the export is released.
        """
        admitted = time.monotonic() if admitted is None else admitted
        deadline = admitted + self.timeout_s
        who = (spec.host, spec.port, spec.instance)
        if time.monotonic() >= deadline:
            raise PullError(f"pull of transfer {spec.transfer} from {spec.engine_id} waited its whole "
                            f"transfer_timeout_s={self.timeout_s:g} s for a pull thread")
        with self._lock:
            failed_at = self._failed.get(who)
        if failed_at is not None and failed_at >= admitted:
            raise PullError(f"pull of transfer {spec.transfer} from {spec.engine_id} at {spec.host}:{spec.port} "
                            "not tried: another pull from that engine failed since this one was queued")
        peer: _Peer | None = None
        stale = False
        try:
            peer = self._peer(spec, deadline)
            local, remote = self._runs(spec, peer.handshake)
            pause = _ACQUIRE_POLL_S[0]
            while not peer.client.call({"op": "acquire", "transfer": spec.transfer,
                                        "slots": list(spec.remote_slots)}, deadline)[0].get("ready"):
                if time.monotonic() + pause > deadline:
                    raise _NotReady(f"the prefill engine's pages did not land within {self.timeout_s:g} s")
                time.sleep(pause)
                pause = min(2 * pause, _ACQUIRE_POLL_S[1])
            self._agent.read(peer.agent_name, local, remote, deadline)
            return sum(n for _, n in local)
        except IncompatibleError as e:
            raise PullError(str(e)) from None
        except (TimeoutError, ConnectionError, NixlError, ValueError) as e:
            stale = not isinstance(e, ValueError)  # the engine may have restarted or died: shake hands again
            if isinstance(e, (TimeoutError, ConnectionError)) and not isinstance(e, _NotReady):
                with self._lock:  # the engine did not answer: pulls queued meanwhile need not wait for it
                    self._failed[who] = time.monotonic()
            raise PullError(f"pull of transfer {spec.transfer} from {spec.engine_id} at {spec.host}:{spec.port} "
                            f"failed: {e}") from None
        finally:
            if peer is not None:
                peer.client.notify({"op": "release", "transfer": spec.transfer, "rank": self.rank,
                                    "world": self.world_size})
                if stale:
                    self._drop(spec, peer)

    def _runs(self, spec: PullSpec, hs: Handshake) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(address, length)`` runs of this rank's slice, local and remote, neighbouring pages merged."""
        bad = [s for s in spec.remote_slots if not 0 <= s < hs.num_pages]
        if bad:
            raise ValueError(f"remote page slots {bad[:4]} are out of range: the prefill engine's pool has "
                             f"{hs.num_pages} pages")
        bad = [s for s in spec.local_slots if not 0 <= s < self.local.num_pages]
        if bad:
            raise ValueError(f"local page slots {bad[:4]} are out of range: this pool has {self.local.num_pages}")
        local: list[tuple[int, int]] = []
        remote: list[tuple[int, int]] = []
        ls, rs = self.local.page_stride, hs.page_stride
        whole = self._length == self.local.page_bytes and ls == self.local.page_bytes and rs == ls
        for lslot, rslot in zip(spec.local_slots, spec.remote_slots):
            la = self.local.pool_addr + lslot * ls + self._offset
            ra = hs.pool_addr + rslot * rs + self._offset
            if whole and local and local[-1][0] + local[-1][1] == la and remote[-1][0] + remote[-1][1] == ra:
                local[-1] = (local[-1][0], local[-1][1] + self._length)
                remote[-1] = (remote[-1][0], remote[-1][1] + self._length)
            else:
                local.append((la, self._length))
                remote.append((ra, self._length))
        return local, remote

    def _peer(self, spec: PullSpec, deadline: float) -> _Peer:
        addr = (spec.host, spec.port)
        with self._hello:  # one handshake per peer, even when several pulls start at once
            with self._lock:
                peer = self._peers.get(addr)
            if peer is not None and peer.handshake.instance == spec.instance:
                return peer
            if peer is not None:  # another run of the engine at that address
                self._drop(spec, peer)
            return self._handshake(spec, deadline)

    def _handshake(self, spec: PullSpec, deadline: float) -> _Peer:
        addr = (spec.host, spec.port)
        client = SideChannelClient(spec.host, spec.port)
        try:
            hello: dict[str, Any] = {"op": "hello"}
            if self._secret:
                t = int(time.time())
                hello.update(t=t, auth=hello_auth(self._secret, t))
            reply, blobs = client.call(hello, deadline)
            try:
                hs = Handshake.from_json(reply.get("handshake"))
            except ValueError as e:
                raise ConnectionError(f"bad handshake: {e}") from None
            hs.check_compatible(self.local)
            if hs.instance != spec.instance:
                raise ConnectionError(f"the engine at {spec.host}:{spec.port} is run {hs.instance}, not "
                                      f"{spec.instance} that exported these pages: it restarted")
            if len(blobs) != 1:
                raise ConnectionError("handshake without NIXL metadata")
            name = self._agent.add_peer(blobs[0])
        except BaseException:
            client.close()
            raise
        peer = _Peer(client, hs, name)
        with self._lock:
            self._peers[addr] = peer
        log.info("rank %d: handshake with prefill engine %s at %s:%d (%d pages of %d bytes)", self.rank,
                 hs.engine_id, spec.host, spec.port, hs.num_pages, hs.page_bytes)
        return peer

    def _drop(self, spec: PullSpec, peer: _Peer) -> None:
        with self._lock:
            if self._peers.get((spec.host, spec.port)) is peer:
                del self._peers[(spec.host, spec.port)]
            else:
                return
        self._agent.remove_peer(peer.agent_name)
        peer.client.close()

    def close(self) -> None:
        """Close every side channel and deregister the pool."""
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for p in peers:
            p.client.close()
        self._agent.close()
