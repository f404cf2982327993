"""What a decode engine accepts of a request's ``kv_transfer_params``: checked, counted, warned about.

A request's ``kv_transfer_params`` come from whoever sent the request. The
decode engine's connector hands them to a :class:`RemoteGate`, which refuses
them unless the engine pulls at all (``kv_consumer``, or ``kv_both`` with
``accept_remote_prefill``), they parse, name this model, carry the MAC of the
deployment's ``transfer_secret`` and name pages that hold this request's own
tokens (:meth:`dynkv.disagg.RemotePrefill.verify`). A refused request is
computed here, as if it had come without params; each refusal is counted in
``dynkv_remote_rejected_total{reason}`` and warned about at most once per
reason every ``warn_interval_s`` (a client sending forged params by the
thousand must not flood the log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dynkv.disagg.params import ParamsError, RemotePrefill
from dynkv.keys import ModelFingerprint
from dynkv.metrics import Metrics

__all__ = ["RemoteGate"]

log = logging.getLogger("dynkv.disagg")


class RemoteGate:
    """The decode side's checks of ``kv_transfer_params`` for one engine.

    Parameters
    ----------
    fingerprint
        This engine's model fingerprint (keys are seeded with it).
    secret
        The deployment's ``transfer_secret``, or None: then no params are
        trusted, and pages pulled for a request serve that request only.
    kv_role
        ``kv_consumer`` pulls; ``kv_both`` pulls only with ``accept``;
        ``kv_producer`` never does.
    accept
        ``accept_remote_prefill``.
    metrics
        Where refusals are counted.
    warn_interval_s, clock
        At most one warning per reason per interval of ``clock`` (seconds).
    """

    def __init__(self, fingerprint: ModelFingerprint, *, secret: str | None, kv_role: str, accept: bool,
                 metrics: Metrics, warn_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fingerprint = fingerprint
        self._secret = secret.encode() if secret else None
        self.kv_role = kv_role
        self.pulls = kv_role == "kv_consumer" or (kv_role == "kv_both" and accept)
        self._metrics = metrics
        self._interval, self._clock = warn_interval_s, clock
        self._warned: dict[str, float] = {}
        self._quiet: dict[str, int] = {}
        if self.pulls and self._secret is None:
            log.warning("dynkv: no transfer_secret (DYNKV_TRANSFER_SECRET): this engine cannot tell a prefill "
                        "engine's kv_transfer_params from forged ones, so pages it pulls serve only the request "
                        "that pulled them and never join its host tier; give every engine of the deployment the "
                        "same secret")

    def admit(self, req_id: str, params: Mapping[str, Any] | None,
              keys: Callable[[int], Sequence[bytes]]) -> RemotePrefill | None:
        """The remote prefill to pull for a request, or None: it is computed here.

        ``keys(n)`` gives the request's first ``n`` page keys, computed from
        its own tokens.
        """
        if not params or not params.get("do_remote_prefill"):
            return None
        if not self.pulls:
            if self.kv_role == "kv_both":
                self._refuse(req_id, "not_accepted", "kv_transfer_params ask for a remote prefill, but this kv_both "
                             "engine does not take them (accept_remote_prefill is off)")
            return None
        try:
            remote = RemotePrefill.from_params(params)
            if remote is None:
                return None
            return remote.verify(self.fingerprint, keys(len(remote.slots)), self._secret)
        except ParamsError as e:
            self._refuse(req_id, e.reason, str(e))
            return None

    def _refuse(self, req_id: str, reason: str, why: str) -> None:
        self._metrics.remote_rejected.labels(reason).inc()
        now = self._clock()
        last = self._warned.get(reason)
        if last is not None and now - last < self._interval:
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            return
        self._warned[reason] = now
        more = self._quiet.pop(reason, 0)
        also = f" ({more} more refused for the same reason since the last warning)" if more else ""
        log.warning("dynkv: request %s: %s; its prompt is computed here%s", req_id, why, also)
