"""The side channel between a prefill engine and its decode ranks: ZMQ, JSON headers, strict checks.

A prefill engine's leader runs one :class:`SideChannelServer` (a ROUTER
socket on a thread); each decode rank talks to it through a
:class:`SideChannelClient` (a DEALER socket). Every message is one JSON
object frame, optionally followed by binary frames (NIXL metadata). Requests:

``hello`` [``t``, ``auth``]
    the prefill engine's :class:`Handshake`, and its NIXL agent metadata:
    what it takes to read its host pool. A prefill engine with a
    ``transfer_secret`` answers only a hello whose ``auth`` is
    :func:`hello_auth` of its ``t`` (Unix time, within ``CLOCK_SKEW_S``).
``acquire`` ``transfer``, ``slots``
    whether the pages of an export are in the host pool yet (``ready``), or
    an error when the export is unknown, expired or lost.
``release`` ``transfer``, ``rank``, ``world``
    this decode rank is done with the export (sent without waiting).

Nothing a peer sends is trusted: sizes, types and ranges are checked, and
replies to requests that were given up on are dropped by sequence number.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import zmq

from dynkv.keys import ModelFingerprint
from dynkv.layout import PageGeometry

__all__ = ["Handshake", "IncompatibleError", "SideChannelClient", "SideChannelServer", "advertised_host",
           "check_hello", "hello_auth"]

log = logging.getLogger("dynkv.disagg")

# Largest request a server accepts: requests are small; a bigger one is not from a decode rank.
_MAX_REQUEST = 1 << 20
_TICK_MS = 100

Handler = Callable[[dict[str, Any]], tuple[dict[str, Any], list[bytes]]]


class IncompatibleError(ValueError):
    """The prefill engine serves another model, geometry or dynkv version: its pages cannot be used."""


@dataclass(frozen=True)
class Handshake:
    """What a prefill engine tells a decode rank before it reads pages.

    The fingerprint fields, the page geometry and the versions must match
    the decode engine's (:meth:`check_compatible`); ``pool_addr``,
    ``page_stride`` and ``num_pages`` bound every remote read.
    """

    engine_id: str
    instance: str
    dynkv_version: str
    page_format_version: int
    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    token_bytes: int
    elem_bytes: int
    page_bytes: int
    page_stride: int
    num_pages: int
    pool_addr: int
    agent_name: str

    @classmethod
    def describe(cls, *, engine_id: str, fingerprint: ModelFingerprint, geometry: PageGeometry, page_stride: int,
                 num_pages: int, pool_addr: int, instance: str = "", agent_name: str = "") -> Handshake:
        """The handshake of an engine serving ``fingerprint`` from a pool of ``num_pages`` pages at ``pool_addr``."""
        from dynkv._version import __version__

        g, fp = geometry, fingerprint
        return cls(
            engine_id=engine_id, instance=instance, dynkv_version=__version__,
            page_format_version=fp.page_format_version, model_id=fp.model_id, dtype=fp.dtype,
            num_layers=g.num_layers, num_kv_heads=g.num_heads, head_size=fp.head_size, block_size=g.block_size,
            token_bytes=g.token_bytes, elem_bytes=g.elem_bytes, page_bytes=g.page_bytes, page_stride=page_stride,
            num_pages=num_pages, pool_addr=pool_addr, agent_name=agent_name,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> Handshake:
        """Parse a peer's handshake, checking every field's type.

        Raises
        ------
        ValueError
            A field is missing or of the wrong type.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"handshake is {type(d).__name__}: expected an object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            v = d.get(f.name)
            kind = int if f.type == "int" else str
            if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0):
                raise ValueError(f"handshake field {f.name!r} is {v!r}: expected a {'non-negative ' * (kind is int)}"
                                 f"{kind.__name__}")
            values[f.name] = v
        if values["num_pages"] and values["page_stride"] < values["page_bytes"]:
            raise ValueError(f"handshake: page_stride {values['page_stride']} < page_bytes {values['page_bytes']}")
        return cls(**values)

    def check_compatible(self, local: Handshake) -> None:
        """Raise :class:`IncompatibleError` unless pages of this engine are pages of ``local``'s."""
        keys = ("model_id", "dtype", "num_layers", "num_kv_heads", "head_size", "block_size", "token_bytes",
                "elem_bytes", "page_bytes", "page_format_version", "dynkv_version")
        diff = [f"{k} {getattr(self, k)!r} (here {getattr(local, k)!r})" for k in keys
                if getattr(self, k) != getattr(local, k)]
        if diff:
            raise IncompatibleError(
                f"prefill engine {self.engine_id} is incompatible with this decode engine: {'; '.join(diff)}. "
                "Serve the same model with the same KV dtype and block size, and the same dynkv version, "
                "on both sides; this request is recomputed"
            )


def hello_auth(secret: bytes, t: int) -> str:
    """A decode rank's proof, in its ``hello``, that it holds the deployment's secret (HMAC-SHA256 of ``t``)."""
    return hmac.new(secret, f"dynkv.side_channel.hello.v1:{t}".encode(), hashlib.sha256).hexdigest()


def check_hello(secret: bytes | None, msg: Mapping[str, Any], skew_s: float, now: float | None = None) -> str | None:
    """Why a ``hello`` is refused under ``secret`` (None: answered). Without a secret every hello is answered."""
    if secret is None:
        return None
    t, auth = msg.get("t"), msg.get("auth")
    if not isinstance(t, int) or isinstance(t, bool) or not isinstance(auth, str):
        return "hello refused: it is not signed; give this decode engine the deployment's transfer_secret"
    now = time.time() if now is None else now
    if abs(now - t) > skew_s or not hmac.compare_digest(auth, hello_auth(secret, t)):
        return ("hello refused: signed under another transfer_secret, or the clocks are more than "
                f"{skew_s:g} s apart")
    return None


def advertised_host(bind_host: str) -> str:
    """The address decode engines should dial for a side channel bound to ``bind_host``."""
    if bind_host in ("0.0.0.0", "::", "*"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return bind_host


def _endpoint(host: str, port: int | None = None) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"tcp://{h}" if port is None else f"tcp://{h}:{port}"


def _decode(frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    msg = json.loads(frames[0])
    if not isinstance(msg, dict):
        raise ValueError("expected a JSON object")
    return msg, frames[1:]


class SideChannelServer:
    """A ROUTER socket answering requests on its own thread.

    Parameters
    ----------
    host, port
        Where to bind; port 0 takes a free one (see :attr:`port`).
    handler
        ``handler(request) -> (reply, blobs)``; an exception becomes an error
        reply naming it, never a dead thread.
    tick
        Called on the thread between requests; returns how many milliseconds
        to wait for the next one before calling it again.

    Raises
    ------
    ValueError
        The address cannot be bound; the message names it.
    """

    def __init__(self, host: str, port: int, handler: Handler, tick: Callable[[], int] | None = None) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _MAX_REQUEST)
        self._sock.setsockopt(zmq.IPV6, ":" in host)
        try:
            if port:
                self._sock.bind(_endpoint(host, port))
                self.port = port
            else:
                self.port = self._sock.bind_to_random_port(_endpoint(host))
        except zmq.ZMQError as e:
            self._sock.close()
            self._ctx.term()
            raise ValueError(
                f"dynkv side channel cannot bind {host}:{port} ({e}); pick another side_channel_host/"
                "side_channel_port (port 0 takes a free one)"
            ) from None
        self.host = host
        self._handler = handler
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dynkv-side-channel-{self.port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait_ms = _TICK_MS
        while not self._stop.is_set():
            ready = self._sock.poll(wait_ms)
            if self._tick is not None:
                wait_ms = min(self._tick(), _TICK_MS)
            if not ready:
                continue
            frames = self._sock.recv_multipart()
            ident, body = frames[0], frames[1:]
            try:
                msg, blobs = _decode(body)
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                self._sock.send_multipart([ident, json.dumps({"ok": False, "error": f"bad request: {e}"}).encode()])
                continue
            try:
                reply, out = self._handler(msg)
            except Exception as e:  # a bug answering one peer must not stop the channel
                log.exception("side channel: request %r failed", msg.get("op"))
                reply, out = {"ok": False, "error": f"{type(e).__name__}: {e}"}, []
            if msg.get("noreply"):
                continue
            reply["seq"] = msg.get("seq")
            self._sock.send_multipart([ident, json.dumps(reply).encode(), *out])

    def close(self) -> None:
        """Stop the thread and close the socket."""
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._ctx.term()


class SideChannelClient:
    """A DEALER socket to one prefill engine's side channel; calls are serialized.

    Parameters
    ----------
    host, port
        The prefill engine's side channel, from ``kv_transfer_params``.
    """

    def __init__(self, host: str, port: int) -> None:
        self.address = f"{host}:{port}"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IPV6, ":" in host)
        self._sock.connect(_endpoint(host, port))
        self._lock = threading.Lock()  # one caller at a time on the socket, and never a close under a caller
        self._seq = 0
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionError(f"side channel to {self.address} is closed")

    def call(self, msg: dict[str, Any], deadline: float) -> tuple[dict[str, Any], list[bytes]]:
        """Send ``msg`` and wait for its reply until ``deadline`` (``time.monotonic()``).

        Raises
        ------
        TimeoutError
            No reply in time (the prefill engine is gone, or too busy).
        ConnectionError
            The reply is an error; its message is the peer's.
        """
        with self._lock:
            self._check_open()
            self._seq += 1
            seq = self._seq
            self._sock.send(json.dumps({**msg, "seq": seq}).encode())
            while True:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0 or not self._sock.poll(min(left_ms, _TICK_MS * 10)):
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"no answer to {msg.get('op')!r} from the side channel at {self.address}")
                    continue
                try:
                    reply, blobs = _decode(self._sock.recv_multipart())
                except (ValueError, UnicodeDecodeError) as e:
                    raise ConnectionError(f"side channel at {self.address} sent a bad reply: {e}") from None
                if reply.get("seq") != seq:
                    continue  # the answer to a request given up on earlier
                if not reply.get("ok"):
                    raise ConnectionError(f"side channel at {self.address}: {reply.get('error', 'refused')}")
                return reply, blobs

    def notify(self, msg: dict[str, Any]) -> None:
        """Send ``msg`` without waiting for (or wanting) a reply."""
        with self._lock:
            if self._closed:
                return
            try:
                self._sock.send(json.dumps({**msg, "noreply": True}).encode(), zmq.NOBLOCK)
            except zmq.Again:
                log.warning("side channel at %s: %r not sent (peer unreachable)", self.address, msg.get("op"))

    def close(self) -> None:
        """Close the socket once no caller uses it (a call in progress finishes first: at most its deadline);
        later calls raise ConnectionError. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close()
            self._ctx.term()
