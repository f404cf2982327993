"""``kv_transfer_params``: what a prefill engine tells its decode engine, through the proxy.

The prefill engine's connector returns them when a request that asked for a
remote decode (``do_remote_decode``) finishes; the proxy passes them on with
the same request to a decode engine, whose connector reads them back. They
cross the network and a proxy nobody vouches for, so every field is checked
here; slots are bound-checked again against the prefill engine's handshake
before any byte moves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dynkv.keys import ModelFingerprint

__all__ = ["MAX_PAGES", "ParamsError", "RemotePrefill", "asks_remote_decode"]

# Pages one request may name (4 M tokens at 16 tokens per block).
MAX_PAGES = 1 << 18
_HEX = re.compile(r"^[0-9a-f]+$")
_TOKEN = re.compile(r"^[0-9A-Za-z_.:\-]{1,128}$")


class ParamsError(ValueError):
    """``kv_transfer_params`` that cannot be used; the decode engine recomputes the prompt."""


def asks_remote_decode(params: Mapping[str, Any] | None) -> bool:
    """True when a request's ``kv_transfer_params`` ask this (prefill) engine to export its pages."""
    return bool(params) and bool(params.get("do_remote_decode"))


def _field(d: Mapping[str, Any], name: str, kind: type) -> Any:
    value = d.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ParamsError(f"kv_transfer_params['dynkv'][{name!r}] is {value!r}: expected a {kind.__name__}")
    return value


def _hex(d: Mapping[str, Any], name: str, nbytes: int) -> str:
    value = _field(d, name, str)
    if len(value) != 2 * nbytes or not _HEX.match(value):
        raise ParamsError(f"kv_transfer_params['dynkv'][{name!r}] is {value!r}: expected {2 * nbytes} hex digits")
    return value


@dataclass(frozen=True)
class RemotePrefill:
    """Pages a prefill engine exported for one request.

    Parameters
    ----------
    engine_id
        The prefill engine's vLLM engine id (for logs and metrics).
    host, port
        Its side channel (ZMQ), where decode ranks fetch the NIXL metadata
        and release the pages.
    instance
        Names this run of the prefill engine; its handshake carries the same.
    transfer
        Names this export on the prefill engine.
    fingerprint
        Hex digest of the prefill engine's model fingerprint.
    last_key
        Hex key of the last exported page: keys chain, so it matching the
        decode engine's own key for that block proves every earlier page
        holds the same tokens of the same model.
    slots
        Host-pool slot of each exported page, in block order.
    """

    engine_id: str
    host: str
    port: int
    instance: str
    transfer: str
    fingerprint: str
    last_key: str
    slots: tuple[int, ...]

    def check(self, fingerprint: ModelFingerprint, keys: Sequence[bytes]) -> None:
        """Check that the exported pages are this engine's model and this request's prompt.

        ``keys`` are the request's page keys, at least ``len(slots)`` of them.

        Raises
        ------
        ParamsError
            The prefill engine serves another model, or its pages hold other
            tokens; the message says which.
        """
        mine = fingerprint.digest().hex()
        if self.fingerprint != mine:
            raise ParamsError(
                f"prefill engine {self.engine_id} serves another model (fingerprint {self.fingerprint}, here {mine}): "
                "serve the same model with the same KV dtype and block size on both engines"
            )
        n = len(self.slots)
        if n > len(keys) or keys[n - 1].hex() != self.last_key:
            raise ParamsError(
                f"the {n} pages exported by prefill engine {self.engine_id} hold other tokens than this request's "
                f"prompt ({len(keys)} full blocks here): the proxy must send the decode engine the same prompt"
            )

    def to_params(self) -> dict[str, Any]:
        """The ``kv_transfer_params`` a prefill engine returns (vLLM's field names where they exist)."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "dynkv": {
                "instance": self.instance,
                "transfer": self.transfer,
                "fingerprint": self.fingerprint,
                "last_key": self.last_key,
                "slots": list(self.slots),
            },
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> RemotePrefill | None:
        """The remote prefill a request's ``kv_transfer_params`` name, or None when they name none.

        Raises
        ------
        ParamsError
            They ask for a remote prefill but are malformed, or come from an
            engine that does not run dynkv; the message says which field.
        """
        if not params or not params.get("do_remote_prefill"):
            return None
        d = params.get("dynkv")
        if not isinstance(d, Mapping):
            raise ParamsError(
                "kv_transfer_params ask for a remote prefill but carry no 'dynkv' entry: the prefill engine does "
                "not run DynKVConnector as kv_producer; run dynkv on both engines"
            )
        engine_id = params.get("remote_engine_id")
        host = params.get("remote_host")
        port = params.get("remote_port")
        if not isinstance(host, str) or not 0 < len(host) <= 255:
            raise ParamsError(f"kv_transfer_params['remote_host'] is {host!r}: expected a host name or address")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ParamsError(f"kv_transfer_params['remote_port'] is {port!r}: expected a port in [1, 65535]")
        for name, value in (("instance", d.get("instance")), ("transfer", d.get("transfer"))):
            if not isinstance(value, str) or not _TOKEN.match(value):
                raise ParamsError(f"kv_transfer_params['dynkv'][{name!r}] is {value!r}: expected a short token")
        slots = d.get("slots")
        if not isinstance(slots, list) or not 0 < len(slots) <= MAX_PAGES:
            raise ParamsError(f"kv_transfer_params['dynkv']['slots'] must be a list of 1 to {MAX_PAGES} page slots")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in slots):
            bad = next(s for s in slots if not isinstance(s, int) or isinstance(s, bool) or s < 0)
            raise ParamsError(f"kv_transfer_params['dynkv']['slots'] holds {bad!r}: expected integers >= 0")
        return cls(
            engine_id=str(engine_id)[:128], host=host, port=port, instance=d["instance"], transfer=d["transfer"],
            fingerprint=_hex(d, "fingerprint", 16), last_key=_hex(d, "last_key", 16), slots=tuple(slots),
        )
