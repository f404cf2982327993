"""``kv_transfer_params``: what a prefill engine tells its decode engine, through the proxy.

The prefill engine's connector returns them when a request that asked for a
remote decode (``do_remote_decode``) finishes; the proxy passes them on with
the same request to a decode engine, whose connector reads them back. They
cross the network and a proxy nobody vouches for, so every field is checked
here; slots are bound-checked again against the prefill engine's handshake
before any byte moves.

Page keys are a public hash of the model fingerprint and the tokens, so a
client could pair one prompt with the params of another and a last key it
computed itself. The prefill engine therefore signs what the decode engine
relies on (engine, side channel, run, export, fingerprint, last key, page
slots and so the block count, expiry) with HMAC-SHA256 under the deployment's
``transfer_secret``; the decode engine checks that MAC and recomputes the last
key from the request's own tokens (:meth:`RemotePrefill.verify`). Only params
that pass both may add pages to its host tier; without a secret, pulled pages
serve the request that pulled them and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dynkv.keys import ModelFingerprint

__all__ = ["CLOCK_SKEW_S", "MAX_PAGES", "ParamsError", "RemotePrefill", "asks_remote_decode"]

# Pages one request may name (4 M tokens at 16 tokens per block).
MAX_PAGES = 1 << 18
_HEX = re.compile(r"^[0-9a-f]+$")
_TOKEN = re.compile(r"^[0-9A-Za-z_.:\-]{1,128}$")
# How far the prefill engine's clock may run behind the decode engine's before a fresh export looks expired.
CLOCK_SKEW_S = 30
_MAC_DOMAIN = "dynkv.kv_transfer_params.v1"


class ParamsError(ValueError):
    """``kv_transfer_params`` that cannot be used; the decode engine recomputes the prompt.

    ``reason`` names the check that failed, as counted in
    ``dynkv_remote_rejected_total``: ``params`` (malformed), ``model``
    (another model), ``mac`` (missing or wrong MAC), ``expired``, ``key``
    (the pages hold other tokens than the request's prompt).
    """

    def __init__(self, message: str, reason: str = "params") -> None:
        super().__init__(message)
        self.reason = reason


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
    expires
        Unix time (s) after which the export is gone from the prefill engine.
    mac
        Hex HMAC-SHA256 of every field above under the deployment's
        ``transfer_secret`` (:meth:`signed`); empty when the prefill engine
        has no secret.
    trusted
        Set by :meth:`verify` when the MAC checked out: the pulled pages may
        join the decode engine's host tier. Never read from the params.
    """

    engine_id: str
    host: str
    port: int
    instance: str
    transfer: str
    fingerprint: str
    last_key: str
    slots: tuple[int, ...]
    expires: int = 0
    mac: str = ""
    trusted: bool = False

    def _mac(self, secret: bytes) -> str:
        # The fields as one JSON array (its length prefix makes the slots that follow unambiguous), then the
        # slots as little-endian uint64: a tenth of the time of JSON at 8k pages.
        head = [_MAC_DOMAIN, self.engine_id, self.host, self.port, self.instance, self.transfer, self.fingerprint,
                self.last_key, self.expires, len(self.slots)]
        mac = hmac.new(secret, json.dumps(head, separators=(",", ":")).encode(), hashlib.sha256)
        mac.update(np.asarray(self.slots, dtype="<u8").tobytes())
        return mac.hexdigest()

    def signed(self, secret: bytes | None) -> RemotePrefill:
        """These params with their MAC under ``secret`` (unchanged, unsigned, without one)."""
        return self if not secret else replace(self, mac=self._mac(secret))

    def verify(self, fingerprint: ModelFingerprint, keys: Sequence[bytes], secret: bytes | None, *,
               now: float | None = None) -> RemotePrefill:
        """Check that the exported pages are this engine's model and this request's prompt.

        ``keys`` are the page keys this engine computed from the request's own
        tokens, at least ``len(slots)`` of them: the last exported page's key
        must be the request's key of that block. With a ``secret``, the MAC
        must be the one the prefill engine made under the same secret
        (compared in constant time) and the export must not have expired;
        the result is then ``trusted``. Without one, the MAC cannot be
        checked and the result is not trusted (its pages are for this request
        only).

        Raises
        ------
        ParamsError
            The prefill engine serves another model, the MAC is missing or
            wrong, the export expired, or its pages hold other tokens; the
            message says which and ``reason`` names it.
        """
        mine = fingerprint.digest().hex()
        if self.fingerprint != mine:
            raise ParamsError(
                f"prefill engine {self.engine_id} serves another model (fingerprint {self.fingerprint}, here {mine}): "
                "serve the same model with the same KV dtype and block size on both engines", "model"
            )
        if secret:
            if not self.mac:
                raise ParamsError(
                    f"the params of prefill engine {self.engine_id} carry no MAC: give the prefill engines the same "
                    "transfer_secret (DYNKV_TRANSFER_SECRET) as this engine", "mac"
                )
            if not hmac.compare_digest(self.mac, self._mac(secret)):
                raise ParamsError(
                    f"the params of prefill engine {self.engine_id} carry a wrong MAC: they were altered on the way, "
                    "or the engines were given different transfer_secret values", "mac"
                )
            now = time.time() if now is None else now
            if now > self.expires + CLOCK_SKEW_S:
                raise ParamsError(
                    f"export {self.transfer} of prefill engine {self.engine_id} expired {now - self.expires:.0f} s "
                    "ago (export_timeout_s on the prefill engine, or clocks apart by more than "
                    f"{CLOCK_SKEW_S} s)", "expired"
                )
        n = len(self.slots)
        if n > len(keys) or keys[n - 1].hex() != self.last_key:
            raise ParamsError(
                f"the {n} pages exported by prefill engine {self.engine_id} hold other tokens than this request's "
                f"prompt ({len(keys)} full blocks here): the proxy must send the decode engine the same prompt", "key"
            )
        return replace(self, trusted=bool(secret))

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
                "expires": self.expires,
                "mac": self.mac,
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
        expires = d.get("expires", 0)
        if not isinstance(expires, int) or isinstance(expires, bool) or not 0 <= expires < 1 << 40:
            raise ParamsError(f"kv_transfer_params['dynkv']['expires'] is {expires!r}: expected a Unix time")
        mac = d.get("mac", "")
        if mac != "" and not (isinstance(mac, str) and len(mac) == 64 and _HEX.match(mac)):
            raise ParamsError(f"kv_transfer_params['dynkv']['mac'] is {str(mac)[:80]!r}: expected 64 hex digits",
                              "mac")
        return cls(
            engine_id=str(engine_id)[:128], host=host, port=port, instance=d["instance"], transfer=d["transfer"],
            fingerprint=_hex(d, "fingerprint", 16), last_key=_hex(d, "last_key", 16), slots=tuple(slots),
            expires=expires, mac=mac,
        )
