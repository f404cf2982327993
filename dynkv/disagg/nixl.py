"""NIXL as dynkv uses it: one agent per process side, host memory registered once, READs with a deadline.

Only this module imports NIXL, and only when disaggregated serving starts, so
aggregated serving never needs it installed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Agent", "NixlError", "NixlUnavailable", "is_loopback", "ucx_devices"]

log = logging.getLogger("dynkv.disagg")

# How often a READ in progress is polled: short at first (a page over shared
# memory takes microseconds), then backing off so a slow link costs no CPU.
_POLL_S = (1e-5, 2e-3)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) names this host's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ucx_devices(side_channel_host: str, configured: str | None) -> tuple[str | None, bool]:
    """``(UCX_NET_DEVICES value or None, whether it overrides the environment)`` for an engine's agent.

    ``configured`` (the ``ucx_net_devices`` key) wins over everything; else an
    engine whose side channel is on loopback keeps UCX on ``lo`` unless the
    environment chose devices; else UCX takes what it finds.
    """
    if configured is not None:
        return configured, True
    return ("lo" if is_loopback(side_channel_host) else None), False


class NixlUnavailable(RuntimeError):
    """NIXL (or its UCX backend) is not installed."""


class NixlError(RuntimeError):
    """A NIXL call or transfer failed."""


def _api() -> Any:
    try:
        from nixl import _api
    except ImportError as e:
        raise NixlUnavailable(
            f"disaggregated serving needs NIXL ({e}): pip install nixl; on a machine without CUDA, "
            "pip install --no-deps nixl nixl-cu12"
        ) from e
    return _api


class Agent:
    """A NIXL agent with the UCX backend and one registered host-memory region.

    Parameters
    ----------
    name
        Agent name, unique among the agents that talk to each other.
    ptr, nbytes
        The host memory remote agents may read (prefill) or that READs land
        in (decode).
    net_devices
        The network devices UCX may use (``UCX_NET_DEVICES``; from
        :func:`ucx_devices`): ``lo`` keeps its sockets on loopback, as an
        engine whose side channel is on loopback has no business exposing
        its host pool (prefill) or UCX worker (decode) to the network. The
        environment's own ``UCX_NET_DEVICES`` is kept unless ``force``. Read by
        UCX when the process's first agent starts.

    NIXL's own progress thread polls without pause, a whole core per agent,
    so there is none: a transfer's initiator progresses it while it waits
    (:meth:`read`), and a target calls :meth:`progress` now and then (new
    connections need it; one-sided reads over shared memory or RDMA do not).
    Calls are serialized by NIXL, so several threads may share an agent.

    Raises
    ------
    NixlUnavailable
        NIXL or its UCX plugin is missing.
    """

    def __init__(self, name: str, ptr: int, nbytes: int, *, net_devices: str | None = None,
                 force: bool = False) -> None:
        api = _api()
        if net_devices is not None and (force or "UCX_NET_DEVICES" not in os.environ):
            if os.environ.get("UCX_NET_DEVICES") != net_devices:
                log.info("NIXL/UCX uses network devices %s (%s)", net_devices,
                         "ucx_net_devices" if force else "the side channel is on loopback; set ucx_net_devices "
                         "or UCX_NET_DEVICES to choose others")
            os.environ["UCX_NET_DEVICES"] = net_devices
        conf = api.nixl_agent_config(backends=["UCX"], enable_prog_thread=False,
                                     sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self.name = name
        self._agent = api.nixl_agent(name, conf)
        if "UCX" not in self._agent.backends:
            raise NixlUnavailable(
                f"NIXL has no UCX backend here (plugins: {', '.join(self._agent.get_plugin_list())}); "
                "install a NIXL build with UCX"
            )
        self._region = (int(ptr), int(nbytes))
        self._reg = self._agent.register_memory([(int(ptr), int(nbytes), 0, "")], "DRAM")

    @property
    def metadata(self) -> bytes:
        """What a remote agent needs (:meth:`add_peer`) to read this agent's memory."""
        return bytes(self._agent.get_agent_metadata())

    def progress(self) -> None:
        """Let the backend accept connections and serve two-sided transfers (a target's duty)."""
        self._agent.get_new_notifs()

    def add_peer(self, metadata: bytes) -> str:
        """Load a remote agent's metadata; returns its name."""
        try:
            name = self._agent.add_remote_agent(metadata)
        except Exception as e:
            raise NixlError(f"NIXL refused the remote agent's metadata: {e}") from e
        return name.decode() if isinstance(name, bytes) else str(name)

    def remove_peer(self, name: str) -> None:
        """Forget a remote agent (it restarted, or died)."""
        try:
            self._agent.remove_remote_agent(name)
        except Exception as e:  # an agent NIXL no longer knows: nothing to forget
            log.debug("NIXL could not remove remote agent %s: %s", name, e)

    def read(self, peer: str, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]],
             deadline: float) -> None:
        """Copy remote ``(address, length)`` runs into local ones; block until done or ``deadline``.

        Raises
        ------
        NixlError
            NIXL refused the request or the transfer failed.
        TimeoutError
            ``deadline`` (``time.monotonic()``) passed first; the transfer is aborted.
        """
        if len(local) != len(remote) or any(a[1] != b[1] for a, b in zip(local, remote)):
            raise ValueError("NIXL read: local and remote runs must pair up with equal lengths")
        if not local:
            return
        lo, hi = self._region[0], self._region[0] + self._region[1]
        if any(not lo <= a <= a + n <= hi for a, n in local):
            raise ValueError("NIXL read: a local run lies outside the registered host pool")
        ldesc = np.array([(a, n, 0) for a, n in local], dtype=np.uint64)
        rdesc = np.array([(a, n, 0) for a, n in remote], dtype=np.uint64)
        try:
            handle = self._agent.initialize_xfer("READ", self._agent.get_xfer_descs(ldesc, "DRAM"),
                                                 self._agent.get_xfer_descs(rdesc, "DRAM"), peer)
        except Exception as e:
            raise NixlError(f"NIXL refused a READ from {peer}: {e}") from e
        state, pause = "PROC", _POLL_S[0]
        try:
            state = self._agent.transfer(handle)
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"NIXL READ from {peer} did not finish in time")
                time.sleep(pause)
                pause = min(pause * 2, _POLL_S[1])
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise NixlError(f"NIXL READ from {peer} failed (state {state})")
        finally:
            self._release(handle, done=state == "DONE")

    def _release(self, handle: Any, *, done: bool) -> None:
        try:
            handle.release()
        except Exception as e:  # aborting a transfer in flight may fail; NIXL frees it with the agent
            log.warning("NIXL could not release a transfer%s: %s", "" if done else " it was aborting", e)

    def close(self) -> None:
        """Deregister the memory (before it is unmapped) and drop the agent."""
        if self._reg is not None:
            try:
                self._agent.deregister_memory(self._reg)
            except Exception as e:
                log.warning("NIXL could not deregister host memory: %s", e)
            self._reg = None
        self._agent = None
