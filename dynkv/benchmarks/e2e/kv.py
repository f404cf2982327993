"""KV checks and worker traces of ``dynkv bench e2e``, on every TP rank.

- **KV digests** (:func:`rank_digests`, run on each worker through
  ``LLM.collective_rpc``): a CRC-32 of each of a request's KV blocks, this
  rank's heads in page layout, and of the dynkv host pages the connector
  copied them to or from. :class:`KVWatch` records which blocks a request
  got and which pages its stores and loads named; :func:`compare` says
  whether the pages stored equal the blocks computed, the blocks loaded
  equal the pages, and a request's blocks equal another engine's (vLLM's
  own KV of the same prompt).
- **Worker traces** (:func:`start_trace`, :func:`stop_trace`):
  ``torch.profiler`` inside each worker process, so a TP run is traced
  where its GPU work is launched (a trace of the engine's process sees no
  kernels of workers in other processes).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

__all__ = ["KVWatch", "compare", "rank_digests", "start_trace", "stop_trace"]

_CHUNK_PAGES = 64  # blocks gathered at once for a digest (128 MiB of Llama-3-8B pages)
_profiler: dict[str, Any] = {}  # the worker process's running trace


def _rank(worker: Any) -> tuple[int, int]:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank(), int(worker.vllm_config.parallel_config.tensor_parallel_size)


def _dynkv_worker() -> Any:
    """This process's dynkv worker, when the engine runs the dynkv connector."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    from dynkv.worker import Worker

    if not has_kv_transfer_group():
        return None
    w = getattr(get_kv_transfer_group(), "worker", None)
    return w if isinstance(w, Worker) and w.view is not None else None


def _view(worker: Any, dyn: Any) -> Any:
    """This rank's KV cache as a PagedView: the connector's, or one made from the model runner's tensors."""
    if dyn is not None:
        return dyn.view
    from dynkv.connector.engine import distinct_layers, model_geometry, paged_view

    runner = worker.model_runner
    kcc = getattr(runner, "kv_cache_config", None)
    geometry, _ = model_geometry(worker.vllm_config, kcc)
    layers = distinct_layers({str(i): t for i, t in enumerate(runner.kv_caches)})
    num_blocks = kcc.num_blocks if kcc is not None else int(worker.vllm_config.cache_config.num_gpu_blocks)
    rank, world = _rank(worker)
    return paged_view(layers, num_blocks, geometry, rank, world)


def rank_digests(worker: Any, block_ids: list[int], slots: list[int] | None = None) -> dict[str, Any]:
    """On one worker: CRC-32 of each block's KV (this rank's heads, page layout) and of host pages ``slots``.

    ``slots`` needs the dynkv connector (its host pool); ``None`` or an
    empty list: blocks only. Waits for the connector's copies in flight.
    """
    import torch

    from dynkv.memory import PageBuffer
    from dynkv.ops import gather

    dyn = _dynkv_worker()
    view = _view(worker, dyn)
    g = view.geometry
    rank, world = _rank(worker)
    lo = view.head_start * g.num_layers * g.tile_bytes
    hi = lo + view.num_heads * g.num_layers * g.tile_bytes
    if dyn is not None:
        dyn.wait()
    if view.device.type == "cuda":
        torch.cuda.synchronize(view.device)
    blocks: list[int] = []
    chunk = max(1, min(_CHUNK_PAGES, len(block_ids)))
    scratch = torch.empty(chunk * g.page_bytes, dtype=torch.uint8, device=view.device)  # only [lo, hi) is read
    pages_scratch = PageBuffer.from_tensor(g, scratch, g.page_bytes)
    for i in range(0, len(block_ids), chunk):
        ids = [int(b) for b in block_ids[i: i + chunk]]
        gather(view, pages_scratch, ids, list(range(len(ids))))
        rows = scratch.view(chunk, g.page_bytes)[: len(ids), lo:hi].cpu().contiguous().numpy()
        blocks += [zlib.crc32(row) for row in rows]
    pages: list[int] | None = None
    if slots:
        if dyn is None:
            raise ValueError("page digests need the dynkv connector's host pool; this engine runs none")
        buf = dyn.host_pages()
        pool = buf.owner.as_tensor().numpy()
        stride = buf.page_stride
        pages = [zlib.crc32(pool[s * stride + lo: s * stride + hi]) for s in slots]
    return {"rank": rank, "world_size": world, "heads": [view.head_start, view.head_start + view.num_heads],
            "blocks": blocks, "pages": pages}


class KVWatch:
    """What an engine did for each request: its blocks, and the pages its dynkv stores and loads named.

    Wraps the scheduler's ``schedule`` (every engine) and the dynkv
    connector's ``build_connector_meta`` (with the connector) in place;
    :meth:`take` hands over what was seen since the last call, :meth:`pop` one request's.
    """

    def __init__(self, scheduler: Any, connector: Any = None) -> None:
        self._blocks: dict[str, list[int]] = {}
        self._stored: dict[str, dict[int, int]] = {}  # req -> block -> slot
        self._loaded: dict[str, dict[int, int]] = {}
        schedule = scheduler.schedule

        def watched_schedule(*args: Any, **kwargs: Any) -> Any:
            out = schedule(*args, **kwargs)
            self._see_blocks(out)
            return out

        scheduler.schedule = watched_schedule
        if connector is not None:
            build = connector.build_connector_meta

            def watched_build(scheduler_output: Any) -> Any:
                meta = build(scheduler_output)
                self._see_plan(getattr(meta, "plan", None))
                return meta

            connector.build_connector_meta = watched_build

    def _see_blocks(self, out: Any) -> None:
        for new in getattr(out, "scheduled_new_reqs", ()) or ():
            self._blocks[new.req_id] = list(new.block_ids[0]) if new.block_ids else []
        cached = getattr(out, "scheduled_cached_reqs", None)
        if cached is None:
            return
        resumed = getattr(cached, "resumed_req_ids", None) or set()
        for req_id, ids in zip(cached.req_ids, cached.new_block_ids):
            if ids is None:
                continue
            if req_id in resumed:
                self._blocks[req_id] = list(ids[0])
            else:
                self._blocks.setdefault(req_id, []).extend(ids[0])

    def _see_plan(self, plan: Any) -> None:
        if plan is None:
            return
        for op in plan.stores:
            self._stored.setdefault(op.req_id, {}).update(zip(op.block_ids, op.slots))
        for op in plan.loads:
            self._loaded.setdefault(op.req_id, {}).update(zip(op.block_ids, op.slots))

    def request_ids(self) -> list[str]:
        """The requests whose blocks were seen and not yet handed over."""
        return list(self._blocks)

    def pop(self, req_id: str) -> dict[str, Any]:
        """What was seen of one request (as in :meth:`take`), forgotten here; the others' records stay."""
        return {"blocks": self._blocks.pop(req_id, []), "stored": self._stored.pop(req_id, {}),
                "loaded": self._loaded.pop(req_id, {})}

    def take(self) -> dict[str, dict[str, Any]]:
        """``{req_id: {"blocks": [...], "stored": {block: slot}, "loaded": {block: slot}}}`` since the last call."""
        out = {r: {"blocks": b, "stored": self._stored.get(r, {}), "loaded": self._loaded.get(r, {})}
               for r, b in self._blocks.items()}
        self._blocks, self._stored, self._loaded = {}, {}, {}
        return out


def digests(llm: Any, seen: dict[str, Any], full_blocks: int) -> dict[str, Any]:
    """Digests of the one request in ``seen`` (from :meth:`KVWatch.take`): its first ``full_blocks`` blocks
    on every rank, and the pages its stores and loads named (per block position)."""
    if len(seen) != 1:
        raise ValueError(f"expected the blocks of one request, saw {len(seen)}")
    (req,) = seen.values()
    blocks = req["blocks"][:full_blocks]
    pos = {b: i for i, b in enumerate(blocks)}
    copies = {kind: sorted((pos[b], s) for b, s in req[kind].items() if b in pos) for kind in ("stored", "loaded")}
    slots = [s for kind in ("stored", "loaded") for _, s in copies[kind]]
    ranks = llm.collective_rpc(rank_digests, args=(blocks, slots))
    out: dict[str, Any] = {"blocks": len(blocks), "ranks": []}
    for r in sorted(ranks, key=lambda x: x["rank"]):
        pages = iter(r["pages"] or [])
        paged = {kind: [(i, next(pages)) for i, _ in copies[kind]] for kind in ("stored", "loaded")}
        out["ranks"].append({"rank": r["rank"], "heads": r["heads"], "blocks": r["blocks"], **paged})
    return out


def compare(d: dict[str, Any], ref: dict[str, Any] | None = None) -> dict[str, Any]:
    """Of one request's digests (:func:`digests`): stored pages = blocks, loaded blocks = pages, and
    blocks = ``ref``'s (another request of the same prompt), per block position over every rank.

    Each result is ``{"equal": n, "of": m, "first_differing": position or None}``.
    """

    def tally(pairs: list[tuple[int, bool]]) -> dict[str, Any]:
        bad = sorted({i for i, same in pairs if not same})
        return {"equal": len({i for i, _ in pairs}) - len(bad), "of": len({i for i, _ in pairs}),
                "first_differing": bad[0] if bad else None}

    out: dict[str, Any] = {}
    for kind in ("stored", "loaded"):
        pairs = [(i, rk["blocks"][i] == crc) for rk in d["ranks"] for i, crc in rk[kind]]
        if pairs:
            out[kind] = tally(pairs)
    if ref is not None:
        n = min(d["blocks"], ref["blocks"])
        if len(d["ranks"]) != len(ref["ranks"]):
            raise ValueError(f"{len(d['ranks'])} ranks against {len(ref['ranks'])}: not the same TP size")
        out["vs_reference"] = tally([(i, a["blocks"][i] == b["blocks"][i])
                                     for a, b in zip(d["ranks"], ref["ranks"]) for i in range(n)])
    return out


def start_trace(worker: Any) -> int:
    """On one worker: start ``torch.profiler`` (CPU and CUDA); :func:`stop_trace` ends it. Returns the rank."""
    from dynkv.benchmarks.e2e.probe import profiler

    if "prof" in _profiler:
        raise RuntimeError("a trace is already running in this worker")
    prof = profiler()
    prof.start()
    _profiler["prof"] = prof
    return _rank(worker)[0]


def stop_trace(worker: Any, path: str) -> dict[str, Any]:
    """On one worker: end the trace, write it to ``path`` with ``-rank{r}`` before the suffix (gzip), summarize it."""
    from dynkv.benchmarks.e2e.probe import export_trace

    prof = _profiler.pop("prof", None)
    if prof is None:
        raise RuntimeError("no trace is running in this worker")
    prof.stop()
    rank = _rank(worker)[0]
    out = Path(path)
    return {"rank": rank, **export_trace(prof, out.with_name(out.name.replace(".json.gz", f"-rank{rank}.json.gz")))}
