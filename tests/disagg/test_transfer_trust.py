"""Trusting ``kv_transfer_params``: the prefill engine's MAC, the request's own keys, private pulls. No vLLM, no NIXL.

Keys are a public hash of the model and the tokens, so params are trusted
only under the MAC of the deployment's secret, and only for the prompt whose
own keys they name. Every field the decode engine relies on is tampered with
here, one at a time, through the JSON the proxy carries: each is refused.
Without a secret, pulled pages serve their request and never join the host
tier.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from harness import Model

from dynkv.config import DynKVConfig
from dynkv.disagg.nixl import ucx_devices
from dynkv.disagg.params import CLOCK_SKEW_S, ParamsError, RemotePrefill
from dynkv.disagg.trust import RemoteGate
from dynkv.keys import block_keys
from dynkv.leader import Leader
from dynkv.metrics import Metrics
from dynkv.protocol import WorkerReport

SECRET = b"s" * 16 + b"0123456789abcdef"


def keys_of(model: Model, tokens: list[int]) -> list[bytes]:
    return block_keys(model.fingerprint(), np.asarray(tokens), model.block_size)


def prompt(rng: np.random.Generator, model: Model, blocks: int) -> list[int]:
    return rng.integers(0, 1000, blocks * model.block_size + 1).tolist()


def exported(model: Model, keys: list[bytes], *, secret: bytes | None = SECRET, expires: int | None = None,
             slots: tuple[int, ...] = (7, 8, 9)) -> dict[str, Any]:
    """The params a prefill engine returns for pages ``keys[:len(slots)]``, through JSON as the proxy passes them."""
    r = RemotePrefill("prefill-0", "10.0.0.5", 5600, "run1", "t42", model.fingerprint().digest().hex(),
                      keys[len(slots) - 1].hex(), slots, int(time.time()) + 120 if expires is None else expires)
    return json.loads(json.dumps(r.signed(secret).to_params()))


def accepted(model: Model, params: dict[str, Any], keys: list[bytes], secret: bytes | None = SECRET) -> RemotePrefill:
    return RemotePrefill.from_params(params).verify(model.fingerprint(), keys, secret)


def test_signed_params_of_the_same_prompt_are_trusted(rng: np.random.Generator) -> None:
    model = Model()
    keys = keys_of(model, prompt(rng, model, 4))
    got = accepted(model, exported(model, keys), keys)
    assert got.trusted and got.slots == (7, 8, 9) and len(got.mac) == 64
    assert "trusted" not in json.dumps(exported(model, keys))  # never read from the params


def _set(params: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(params))
    if path.startswith("dynkv."):
        out["dynkv"][path[6:]] = value
    else:
        out[path] = value
    return out


@pytest.mark.parametrize(("path", "value", "reason"), [
    ("remote_engine_id", "prefill-1", "mac"),
    ("remote_host", "10.0.0.6", "mac"),
    ("remote_port", 5601, "mac"),
    ("dynkv.instance", "run2", "mac"),
    ("dynkv.transfer", "t43", "mac"),
    ("dynkv.fingerprint", "00" * 16, "model"),
    ("dynkv.slots", [7, 8, 10], "mac"),
    ("dynkv.slots", [7, 8], "mac"),
    ("dynkv.slots", [7, 8, 9, 10], "mac"),
    ("dynkv.expires", 2**33, "mac"),
    ("dynkv.mac", "0" * 64, "mac"),
    ("dynkv.mac", "", "mac"),
    ("dynkv.mac", "zz", "mac"),
])
def test_each_tampered_field_is_refused(rng: np.random.Generator, path: str, value: Any, reason: str) -> None:
    model = Model()
    keys = keys_of(model, prompt(rng, model, 4))
    with pytest.raises(ParamsError) as e:
        accepted(model, _set(exported(model, keys), path, value), keys)
    assert e.value.reason == reason, e.value


def test_forged_last_key_for_another_prompt_is_refused(rng: np.random.Generator) -> None:
    """Prompt B sent with prompt A's params: refused as they are (A's key), and with B's key put in (the MAC)."""
    model = Model()
    a, b = keys_of(model, prompt(rng, model, 3)), keys_of(model, prompt(rng, model, 3))
    params = exported(model, a)
    with pytest.raises(ParamsError, match="hold other tokens") as e:
        accepted(model, params, b)
    assert e.value.reason == "key"
    with pytest.raises(ParamsError, match="wrong MAC") as e:
        accepted(model, _set(params, "dynkv.last_key", b[2].hex()), b)
    assert e.value.reason == "mac"
    # The same forgery on an engine without a secret passes the key check: which is why its pulls stay private.
    assert accepted(model, _set(params, "dynkv.last_key", b[2].hex()), b, secret=None).trusted is False


def test_wrong_missing_or_expired_signatures(rng: np.random.Generator) -> None:
    model = Model()
    keys = keys_of(model, prompt(rng, model, 3))
    with pytest.raises(ParamsError, match="wrong MAC.*different transfer_secret"):
        accepted(model, exported(model, keys, secret=b"another secret of 32 characters!"), keys)
    with pytest.raises(ParamsError, match="carry no MAC.*DYNKV_TRANSFER_SECRET") as e:
        accepted(model, exported(model, keys, secret=None), keys)
    assert e.value.reason == "mac"
    old = exported(model, keys, expires=int(time.time()) - CLOCK_SKEW_S - 5)
    with pytest.raises(ParamsError, match="expired") as e:
        accepted(model, old, keys)
    assert e.value.reason == "expired"
    # Within the clock skew allowed: accepted.
    assert accepted(model, exported(model, keys, expires=int(time.time()) - CLOCK_SKEW_S + 5), keys).trusted
    # Without a secret here the MAC is not checked, and nothing is trusted.
    assert accepted(model, exported(model, keys), keys, secret=None).trusted is False


def _pull(leader: Leader, req: str, keys: list[bytes], remote: RemotePrefill, blocks: list[int]) -> None:
    """A request matched to ``remote``'s pages, its pull done by every rank."""
    assert leader.lookup(req, keys, 0) == 0
    assert leader.match_remote(req, keys, 0, remote) == len(blocks)
    leader.begin_load(req, blocks)
    (load,) = leader.build_plan().loads
    assert load.pull is not None
    leader.update(WorkerReport(done={load.job: 1}))
    leader.request_finished(req)


@pytest.mark.parametrize("trusted", [True, False])
def test_only_trusted_pulls_join_the_host_tier(rng: np.random.Generator, trusted: bool) -> None:
    model = Model()
    leader = Leader(DynKVConfig.from_dict({"host_pages": 16}, env={}), model.geometry(), model.fingerprint(),
                    engine_id="decode-trust")
    try:
        keys = keys_of(model, prompt(rng, model, 3))
        remote = accepted(model, exported(model, keys), keys, secret=SECRET if trusted else None)
        assert remote.trusted is trusted
        _pull(leader, "a", keys, remote, [4, 5, 6])
        host = leader.stats()["host"]
        assert leader.metrics.value("dynkv_pages_moved_total", direction="remote_to_host") == 3
        assert (host["stored"], host["pending"], host["pinned"]) == ((3 if trusted else 0), 0, 0)
        assert not leader._importing
        # A later request with the same prompt: a host hit only where the pages were trusted.
        assert leader.lookup("b", keys, 0) == (3 if trusted else 0)
        leader.request_finished("b")
    finally:
        leader.close()


def gate(model: Model, *, role: str = "kv_consumer", accept: bool = False, secret: bytes | None = SECRET,
         clock: Any = time.monotonic) -> RemoteGate:
    return RemoteGate(model.fingerprint(), secret=secret.decode() if secret else None, kv_role=role, accept=accept,
                      metrics=Metrics(), clock=clock)


def rejected(g: RemoteGate, reason: str) -> float:
    return g._metrics.value("dynkv_remote_rejected_total", reason=reason)


def test_gate_counts_each_refusal_and_warns_once_per_interval(rng: np.random.Generator, caplog: Any) -> None:
    model = Model()
    now = [1000.0]
    g = gate(model, clock=lambda: now[0])
    a, b = keys_of(model, prompt(rng, model, 3)), keys_of(model, prompt(rng, model, 3))
    good = exported(model, a)
    caplog.set_level(logging.WARNING)
    assert g.admit("r0", good, lambda n: a[:n]).trusted
    forged = _set(good, "dynkv.last_key", b[2].hex())
    for i in range(5):
        assert g.admit(f"f{i}", forged, lambda n: b[:n]) is None
    assert rejected(g, "mac") == 5
    assert caplog.text.count("wrong MAC") == 1  # one warning for the burst
    now[0] += 11
    assert g.admit("f5", forged, lambda n: b[:n]) is None
    assert caplog.text.count("wrong MAC") == 2 and "4 more refused for the same reason" in caplog.text
    assert g.admit("k", good, lambda n: b[:n]) is None and rejected(g, "key") == 1
    assert g.admit("p", _set(good, "remote_port", "x"), lambda n: a[:n]) is None and rejected(g, "params") == 1
    assert g.admit("n", {"do_remote_decode": True}, lambda n: a[:n]) is None  # not a remote prefill: no refusal
    assert g._metrics.samples()[0].get("dynkv_remote_rejected_total{reason=params}") == 1
    assert "0123456789abcdef" not in caplog.text  # the secret is never logged


def test_kv_both_takes_remote_prefills_only_when_told(rng: np.random.Generator, caplog: Any) -> None:
    model = Model()
    keys = keys_of(model, prompt(rng, model, 3))
    params = exported(model, keys)
    caplog.set_level(logging.WARNING)
    both = gate(model, role="kv_both")
    assert both.admit("a", params, lambda n: keys[:n]) is None
    assert rejected(both, "not_accepted") == 1 and "accept_remote_prefill is off" in caplog.text
    assert gate(model, role="kv_both", accept=True).admit("a", params, lambda n: keys[:n]).trusted
    producer = gate(model, role="kv_producer")
    assert producer.admit("a", params, lambda n: keys[:n]) is None and rejected(producer, "not_accepted") == 0


def test_an_engine_without_a_secret_says_so_once_at_start(rng: np.random.Generator, caplog: Any) -> None:
    model = Model()
    caplog.set_level(logging.WARNING)
    g = gate(model, secret=None)
    assert caplog.text.count("no transfer_secret") == 1 and "serve only the request that pulled them" in caplog.text
    keys = keys_of(model, prompt(rng, model, 3))
    assert g.admit("a", exported(model, keys), lambda n: keys[:n]).trusted is False
    caplog.clear()
    gate(model)
    gate(model, role="kv_both", secret=None)  # pulls nothing: nothing to warn about
    assert "no transfer_secret" not in caplog.text


def test_ucx_devices_follow_the_side_channel_unless_configured() -> None:
    assert ucx_devices("127.0.0.1", None) == ("lo", False)
    assert ucx_devices("::1", None) == ("lo", False)
    assert ucx_devices("0.0.0.0", None) == (None, False)
    assert ucx_devices("10.1.2.3", "mlx5_0:1") == ("mlx5_0:1", True)
    assert ucx_devices("127.0.0.1", "all") == ("all", True)


def test_signing_does_not_change_the_fields(rng: np.random.Generator) -> None:
    model = Model()
    keys = keys_of(model, prompt(rng, model, 3))
    r = RemotePrefill.from_params(exported(model, keys, secret=None))
    s = r.signed(SECRET)
    assert replace(s, mac="") == r and r.signed(None) is r and s.signed(SECRET) == s
