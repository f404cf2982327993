"""Redis / Valkey backend of the shared tier (the only importer of ``redis``).

``redis://HOST:PORT[/DB]`` and ``rediss://`` (TLS) name one server,
``redis+cluster://H1:P1,H2:P2,...`` (or ``rediss+cluster://``) the seed nodes
of a cluster. Credentials come from the URL (``redis://user:secret@host:port``)
or, where it has none, from the arguments (the shared tier passes
``DYNKV_SHARED_USERNAME`` / ``DYNKV_SHARED_PASSWORD``). One value per page;
each batch is one pipeline (per node, in a cluster) without a transaction.
Puts send each page from the host pool as it lies, behind its header, on a
connection of the client's pool (redis-py's pipeline would join them first).
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

    def put(self, keys: Sequence[str], heads: memoryview, pages: Sequence[memoryview]) -> list[bool]:
        n = len(heads) // len(keys) if keys else 0
        parts = [(heads[i * n : (i + 1) * n], page) for i, page in enumerate(pages)]
        if isinstance(self._client, RedisCluster):
            by_node: dict[str, list[int]] = {}
            nodes = {}
            try:
                for i, k in enumerate(keys):
                    node = self._client.get_node_from_key(k)
                    by_node.setdefault(node.name, []).append(i)
                    nodes[node.name] = node
            except (redis.exceptions.RedisClusterException, *_DOWN) as e:  # no node serves a key's slot
                raise StoreUnavailable(f"redis store {self.url}: {_clean(e, self.url)}") from None
            out: list[object] = [None] * len(keys)
            for name, idx in by_node.items():
                got = self._set_many(self._client.get_redis_connection(nodes[name]), [keys[i] for i in idx],
                                     [parts[i] for i in idx])
                for i, r in zip(idx, got):
                    out[i] = r
            # A slot that moved since the client's map: redis-py's own pipeline follows the redirection.
            moved = [i for i, r in enumerate(out) if isinstance(r, (redis.exceptions.MovedError,
                                                                     redis.exceptions.AskError))]
            if moved:
                again = self._run([("set", (keys[i], b"".join(parts[i]))) for i in moved])
                for i, r in zip(moved, again):
                    out[i] = r
        else:
            out = self._set_many(self._client, keys, parts)
        _raise_down(out, self.url)
        return [r is True or r == b"OK" or r == "OK" for r in out]

    def _set_many(self, client: redis.Redis, keys: Sequence[str], parts: Sequence[Sequence[memoryview]]) -> list[object]:
        """Pipelined SETs on one connection of one node, each value sent from its parts where they lie.

        redis-py's pipeline takes a value as one buffer, so a page and its header would be joined
        first: a copy of every page, as long as the store's own SET of it on this machine. Parts
        under 4 KiB (the header) go with the command's framing; larger ones go to the socket as
        they are. Replies in order: True/OK, or the error the store answered (full, moved).
        """
        chunks: list[bytes | memoryview] = []
        small = bytearray()
        for k, p in zip(keys, parts):
            kb = k.encode()
            small += b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(kb), kb, sum(len(x) for x in p))
            for x in p:
                if len(x) < 4096:
                    small += x
                else:
                    chunks.append(bytes(small))
                    small.clear()
                    chunks.append(x)
            small += b"\r\n"
        chunks.append(bytes(small))
        pool = client.connection_pool
        try:
            conn = pool.get_connection()
        except _DOWN as e:
            raise StoreUnavailable(f"redis store {self.url}: {_clean(e, self.url)}") from None

        def send() -> list[object]:
            conn.send_packed_command(chunks)
            out: list[object] = []
            for _ in keys:
                try:
                    out.append(conn.read_response())
                except redis.exceptions.ResponseError as e:  # one refused value; the rest still answer
                    out.append(e)
            return out

        try:  # retried on a broken connection as redis-py's pipeline is (the same SETs again: idempotent)
            return conn.retry.call_with_retry(send, lambda _: conn.disconnect())
        except _DOWN as e:
            conn.disconnect()
            raise StoreUnavailable(f"redis store {self.url}: {_clean(e, self.url)}") from None
        except BaseException:
            conn.disconnect()  # replies may be left unread: the connection cannot be reused
            raise
        finally:
            pool.release(conn)

    def get(self, keys: Sequence[str], heads: memoryview, pages: Sequence[memoryview]) -> list[int]:
        out = self._run([("get", (k,)) for k in keys])
        n = len(heads) // len(keys) if keys else 0
        parts = [(heads[i * n : (i + 1) * n], page) for i, page in enumerate(pages)]
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
