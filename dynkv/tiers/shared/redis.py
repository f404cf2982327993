"""Redis / Valkey backend of the shared tier (the only importer of ``redis``).

``redis://HOST:PORT[/DB]`` and ``rediss://`` (TLS) name one server,
``redis+cluster://H1:P1,H2:P2,...`` (or ``rediss+cluster://``) the seed nodes
of a cluster. Credentials come from the URL (``redis://user:secret@host:port``)
or, where it has none, from the arguments (the shared tier passes
``DYNKV_SHARED_USERNAME`` / ``DYNKV_SHARED_PASSWORD``). One value per page;
each batch is one pipeline (per node, in a cluster) without a transaction.
A page the store refuses (``maxmemory`` reached under ``noeviction``) is a
failed put, not a dead store.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster

from dynkv.tiers.shared.base import GOT, MISSING, WRONG_SIZE, StoreUnavailable, redact

__all__ = ["RedisBackend"]

# Errors that mean the store (or a node of it) cannot answer, as opposed to refusing one command.
_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterError,
         redis.exceptions.BusyLoadingError, OSError)


class RedisBackend:
    """Batched EXISTS / SET / GET of page values on a Redis or Valkey server or cluster.

    Parameters
    ----------
    url
        ``redis://``, ``rediss://``, ``redis+cluster://`` or ``rediss+cluster://``.
    timeout_s
        Connect and socket timeout of every call.
    username, password
        Used where the URL names none.

    Raises
    ------
    StoreUnavailable
        The store does not answer a PING within ``timeout_s``.
    """

    def __init__(self, url: str, *, timeout_s: float, username: str | None = None,
                 password: str | None = None) -> None:
        self.url = redact(url)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        kw = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        user = unquote(parts.username) if parts.username else username
        secret = unquote(parts.password) if parts.password else password
        try:
            if scheme.endswith("+cluster"):
                hosts = parts.netloc.rsplit("@", 1)[-1].split(",")
                nodes = [ClusterNode(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in hosts]
                self._client: redis.Redis | RedisCluster = RedisCluster(
                    startup_nodes=nodes, username=user, password=secret, ssl=scheme.startswith("rediss"),
                    require_full_coverage=False, **kw)
            else:
                self._client = redis.Redis.from_url(url, username=user, password=secret, **kw)
            self._client.ping()
        except _DOWN as e:
            raise StoreUnavailable(f"redis store {self.url}: {_clean(e, url)}") from None
        except redis.exceptions.RedisError as e:  # bad credentials, say
            raise StoreUnavailable(f"redis store {self.url}: {_clean(e, url)}") from None

    def _run(self, build: Sequence[tuple[str, tuple[object, ...]]]) -> list[object]:
        pipe = self._client.pipeline(transaction=False)
        for cmd, args in build:
            getattr(pipe, cmd)(*args)
        try:
            return pipe.execute(raise_on_error=False)
        except _DOWN as e:
            raise StoreUnavailable(f"redis store {self.url}: {_clean(e, self.url)}") from None
        except redis.exceptions.RedisError as e:
            raise StoreUnavailable(f"redis store {self.url}: {_clean(e, self.url)}") from None
        finally:
            pipe.reset()

    def exists(self, keys: Sequence[str]) -> list[bool]:
        out = self._run([("exists", (k,)) for k in keys])
        _raise_down(out, self.url)
        return [r == 1 for r in out]

    def put(self, keys: Sequence[str], parts: Sequence[Sequence[memoryview]]) -> list[bool]:
        values = [p[0] if len(p) == 1 else b"".join(p) for p in parts]
        out = self._run([("set", (k, v)) for k, v in zip(keys, values)])
        _raise_down(out, self.url)
        return [r is True for r in out]

    def get(self, keys: Sequence[str], parts: Sequence[Sequence[memoryview]]) -> list[int]:
        out = self._run([("get", (k,)) for k in keys])
        _raise_down(out, self.url)
        codes = []
        for value, dst in zip(out, parts):
            if value is None or isinstance(value, Exception):
                codes.append(MISSING)
                continue
            if len(value) != sum(len(d) for d in dst):
                codes.append(WRONG_SIZE)
                continue
            view, off = memoryview(value), 0
            for d in dst:
                d[:] = view[off : off + len(d)]
                off += len(d)
            codes.append(GOT)
        return codes

    def remove(self, keys: Sequence[str]) -> None:
        _raise_down(self._run([("unlink", (k,)) for k in keys]), self.url)

    def register(self, buf: memoryview) -> None:
        """Nothing to do: the client sends from and receives into its own buffers."""

    def close(self) -> None:
        try:
            self._client.close()
        except _DOWN:
            pass

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The ``redis`` client (the bench measures the store's own pipelined SET/GET through it)."""
        return self._client


def _raise_down(results: list[object], url: str) -> None:
    for r in results:
        if isinstance(r, _DOWN):
            raise StoreUnavailable(f"redis store {url}: {r}")


def _clean(e: BaseException, url: str) -> str:
    return redact(str(e).replace(url, redact(url)))
