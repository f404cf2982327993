"""Disaggregated serving around the KVBM harness: a prefill engine in a process of its own, a decode engine here.

The prefill engine (leader with its exporter, and its TP ranks in the same
process) runs in a child process that the test can freeze or kill; it
answers each prompt with the ``kv_transfer_params`` vLLM would return. The
decode engine is :class:`harness.Engine` (ranks as processes): its ranks pull
their head slices over NIXL from the prefill process's host pool, exactly as
in vLLM, and every block is checked byte for byte against the bytes its key
stands for (:func:`harness.page_content`), on either TP size.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from harness import Engine, Model, WorkerLost

from dynkv.config import DynKVConfig
from dynkv.disagg.params import ParamsError, RemotePrefill
from dynkv.leader import Leader

# The deployment's transfer_secret in these tests (a real one comes from secrets.token_hex).
SECRET = "test-secret-" + "0123456789abcdef" * 2


def _prefill_main(conn: Any, model: Model, cfg: dict[str, Any], tp: int, engine_id: str, version: str | None) -> None:
    import torch

    import dynkv._version

    torch.set_num_threads(1)
    if version is not None:  # pretend to be another dynkv release (the handshake reads dynkv._version)
        dynkv._version.__version__ = version
    leader = Leader(DynKVConfig.from_dict(cfg, env={}), model.geometry(), model.fingerprint(), world_size=tp,
                    engine_id=engine_id)
    leader.start_export()
    engine = Engine(leader, model, tp=tp, processes=False)
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "prefill":
                out: Any = _prefill(engine, *args)
            elif cmd == "drain":
                out = engine.drain()
            elif cmd == "stats":
                out = {**leader.stats(), "exports": leader.exporter.pending(),
                       "outcomes": {o: leader.metrics.value("dynkv_exports_total", outcome=o)
                                    for o in ("released", "expired", "lost", "empty")}}
            elif cmd == "close":
                engine.close()
                leader.close()
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as e:  # the test sees it
            conn.send(("error", repr(e)))
            continue
        conn.send(("ok", out))


def _prefill(engine: Engine, req_id: str, tokens: list[int], hold: bool) -> dict[str, Any] | None:
    """Compute a prompt, store it, export it (as vLLM's request_finished does); ``hold``: never run the stores."""
    leader = engine.leader
    keys = engine.keys(tokens)
    hit = leader.lookup(req_id, keys, 0)
    blocks = [engine.free_blocks.pop() for _ in keys]
    leader.begin_load(req_id, blocks[:hit])
    leader.store(req_id, keys[hit:], blocks[hit:])
    if hold:
        return leader.export(req_id, keys)
    engine.step(writes=list(zip(blocks[hit:], keys[hit:])))
    engine.step_until(lambda: not hit or engine.recving.get(req_id, 0) == engine.tp, "prefill loads")
    engine.recving.pop(req_id, None)
    params = leader.export(req_id, keys)  # the stores may still be in flight, as in vLLM
    engine.finish(req_id, blocks)
    return params


class PrefillProcess:
    """A prefill engine (``kv_producer``) in a child process."""

    def __init__(self, model: Model, *, tp: int = 1, engine_id: str = "prefill", version: str | None = None,
                 **cfg: Any) -> None:
        cfg.setdefault("host_pages", 64)
        cfg.setdefault("transfer_secret", SECRET)
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_prefill_main, args=(child, model, cfg, tp, engine_id, version), daemon=True)
        self.proc.start()
        child.close()

    def call(self, cmd: str, *args: Any, timeout: float = 120.0) -> Any:
        self.conn.send((cmd, args))
        if not self.conn.poll(timeout):
            raise WorkerLost(f"prefill process {self.proc.pid} did not answer {cmd!r} within {timeout} s")
        status, out = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"prefill process failed: {out}")
        return out

    def prefill(self, req_id: str, tokens: list[int], *, hold: bool = False) -> dict[str, Any] | None:
        return self.call("prefill", req_id, tokens, hold)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("close", timeout=30)
            except (WorkerLost, EOFError, BrokenPipeError, RuntimeError):
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


@dataclass
class Decoded:
    """What the decode engine did with one request."""

    req_id: str
    keys: list[bytes]
    blocks: list[int]
    local: int  # leading blocks loaded from this engine's own tiers
    pulled: int  # blocks after those, pulled from the prefill engine
    refused: str | None = None  # why the kv_transfer_params were not used
    load_errors: set[int] = field(default_factory=set)
    mismatched: list[int] = field(default_factory=list)


def decode(engine: Engine, req_id: str, tokens: list[int], params: dict[str, Any] | None, *,
           timeout: float = 120.0) -> Decoded:
    """Serve a prompt on the decode engine as the connector does in vLLM, then check every block.

    Every full block may be loaded (vLLM then computes the last token
    again); blocks whose load failed are recomputed by the "forward". The
    params are verified under the decode engine's ``transfer_secret``.
    """
    leader, bs = engine.leader, engine.model.block_size
    keys = engine.keys(tokens)
    limit = len(tokens) // bs
    local = leader.lookup(req_id, keys[:limit], 0)
    pulled, refused = 0, None
    try:
        remote = RemotePrefill.from_params(params)
        if remote is not None:
            remote = remote.verify(engine.fingerprint, keys, _secret(engine))
            got = leader.match_remote(req_id, keys[:limit], local, remote)
            if got is None:
                raise AssertionError("match_remote asked to wait: another request is pulling these pages")
            pulled = got
    except ParamsError as e:
        refused = str(e)
    n = local + pulled
    blocks = [engine.free_blocks.pop() for _ in keys]
    leader.begin_load(req_id, blocks[:n])
    leader.store(req_id, keys[n:], blocks[n:])
    engine.step(writes=list(zip(blocks[n:], keys[n:])))
    engine.step_until(lambda: not n or engine.recving.get(req_id, 0) == engine.tp, f"load of {req_id}",
                      timeout=timeout)
    engine.recving.pop(req_id, None)
    out = Decoded(req_id, keys, blocks, local, pulled, refused, {b for b in engine.errors if b in blocks[:n]})
    engine.errors -= out.load_errors
    good = [(b, k) for b, k in zip(blocks, keys) if b not in out.load_errors]
    for r in engine.ranks:
        out.mismatched += r.call("mismatches", good)
    redo = [(b, k) for b, k in zip(blocks, keys) if b in out.load_errors]
    if redo:  # vLLM recomputes the blocks whose load failed, and the connector stores them
        leader.store(req_id, [k for _, k in redo], [b for b, _ in redo])
        engine.step(writes=redo)
        for r in engine.ranks:
            out.mismatched += r.call("mismatches", redo)
    engine.finish(req_id, blocks)
    return out


def _secret(engine: Engine) -> bytes | None:
    secret = engine.leader.config.transfer_secret
    return secret.encode() if secret else None
