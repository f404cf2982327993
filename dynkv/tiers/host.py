"""G2, the host tier's memory: the engine's named ``/dev/shm`` pool, its size, and reaping dead leaders' pools.

One pool per engine, created by the leader as ``<prefix>-<pid>`` and attached
by name by every TP rank's worker (:func:`pool_name_for` gives both sides the
same prefix). The pid in the name tells a pool whose leader is gone from a live
one, so a pool left behind by a killed engine is removed the next time any
dynkv leader starts on the host. The pages themselves are
:class:`dynkv.memory.PageBuffer` over a :class:`dynkv.memory.HostPool`; the page
index says which key each slot holds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re

from dynkv.config import DynKVConfig
from dynkv.keys import ModelFingerprint
from dynkv.memory import HostPool

__all__ = ["SHM_DIR", "host_pages_for", "leader_pools", "live_pools", "pid_alive", "pool_name_for", "pool_owner",
           "reap_stale_pools"]

log = logging.getLogger("dynkv.host")


def pool_name_for(engine_id: str, fingerprint: ModelFingerprint) -> str:
    """Shared-memory name prefix of an engine's host pool; the leader and its workers derive the same.

    The leader appends ``-<its pid>`` (see :func:`pool_owner`), so a pool left
    behind by a killed engine can be told from a live one and removed.
    """
    tag = hashlib.blake2b(f"{engine_id}\0".encode() + fingerprint.digest(), digest_size=8).hexdigest()
    return f"dynkv-{tag}"


SHM_DIR = "/dev/shm"
_POOL_RE = re.compile(r"^(dynkv-[0-9a-f]{16})-(\d+)$")


def pool_owner(name: str) -> tuple[str, int] | None:
    """``(prefix, pid)`` of a leader's pool name, or None for another name."""
    m = _POOL_RE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leader_pools() -> list[tuple[str, str, int]]:
    """``(name, prefix, pid)`` of every leader's pool in ``/dev/shm``."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return [(n, *owner) for n in names if (owner := pool_owner(n)) is not None]


def live_pools(prefix: str) -> list[str]:
    """Names of live leaders' pools under ``prefix`` (normally one), newest first."""
    found = [(os.stat(os.path.join(SHM_DIR, n)).st_mtime, n)
             for n, p, pid in leader_pools() if p == prefix and pid_alive(pid)]
    return [n for _, n in sorted(found, reverse=True)]


def reap_stale_pools() -> None:
    """Unlink host pools whose leader process is gone (an engine killed before its shutdown ran)."""
    for name, _, pid in leader_pools():
        if not pid_alive(pid) and HostPool.unlink(name):
            log.info("removed host pool %s left by a process that is gone (pid %d)", name, pid)


def host_pages_for(config: DynKVConfig, stride: int) -> int:
    """Pages of ``stride`` bytes the host tier holds under ``config`` (``host_pages``, else ``host_gb``)."""
    if config.host_pages is not None:
        return config.host_pages
    n = int(config.host_gb * (1 << 30)) // stride
    if n < 1:
        raise ValueError(
            f"dynkv config host_gb={config.host_gb:g} holds no page of {stride} bytes: "
            "give at least one page's worth, or host_pages"
        )
    return n
