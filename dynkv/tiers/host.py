"""G2, the host tier's memory: the engine's pool, how its workers find it, its size, and reaping.

One pool per engine: a memfd that the leader creates and labels
``<prefix>-<pid>`` (:func:`pool_name_for` gives the leader and its workers the
same prefix). A memfd has no name in the file system: the kernel frees its
memory once the last process that maps it is gone, however the processes end,
so a killed engine leaves no memory behind. The workers find it through a
symlink of that name in the run directory (:func:`run_dir`) that points at the
leader's ``/proc/<pid>/fd/<fd>``; a link whose leader is gone dangles and holds
nothing, and the next leader on the host removes it
(:func:`reap_stale_pools`), along with any ``/dev/shm`` pool a killed leader
of an earlier dynkv (or one on a kernel without memfd) left there. The pages
themselves are :class:`dynkv.memory.PageBuffer` over a
:class:`dynkv.memory.HostPool`; the page index says which key each slot holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat

from dynkv.config import DynKVConfig
from dynkv.keys import ModelFingerprint
from dynkv.memory import HostPool

__all__ = ["SHM_DIR", "host_pages_for", "leader_links", "live_pools", "pid_alive", "pool_link", "pool_name_for",
           "pool_owner", "publish_pool", "reap_stale_pools", "run_dir", "run_dirs", "shm_pools", "withdraw_pool"]

log = logging.getLogger("dynkv.host")


def pool_name_for(engine_id: str, fingerprint: ModelFingerprint) -> str:
    """Name prefix of an engine's host pool; the leader and its workers derive the same.

    The leader appends ``-<its pid>`` (see :func:`pool_owner`), so a pool left
    behind by a killed engine can be told from a live one and removed.
    """
    tag = hashlib.blake2b(f"{engine_id}\0".encode() + fingerprint.digest(), digest_size=8).hexdigest()
    return f"dynkv-{tag}"


SHM_DIR = "/dev/shm"  # where pools were named before memfd pools (and still are where memfd_create is missing)
_POOL_RE = re.compile(r"^(dynkv-[0-9a-f]{16})-(\d+)$")
_FD_RE = re.compile(r"^/proc/(\d+)/fd/\d+$")


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


# -- the run directory: where leaders publish their pools --------------------


def run_dirs() -> list[str]:
    """Directories that may hold leaders' links, the one a leader writes first.

    ``$DYNKV_RUN_DIR``, else ``$XDG_RUNTIME_DIR/dynkv``, else
    ``/tmp/dynkv-<uid>``; workers look in each of them, so a worker whose
    environment lacks a variable the leader's has still finds the pool.
    """
    dirs = []
    if d := os.environ.get("DYNKV_RUN_DIR", "").strip():
        dirs.append(d)
    if x := os.environ.get("XDG_RUNTIME_DIR", "").strip():
        dirs.append(os.path.join(x, "dynkv"))
    dirs.append(f"/tmp/dynkv-{os.getuid()}")
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def _unsafe(path: str) -> str | None:
    """Why ``path`` cannot be trusted as a run directory, or None."""
    try:
        st = os.lstat(path) if path.startswith("/tmp/") else os.stat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}, not to this process's uid {os.getuid()}"
    if st.st_mode & 0o022:
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def run_dir() -> str:
    """The directory this process publishes its pool's link in: the first of :func:`run_dirs` that is usable
    (created 0700). ValueError if ``$DYNKV_RUN_DIR`` is not usable, or none is."""
    problems = []
    for d in run_dirs():
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            why = _unsafe(d)
        except OSError as e:
            why = f"cannot be created ({e.strerror})"
        if why is None:
            return d
        problems.append(f"{d} {why}")
        if os.environ.get("DYNKV_RUN_DIR", "").strip():
            break  # the operator's choice: no quiet fallback
    raise ValueError(f"dynkv has no usable run directory ({'; '.join(problems)}): its links lead workers to "
                     "their host pool, so it must be writable by this user and by no other; fix or remove it, "
                     "or set DYNKV_RUN_DIR to a directory of your own")


def _trusted_run_dirs() -> list[str]:
    return [d for d in run_dirs() if os.path.isdir(d) and _unsafe(d) is None]


def publish_pool(pool: HostPool, directory: str | None = None) -> str:
    """Link ``<run dir>/<pool.name>`` to ``pool.path`` (replacing a stale link of that name); returns the link."""
    d = directory or run_dir()
    link = os.path.join(d, pool.name)
    tmp = os.path.join(d, f".{pool.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(pool.path, tmp)
    os.replace(tmp, link)  # atomic: a worker sees no link or the whole one
    return link


def withdraw_pool(link: str) -> None:
    """Remove a link made by :func:`publish_pool` (the pool's memory goes with its last mapping)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)


def leader_links() -> list[tuple[str, str, int]]:
    """``(link, prefix, pid)`` of every leader's link in the run directories."""
    out = []
    for d in _trusted_run_dirs():
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            if (owner := pool_owner(n)) is not None and os.path.islink(path := os.path.join(d, n)):
                out.append((path, *owner))
    return out


def _reaches_pool(link: str) -> bool | None:
    """Whether ``link`` leads to the live pool its name says; None where this process may not look.

    A memfd link must lead to the fd of the pid in its name, and that fd must
    be the memfd of that name: once a leader is gone its pid and fd numbers
    can be reused by an unrelated process, whose file is never attached.
    """
    name = os.path.basename(link)
    owner = pool_owner(name)
    if owner is None or not pid_alive(owner[1]):
        return False
    try:
        target = os.readlink(link)
    except OSError:
        return False
    if target == os.path.join(SHM_DIR, name):  # the leader's kernel had no memfd_create
        return os.path.exists(target)
    m = _FD_RE.match(target)
    if m is None or int(m.group(1)) != owner[1]:
        return False
    try:
        memfd = os.readlink(target)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    return memfd.removesuffix(" (deleted)") == f"/memfd:{name}"


def pool_link(name: str) -> str | None:
    """The link to leader pool ``name`` if it leads to that live pool (as far as this process can tell)."""
    for d in _trusted_run_dirs():
        path = os.path.join(d, name)
        if os.path.islink(path) and _reaches_pool(path) is not False:
            return path
    return None


def live_pools(prefix: str) -> list[str]:
    """Links to live leaders' pools under ``prefix`` (normally one), newest first."""
    found = []
    for path, p, _ in leader_links():
        if p == prefix and _reaches_pool(path) is not False:
            with contextlib.suppress(OSError):
                found.append((os.lstat(path).st_mtime, path))
    return [path for _, path in sorted(found, reverse=True)]


def shm_pools() -> list[tuple[str, str, int]]:
    """``(name, prefix, pid)`` of every leader's pool in ``/dev/shm`` (no memfd, or an older dynkv)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return [(n, *owner) for n in names if (owner := pool_owner(n)) is not None]


def reap_stale_pools() -> None:
    """Remove what leaders that are gone left: their links, and their ``/dev/shm`` pools (which hold memory)."""
    for link, _, pid in leader_links():
        if _reaches_pool(link) is False:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
                log.info("removed the link %s of a host pool that is gone (pid %d)", link, pid)
    for d in _trusted_run_dirs():  # a leader killed between its link's two steps
        with contextlib.suppress(OSError):
            for n in os.listdir(d):
                if n.startswith(".") and n.endswith(".tmp") and (owner := pool_owner(n[1:-4])) is not None \
                        and not pid_alive(owner[1]):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(d, n))
    for name, _, pid in shm_pools():
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
