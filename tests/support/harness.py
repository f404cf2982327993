"""A stand-in for vLLM around the KVBM: one leader, TP worker processes, a request stream.

Each worker process holds its rank's KV cache as torch tensors in one of
vLLM's layouts and runs a real :class:`dynkv.worker.Worker`. The engine
(test process) plays vLLM's scheduler: it hashes prompts into page keys, asks
the leader for prefix hits, hands out device blocks, and steps the workers
with the leader's plans. A "forward" writes each computed block with bytes that
are a function of its page key, so any loaded block can be checked for being
exactly the KV that was stored under that key, on any TP size.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from kvtensors import Shape, make_rank_kv

import dynkv
from dynkv.config import DynKVConfig
from dynkv.keys import ModelFingerprint, block_keys
from dynkv.leader import Leader
from dynkv.protocol import StepPlan, WorkerReport
from dynkv.worker import Worker

DTYPE = torch.float16


@dataclass(frozen=True)
class Model:
    num_layers: int = 3
    num_heads: int = 4
    head_size: int = 8
    block_size: int = 4
    dims: str = "LBHNC"  # physical order (L outermost: per-layer tensors), as vLLM allocates
    device: str = "cpu"  # where the KV cache lives ("cuda" on a GPU machine)

    @property
    def shape(self) -> Shape:
        return Shape("harness", num_heads=self.num_heads, head_size=self.head_size, block_size=self.block_size)

    def geometry(self) -> dynkv.PageGeometry:
        return dynkv.PageGeometry.for_model(
            num_layers=self.num_layers, num_kv_heads=self.num_heads, head_size=self.head_size,
            block_size=self.block_size, elem_bytes=DTYPE.itemsize,
        )

    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint("harness-model", "float16", self.num_layers, self.num_heads, self.head_size,
                                self.block_size)


def layer_name(layer: int) -> str:
    """vLLM's name of a layer's attention."""
    return f"model.layers.{layer}.self_attn.attn"


def page_content(key: bytes, geometry: dynkv.PageGeometry) -> np.ndarray:
    """The page stored under ``key``: ``[H, L, N, C]`` bytes drawn from the key."""
    rng = np.random.default_rng(int.from_bytes(key, "little"))
    shape = (geometry.num_heads, geometry.num_layers, geometry.block_size, geometry.token_bytes)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


class RankState:
    """One rank's KV cache and worker (inside a worker process, or in-process)."""

    def __init__(self, model: Model, config: DynKVConfig, rank: int, tp: int, pool_name: str, num_blocks: int) -> None:
        self.model = model
        self.geometry = model.geometry()
        self.heads = dynkv.head_range(rank, tp, model.num_heads)
        rng = np.random.default_rng(1000 + rank)
        self.kv = make_rank_kv(rng, model.shape, dims=model.dims, form="separate", dtype=DTYPE, heads=self.heads,
                               num_layers=model.num_layers, num_blocks=num_blocks, device=model.device)
        self.layers = self.kv.layers()
        self.worker = Worker(config, rank=rank, world_size=tp, pool_name=pool_name, fingerprint=model.fingerprint())
        self.worker.register(self.kv.view(num_heads_total=model.num_heads, head_start=self.heads[0]),
                             {layer_name(i): i for i in range(model.num_layers)})

    def _expected(self, key: bytes, layer: int) -> torch.Tensor:
        h0, h1 = self.heads
        return torch.from_numpy(page_content(key, self.geometry)[h0:h1, layer]).to(self.model.device)

    def step(self, plan: StepPlan, writes: Sequence[tuple[int, bytes]], reads: Sequence[tuple[int, bytes]] = (),
             hooks: str = "all", layer_hooks: bool = True, early: bool | str = False) -> list[tuple[int, int]]:
        """One forward: per layer, ask for the layer (``hooks``: "all", "none", "even"), read ``reads``, write.

        ``early``: the sync loads start before the step's inputs are
        prepared (the connector's ``handle_preemptions``), the rest at the
        forward; ``"scheduler"``: before that, from the scheduler (the
        worker's thread; vLLM's hook then comes too). Returns the
        ``(layer, block)`` of ``reads`` that did not hold their page when
        the forward read them (a sync load that arrived late).
        """
        if early == "scheduler":
            assert self.worker.start_scheduled(plan, layer_hooks=layer_hooks), "the scheduler may not launch"
        if early:
            self.worker.start_early(plan, layer_hooks=layer_hooks)
        self.worker.start(plan, layer_hooks=layer_hooks)
        late = []
        for layer in range(self.model.num_layers):
            if hooks == "all" or (hooks == "even" and layer % 2 == 0):
                self.worker.wait_for_layer(layer_name(layer))
            for block, key in reads:  # on a GPU, ordered after the wait like attention is
                if not torch.equal(self.kv.block(self.layers, layer, block), self._expected(key, layer)):
                    late.append((layer, block))
            for block, key in writes:  # the forward pass computes these blocks
                self.kv.set_block(self.layers, layer, block, self._expected(key, layer))
        self.worker.after_forward()
        return late

    def poll(self) -> tuple[WorkerReport, tuple[set[str], set[str]], set[int]]:
        report = self.worker.poll()
        return report, self.worker.finished(), self.worker.load_error_blocks()

    def mismatches(self, blocks: Sequence[tuple[int, bytes]]) -> list[int]:
        bad = []
        for block, key in blocks:
            for layer in range(self.model.num_layers):
                if not torch.equal(self.kv.block(self.layers, layer, block), self._expected(key, layer)):
                    bad.append(block)
                    break
        return bad

    def call(self, cmd: str, *args: Any) -> Any:
        if cmd == "wait":
            return self.worker.wait()
        if cmd == "close":
            return self.worker.close()
        return getattr(self, cmd)(*args)


def _worker_main(conn: Any, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    state = RankState(*args)
    while True:
        cmd, rest = conn.recv()
        try:
            out = state.call(cmd, *rest)
        except Exception as e:  # the engine sees the error, the process goes on
            conn.send(("error", repr(e)))
            continue
        conn.send(("ok", out))
        if cmd == "close":
            return


class _Proc:
    def __init__(self, ctx: Any, args: tuple[Any, ...]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, args), daemon=True)
        self.proc.start()
        child.close()

    def send(self, cmd: str, *args: Any) -> None:
        self.conn.send((cmd, args))

    def recv(self, timeout: float = 60.0) -> Any:
        if not self.conn.poll(timeout):
            raise WorkerLost(f"worker pid {self.proc.pid} did not answer within {timeout} s")
        try:
            status, out = self.conn.recv()
        except (EOFError, ConnectionResetError) as e:
            raise WorkerLost(f"worker pid {self.proc.pid} exited (code {self.proc.exitcode})") from e
        if status != "ok":
            raise RuntimeError(f"worker failed: {out}")
        return out

    def call(self, cmd: str, *args: Any) -> Any:
        self.send(cmd, *args)
        return self.recv()


class _Local:
    """A rank in this process: the same calls, no pipe (fast tests)."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.state = RankState(*args)
        self._out: Any = None

    def send(self, cmd: str, *args: Any) -> None:
        self._out = self.state.call(cmd, *args)

    def recv(self, timeout: float = 60.0) -> Any:
        return self._out

    def call(self, cmd: str, *args: Any) -> Any:
        return self.state.call(cmd, *args)


class WorkerLost(RuntimeError):
    pass


@dataclass
class Served:
    """What happened to one request."""

    req_id: str
    keys: list[bytes]
    blocks: list[int]
    loaded: int  # leading blocks loaded from dynkv
    load_errors: set[int] = field(default_factory=set)
    mismatched: list[int] = field(default_factory=list)
    late: list[tuple[int, int]] = field(default_factory=list)  # (layer, block) read before it arrived (sync loads)


class Engine:
    """Leader + ``tp`` workers + a scheduler loop over requests.

    ``processes=False`` runs the ranks in this process (same code path minus
    the pipes).
    """

    def __init__(self, leader: Leader, model: Model, *, tp: int, num_blocks: int = 64, processes: bool = True,
                 seed: int = 0) -> None:
        if leader.world_size != tp:
            raise ValueError(f"the leader expects {leader.world_size} ranks, the engine has {tp}")
        self.leader, self.model, self.tp = leader, model, tp
        self.fingerprint = model.fingerprint()
        args = [(model, leader.config, r, tp, leader.pool_name, num_blocks) for r in range(tp)]
        if processes:
            ctx = mp.get_context("spawn")
            self.ranks: list[Any] = [_Proc(ctx, a) for a in args]
        else:
            self.ranks = [_Local(a) for a in args]
        self.free_blocks = list(np.random.default_rng(seed).permutation(num_blocks).tolist())
        self.recving: dict[str, int] = {}
        self.sending: dict[str, int] = {}
        self.errors: set[int] = set()

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        return block_keys(self.fingerprint, np.asarray(tokens, dtype=np.int64))

    def step(self, writes: Sequence[tuple[int, bytes]] = (), reads: Sequence[tuple[int, bytes]] = (),
             **forward: Any) -> list[tuple[int, int]]:
        """One engine step: the leader's plan to every rank, a forward, then the merged reports back.

        ``reads``: blocks of sync loads the forward reads (checked layer by
        layer); ``forward``: how it asks for layers (:meth:`RankState.step`).
        Returns the reads that found their block not yet loaded, on any rank.
        """
        plan = self.leader.build_plan()
        for r in self.ranks:
            r.send("step", plan, list(writes), list(reads), forward.get("hooks", "all"),
                   forward.get("layer_hooks", True), forward.get("early", False))
        late: list[tuple[int, int]] = []
        for r in self.ranks:
            late += r.recv()
        merged = WorkerReport()
        for r in self.ranks:
            report, (sending, recving), errors = r.call("poll")
            merged = merged.merge(report)
            for req in sending:
                self.sending[req] = self.sending.get(req, 0) + 1
            for req in recving:
                self.recving[req] = self.recving.get(req, 0) + 1
            self.errors |= errors
        self.leader.update(merged)
        return late

    def step_until(self, done: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Step (as an idle engine would, a millisecond apart) until ``done()``."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} after {timeout} s: {self.leader.stats()}")
            self.step()
            time.sleep(0.001)  # copy threads get the GIL, as they do between real forward passes

    def drain(self) -> None:
        """Step until the leader has nothing queued or in flight."""
        self.step_until(self.leader.idle, "leader not idle")

    def serve(self, req_id: str, tokens: Sequence[int], *, verify: bool = True, finish: bool = True,
              sync: bool = False, **forward: Any) -> Served:
        """Run one request to completion the way vLLM would with dynkv attached.

        ``sync``: a hit all in the host tier loads in the step that computes
        the request (the connector's layer-by-layer path); ``forward`` says
        how that step's forward asks for layers (:meth:`RankState.step`).
        """
        keys = self.keys(tokens)
        loaded = self.leader.lookup(req_id, keys, 0)
        if len(keys) > len(self.free_blocks):
            raise RuntimeError("harness engine out of device blocks")
        blocks = [self.free_blocks.pop() for _ in keys]
        sync = sync and self.leader.on_host(req_id, loaded)
        self.leader.begin_load(req_id, blocks[:loaded], sync=sync)
        self.leader.store(req_id, keys[loaded:], blocks[loaded:])
        reads = list(zip(blocks[:loaded], keys[:loaded])) if sync else []
        late = self.step(writes=list(zip(blocks[loaded:], keys[loaded:])), reads=reads, **forward)
        if not sync:
            self.step_until(lambda: not loaded or self.recving.get(req_id, 0) == self.tp,
                            f"load of {req_id} not finished")
        self.recving.pop(req_id, None)
        out = Served(req_id, keys, blocks, loaded, {b for b in self.errors if b in blocks[:loaded]}, late=late)
        self.errors -= out.load_errors
        if verify:
            good = [(b, k) for b, k in zip(blocks, keys) if b not in out.load_errors]
            for r in self.ranks:
                out.mismatched += r.call("mismatches", good)
        if finish:
            self.finish(req_id, blocks)
        return out

    def finish(self, req_id: str, blocks: list[int]) -> None:
        """vLLM finished the request: wait for its stores if the leader asks, then free its blocks."""
        if self.leader.request_finished(req_id):
            self.step_until(lambda: self.sending.get(req_id, 0) == self.tp, f"stores of {req_id} not finished")
        self.sending.pop(req_id, None)
        self.free_blocks.extend(blocks)

    def kill(self, rank: int) -> None:
        """SIGKILL one worker process, as a crash would."""
        proc = self.ranks[rank].proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)

    def close(self) -> None:
        for r in self.ranks:
            try:
                r.call("close")
            except (WorkerLost, BrokenPipeError):
                pass  # a rank the test killed
            if isinstance(r, _Proc):
                r.proc.join(10)
                if r.proc.is_alive():
                    r.proc.kill()


def conversation_stream(rng: np.random.Generator, *, num_prefixes: int, requests: int, block_size: int,
                        prefix_blocks: int = 4, tail_blocks: int = 2, vocab: int = 1000) -> list[list[int]]:
    """Prompts that share a few long prefixes (full blocks only), in random order."""
    prefixes = [rng.integers(0, vocab, prefix_blocks * block_size).tolist() for _ in range(num_prefixes)]
    out = []
    for _ in range(requests):
        p = prefixes[int(rng.integers(num_prefixes))]
        n_tail = int(rng.integers(0, tail_blocks + 1)) * block_size
        out.append(p + rng.integers(0, vocab, n_tail).tolist())
    return out


def make_leader(model: Model, tmp_path=None, *, tp: int = 1, engine_id: str = "t", **cfg) -> Leader:
    cfg.setdefault("host_pages", 64)
    return Leader(DynKVConfig.from_dict(cfg, env={}), model.geometry(), model.fingerprint(), world_size=tp,
                  engine_id=f"{engine_id}-{id(cfg)}")


def serve_stream(engine: Engine, prompts: list[list[int]]) -> dict[str, int]:
    totals = {"loaded": 0, "blocks": 0}
    for i, tokens in enumerate(prompts):
        out = engine.serve(f"r{i}", tokens)
        assert out.mismatched == [], f"request {i}: blocks {out.mismatched} differ from what was stored"
        assert out.load_errors == set()
        totals["loaded"] += out.loaded
        totals["blocks"] += len(out.keys)
    engine.drain()
    return totals
