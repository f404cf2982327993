"""One engine of ``dynkv bench load``, in a process of its own: the closed loop through the engine's step loop.

Run as ``python -m dynkv.benchmarks.load.engine spec.json out.json`` by
:mod:`dynkv.benchmarks.load.run`. The engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): requests go in with
``LLMEngine.add_request`` as :class:`~dynkv.benchmarks.load.workload.ClosedLoop`
lets them, and the loop calls ``step()`` itself. A request's TTFT is from its
``add_request`` to the return of the step that produced its first token.

KV check (``spec["kv_check"]``, dynkv engines): when a request has its first
token, the blocks it stored to or loaded from dynkv's host tier are digested
on every rank with the host pages they went to or came from
(:func:`dynkv.benchmarks.e2e.kv.rank_digests`, CRC-32 per block): a stored
page must equal the block computed, a loaded block the page, and a loaded
page the page stored earlier in the run for the same token prefix (whatever
tier it went through). The run's clock stops while digests are taken, so the
check adds nothing to any request's time (disk reads in flight go on
meanwhile). The report is rewritten every few seconds: a run cut short keeps
what it measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from dynkv.benchmarks.e2e.kv import KVWatch, rank_digests
from dynkv.benchmarks.load.workload import ClosedLoop, Workload

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

__all__ = ["run"]

_SAVE_EVERY_S = 5.0
_STALL_S = 600.0  # a step loop that finishes no request this long has hung


def _prefix_key(prompt: list[int], blocks: int, block_size: int) -> str:
    return hashlib.blake2b(repr(prompt[: blocks * block_size]).encode(), digest_size=12).hexdigest()


class _Check:
    """dynkv's stores and loads of each request, digested when the request has its first token."""

    def __init__(self, llm: Any, watch: KVWatch, block_size: int) -> None:
        self.llm, self.watch, self.block_size = llm, watch, block_size
        self.stored_crc: dict[tuple[int, str], int] = {}  # (rank, prefix key) -> CRC of the page stored
        self.totals = {"requests": 0, "failed_requests": 0, "stored": 0, "loaded": 0, "loaded_vs_stored": 0,
                       "bad": 0}
        self.failures: list[dict[str, Any]] = []

    def request(self, rid: str, internal_id: str, prompt: list[int]) -> dict[str, Any]:
        seen = self.watch.pop(internal_id)
        if not seen["blocks"]:  # vLLM versions whose add_request does not return the id it adds a suffix to
            ids = [r for r in self.watch.request_ids() if r.startswith(f"{rid}-")]
            if len(ids) == 1:
                seen = self.watch.pop(ids[0])
        if not seen["blocks"]:
            raise RuntimeError(f"the scheduler never gave request {rid} ({internal_id}) blocks that were seen")
        full = len(prompt) // self.block_size
        blocks = seen["blocks"][:full]
        pos = {b: i for i, b in enumerate(blocks)}
        stored = sorted((pos[b], s) for b, s in seen["stored"].items() if b in pos)
        loaded = sorted((pos[b], s) for b, s in seen["loaded"].items() if b in pos)
        out = {"stored": len(stored), "loaded": len(loaded), "loaded_vs_stored": 0, "bad": []}
        if stored or loaded:
            ids = [blocks[i] for i, _ in stored + loaded]
            slots = [s for _, s in stored + loaded]
            for r in self.llm.collective_rpc(rank_digests, args=(ids, slots)):
                rank, crcs, pages = r["rank"], r["blocks"], r["pages"] or []
                for j, (i, _) in enumerate(stored + loaded):
                    kind = "stored" if j < len(stored) else "loaded"
                    key = (rank, _prefix_key(prompt, i + 1, self.block_size))
                    if crcs[j] != pages[j]:
                        out["bad"].append({"kind": kind, "position": i, "rank": rank, "what": "block != page"})
                    if kind == "stored":
                        self.stored_crc[key] = pages[j]
                    elif key in self.stored_crc:
                        out["loaded_vs_stored"] += 1
                        if self.stored_crc[key] != pages[j]:
                            out["bad"].append({"kind": kind, "position": i, "rank": rank,
                                               "what": "page loaded != page stored for this prefix"})
        t = self.totals
        t["requests"] += 1
        t["failed_requests"] += bool(out["bad"])
        for k in ("stored", "loaded", "loaded_vs_stored"):
            t[k] += out[k]
        t["bad"] += len(out["bad"])
        out["passed"] = not out["bad"]
        return out


def _samples(connector: Any) -> dict[str, float]:
    leader = getattr(connector, "leader", None)
    if leader is None:
        return {}
    from dynkv.connector.engine import metric_samples

    counters, gauges = metric_samples(leader.metrics.registry)
    return {**counters, **gauges}


def run(spec: dict[str, Any], out_path: Path) -> dict[str, Any]:
    """Run the workload of ``spec`` (:mod:`dynkv.benchmarks.load.run`) on one engine; report to ``out_path``."""
    from vllm import LLM, SamplingParams

    w = Workload(**{**spec["workload"], "token_range": tuple(spec["workload"]["token_range"])})
    kind = spec.get("connector")
    kwargs = dict(spec["engine"])
    if kind == "dynkv":
        kwargs["kv_transfer_config"] = {"kv_connector": "DynKVConnector", "kv_role": "kv_both",
                                        "kv_connector_module_path": "dynkv.connector",
                                        "kv_connector_extra_config": spec["extra"]}
    elif kind == "offloading":
        kwargs["kv_transfer_config"] = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                                        "kv_connector_extra_config": spec["extra"]}
    report: dict[str, Any] = {"name": spec["name"], "requests": [], "errors": []}

    def save() -> None:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, default=str))
        tmp.replace(out_path)

    t_start = time.perf_counter()
    llm = LLM(model=spec["model"], **kwargs)
    report["startup_s"] = time.perf_counter() - t_start
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    connector = core.scheduler.connector if kind else None
    block_size = int(core.vllm_config.cache_config.block_size)
    report["device_blocks"] = int(getattr(core.vllm_config.cache_config, "num_gpu_blocks", 0) or 0)
    if kind == "dynkv":
        report["dynkv"] = connector.leader.describe()
    check = None
    if spec.get("kv_check") and kind == "dynkv":
        check = _Check(llm, KVWatch(core.scheduler, connector), block_size)
    progress = os.fdopen(spec["progress_fd"], "w", buffering=1) if spec.get("progress_fd") is not None else None
    print(f"[{spec['name']}] engine up in {report['startup_s']:.1f} s", flush=True)

    # Warm-up on tokens the workload never sends (compiles kernels, first connector paths); not recorded.
    warm = [w.token_range[0]] * (2 * block_size + 1)
    llm.generate([{"prompt_token_ids": warm}], SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False),
                 use_tqdm=False)
    if check is not None:
        check.watch.take()

    prompts = w.prompts()
    sp = SamplingParams(max_tokens=w.answer_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    loop = ClosedLoop(w)
    before = _samples(connector)
    paused = 0.0  # seconds of KV digests, off the run's clock

    def clock() -> float:
        return time.perf_counter() - paused

    live: dict[str, dict[str, Any]] = {}
    t0 = clock()
    saved = last_done = time.perf_counter()
    while not loop.complete:
        while (item := loop.take()) is not None:
            c, t = item
            rid = f"c{c}-t{t}"
            rec = {"conversation": c, "turn": t, "prompt_tokens": len(prompts[c][t]), "submit_s": clock() - t0,
                   "ttft_s": None, "latency_s": None, "cached_tokens": None, "output_tokens": 0}
            internal = engine.add_request(rid, {"prompt_token_ids": prompts[c][t]}, sp)
            rec["internal_id"] = internal if isinstance(internal, str) else rid
            live[rid] = rec
            report["requests"].append(rec)
        outs = engine.step()
        now = clock() - t0
        first: list[dict[str, Any]] = []
        for out in outs:
            rec = live.get(out.request_id)
            if rec is None:
                continue
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            rec["output_tokens"] = n
            if rec["ttft_s"] is None and n:
                rec["ttft_s"] = now - rec["submit_s"]
                first.append(rec)
            if out.finished:
                rec["latency_s"] = now - rec["submit_s"]
                rec["cached_tokens"] = out.num_cached_tokens
                live.pop(out.request_id)
                loop.done(rec["conversation"], rec["turn"])
                last_done = time.perf_counter()
                if progress is not None:
                    progress.write(f"{rec['ttft_s']:.4f}\n")
        if check is not None and first:
            p0 = time.perf_counter()
            for rec in first:
                try:
                    rec["kv"] = check.request(f"c{rec['conversation']}-t{rec['turn']}", rec["internal_id"],
                                              prompts[rec["conversation"]][rec["turn"]])
                except Exception as e:  # a check that cannot run is reported, and the run goes on
                    rec["kv"] = {"error": f"{type(e).__name__}: {e}", "passed": False}
                    report["errors"].append(f"KV check of {rec['conversation']}/{rec['turn']}: {rec['kv']['error']}")
            paused += time.perf_counter() - p0
        if time.perf_counter() - last_done > _STALL_S:
            raise RuntimeError(f"no request finished for {_STALL_S:.0f} s; {len(live)} in flight")
        if time.perf_counter() - saved > _SAVE_EVERY_S:
            report["wall_s"] = clock() - t0
            save()
            saved = time.perf_counter()
    report["wall_s"] = clock() - t0
    report["kv_check_s"] = paused
    after = _samples(connector)
    report["samples"] = {k: after[k] - before.get(k, 0.0) if "total" in k or "_sum" in k or "_count" in k else after[k]
                         for k in after}
    if connector is not None and getattr(connector, "leader", None) is not None:
        report["tiers"] = connector.leader.stats()
    if check is not None:
        report["kv"] = {**check.totals, "passed": check.totals["failed_requests"] == 0
                        and not any("KV check" in e for e in report["errors"])}
    save()
    if progress is not None:
        progress.close()
    engine.engine_core.shutdown()
    return report


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
