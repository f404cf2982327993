"""One engine of ``dynkv bench e2e``: TTFT per serving path, greedy tokens and decode tokens/s.

Run as ``python -m dynkv.benchmarks.e2e.engine spec.json out.json`` by :mod:`dynkv.benchmarks.e2e.run`,
one process per engine so that each starts on a clean device. The engine core
runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the KV
connector can be read and the engine stepped between measurements. The
report is rewritten after every measurement: a run cut short keeps what it
measured.

TTFT is the wall time of ``LLM.generate`` of one request with
``max_tokens=1`` while the engine is otherwise idle (every earlier transfer
reported, every disk write done). vLLM's request metrics split it: ``queue_s``
(submit to queued: input processing), ``wait_s`` (queued to first scheduled:
the wait for a connector's load), ``forward_s`` (scheduled to first token:
prefill or the last block's recompute, and sampling) and ``tail_s`` (output
processing).

How each path is forced, per prompt length:

- ``recompute`` / ``device`` (no connector): ``reset_prefix_cache()`` before
  each run, or not.
- ``host`` (dynkv): reset vLLM's prefix cache only (``reset_connector`` stays
  False, so dynkv's tiers keep their pages).
- ``disk`` (dynkv): first push the prompt out of the host tier with filler
  prompts whose pages fill it (fillers are seen once, so the disk tier's
  frequency filter keeps them off the disk), then reset vLLM's prefix cache.
- ``offload`` (vLLM's ``OffloadingConnector``): reset vLLM's prefix cache.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dynkv.benchmarks.e2e.kv import KVWatch, digests, start_trace, stop_trace
from dynkv.benchmarks.e2e.probe import HostSample, apply_variant, block_device, disk_batches, traced, variant_paths

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

__all__ = ["kernels", "run"]

# Stepping an idle engine until its connector reports nothing in flight.
_DRAIN_TIMEOUT_S = 300.0
# Paths whose first request's KV is digested (with spec["verify_kv"]): vLLM's own KV of the prompt, and dynkv's.
_KV_CHECKED = ("recompute", "device", "miss", "host", "disk")


class _Engine:
    """A ``vllm.LLM`` with its connector (if any), and the measurements the spec asks for."""

    def __init__(self, spec: dict[str, Any], out_path: Path) -> None:
        from vllm import LLM

        self.spec = spec
        self.out_path = out_path
        self.report: dict[str, Any] = {"name": spec["name"], "lengths": {}, "errors": []}
        kwargs = dict(spec["engine"])
        kind = spec.get("connector")
        if kind == "dynkv":
            kwargs["kv_transfer_config"] = {"kv_connector": "DynKVConnector", "kv_role": "kv_both",
                                            "kv_connector_module_path": "dynkv.connector",
                                            "kv_connector_extra_config": spec["extra"]}
        elif kind == "offload":
            kwargs["kv_transfer_config"] = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                                            "kv_connector_extra_config": spec["extra"]}
        t0 = time.perf_counter()
        self.llm = LLM(model=spec["model"], **kwargs)
        self.report["startup_s"] = time.perf_counter() - t0
        core = self.llm.llm_engine.engine_core.engine_core
        self.connector = core.scheduler.connector if kind else None
        self.report["async_scheduling"] = bool(getattr(core.vllm_config.scheduler_config, "async_scheduling", False))
        self.report["kernels"] = kernels(core.vllm_config)
        self.block_size = int(core.vllm_config.cache_config.block_size)
        self._fillers = 0
        self.steps = 0  # scheduler steps the connector saw (each builds its metadata)
        disk = getattr(getattr(self.connector, "leader", None), "disk", None)
        self._has_disk = disk is not None
        self._disk_device = block_device(disk.files[0]) if disk is not None else None
        # The workers run in this process (one GPU, the uni executor): one trace sees the scheduler and the GPU.
        self.in_process = getattr(core.vllm_config.parallel_config, "world_size", 1) == 1
        self.watch = KVWatch(core.scheduler, self.connector) if spec.get("verify_kv") else None
        if self.connector is not None:
            build = self.connector.build_connector_meta

            def counted(scheduler_output: Any) -> Any:
                self.steps += 1
                return build(scheduler_output)

            self.connector.build_connector_meta = counted
        self.save()

    # -- plumbing ----------------------------------------------------------------

    def save(self) -> None:
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, default=str))
        tmp.replace(self.out_path)

    def drain(self) -> None:
        """Step the idle engine until the connector has nothing in flight (stores, loads, disk writes)."""
        if self.connector is None:
            return
        deadline = time.monotonic() + _DRAIN_TIMEOUT_S
        while self.connector.has_pending_push_work():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the connector still had work in flight after {_DRAIN_TIMEOUT_S:.0f} s")
            self.llm.llm_engine.step()
            time.sleep(0.001)

    def reset_device_cache(self) -> None:
        # reset_connector stays False: only vLLM's own prefix cache is emptied.
        # vLLM refuses while any block is held, e.g. by a delayed free whose finished_sending
        # arrives a step later: step the idle engine until it accepts.
        deadline = time.monotonic() + _DRAIN_TIMEOUT_S
        while not self.llm.reset_prefix_cache():
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM refused to reset its prefix cache with no request running")
            self.drain()
            self.llm.llm_engine.step()
            time.sleep(0.001)

    def samples(self) -> dict[str, float]:
        if self.spec.get("connector") != "dynkv":
            return {}
        from dynkv.connector.engine import metric_samples

        counters, gauges = metric_samples(self.connector.leader.metrics.registry)
        return {**counters, **gauges}

    def dynkv_worker(self) -> Any:
        """The dynkv worker of this engine when it runs in this process (one GPU, the uni executor), else None."""
        pool = getattr(self.connector, "pool_name", None)  # dynkv's connector; vLLM's own have none
        if pool is None:
            return None
        from dynkv.worker import in_process

        return in_process(pool)

    def sync_launch_s(self) -> dict[str, float]:
        """The in-process dynkv worker's time launching sync loads, by site ({} elsewhere)."""
        worker = self.dynkv_worker()
        return dict(worker.sync_launch_s) if worker is not None else {}

    def host_sample(self) -> HostSample | None:
        """A snapshot of the disk tier's device, the CPUs and this process's threads (dynkv with a disk tier)."""
        return HostSample(self._disk_device) if self._has_disk else None

    # -- measurements ------------------------------------------------------------

    def ttft(self, prompt: list[int]) -> dict[str, Any]:
        """One request, ``max_tokens=1``, on an idle engine: wall time and vLLM's split of it."""
        from torch.profiler import record_function
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
        if self.watch is not None:
            self.watch.take()  # what came before is not this request's
        before = self.samples()
        launched0 = self.sync_launch_s()
        host0 = self.host_sample()
        steps0 = self.steps
        m0, t0 = time.monotonic(), time.perf_counter()
        with record_function("dynkv.bench.generate"):  # marks the measured call in a --trace trace
            out = self.llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
        wall = time.perf_counter() - t0
        host = host0.since() if host0 is not None else None
        batches = disk_batches(self.connector, t0) if self.connector is not None else []
        rec: dict[str, Any] = {"ttft_s": wall, "token": out.outputs[0].token_ids[0], "at_s": m0,
                               "cached_tokens": out.num_cached_tokens, "steps": self.steps - steps0}
        st = out.metrics
        if st is not None and getattr(st, "first_token_ts", 0):
            # Engine-core timestamps are time.monotonic() of this process (the core runs in it).
            rec.update(queue_s=st.queued_ts - m0, wait_s=st.scheduled_ts - st.queued_ts,
                       forward_s=st.first_token_ts - st.scheduled_ts, tail_s=wall - (st.first_token_ts - m0))
            worker = self.dynkv_worker()
            at = worker.sync_launch_at if worker is not None else None
            if at is not None and at >= m0:  # when this request's sync loads began to launch
                rec["launch_after_scheduled_s"] = at - st.scheduled_ts
        self.drain()
        launched = self.sync_launch_s()
        if launched:  # the CPU time of this request's sync-load launches, by where they were launched
            rec["launch_ms"] = {k: round((v - launched0.get(k, 0.0)) * 1e3, 3) for k, v in launched.items()
                                if v > launched0.get(k, 0.0)}
        if before:
            after = self.samples()
            delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            rec["hits"] = {t: delta.get(f"dynkv_hits_total{{tier={t}}}", 0.0) for t in ("device", "host", "disk")}
            rec["h2d_s"] = delta.get("dynkv_transfer_seconds_sum{direction=h2d}", 0.0)
            rec["h2d_bytes"] = delta.get("dynkv_bytes_moved_total{direction=h2d}", 0.0)
            rec["disk_read_bytes"] = delta.get("dynkv_bytes_moved_total{direction=disk_to_host}", 0.0)
            rec["disk_read_s"] = delta.get("dynkv_transfer_seconds_sum{direction=disk_to_host}", 0.0)
        if batches:
            rec["disk_batches"] = batches  # [submitted, started, read, done] ms, pages, runs, cost
            rec["host"] = host  # the device, CPUs and threads during the request
        return rec

    def kv_digests(self, prompt: list[int]) -> dict[str, Any]:
        """Digests of the KV of the request :meth:`ttft` just ran, and of the dynkv pages it stored or loaded."""
        assert self.watch is not None
        return digests(self.llm, self.watch.take(), len(prompt) // self.block_size)

    def traced(self, fn: Any, path: Path) -> dict[str, Any]:
        """``fn()`` traced where its GPU work is launched: this process, or every worker process."""
        if self.in_process:
            return traced(fn, path)
        self.llm.collective_rpc(start_trace)
        try:
            rec = fn()
        finally:
            ranks = sorted(self.llm.collective_rpc(stop_trace, args=(str(path),)), key=lambda r: r["rank"])
        rec["trace"] = {**ranks[0], "other_ranks": ranks[1:]}
        return rec

    def profiled_ttft(self, prompt: list[int]) -> dict[str, Any]:
        """:meth:`ttft` under ``cProfile``: where the engine's (and the connector's) Python time goes."""
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        rec = prof.runcall(self.ttft, prompt)
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(r"dynkv[/\\]", 40)  # dynkv's own calls, wherever they rank
        rec["profile"] = text.getvalue()
        return rec

    def check(self, prompt: list[int]) -> dict[str, Any]:
        """Greedy tokens with their top-2 logprobs, for comparing paths."""
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=self.spec["check_tokens"], temperature=0.0, ignore_eos=True, logprobs=2,
                            detokenize=False)
        out = self.llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
        self.drain()
        c = out.outputs[0]
        logprobs, gaps = [], []
        for tok, lp in zip(c.token_ids, c.logprobs or []):
            logprobs.append(lp[tok].logprob)
            top = sorted((v.logprob for v in lp.values()), reverse=True)
            if len(top) >= 2:
                gaps.append(top[0] - top[1])
        return {"tokens": list(c.token_ids), "logprobs": logprobs, "top2_gaps": gaps,
                "cached_tokens": out.num_cached_tokens}

    def turn(self, i: int) -> list[int]:
        """New tokens of the ``i``-th next turn (the same in every engine of the run)."""
        import numpy as np

        lo, hi = self.spec["vocab"]
        rng = np.random.default_rng(self.spec["seed"] + 104729 * (i + 1))
        return rng.integers(lo, hi, size=self.spec["turn_tokens"]).tolist()

    def flush_host_tier(self) -> None:
        """Fill dynkv's host tier with pages of fresh prompts, so older pages leave it (LRU)."""
        import numpy as np
        from vllm import SamplingParams

        chunk, total, lo, hi = (self.spec["flush"][k] for k in ("chunk", "tokens", "token_lo", "token_hi"))
        rng = np.random.default_rng(self.spec["seed"] + 7919 * (self._fillers + 1))
        self._fillers += 1
        prompts = [{"prompt_token_ids": rng.integers(lo, hi, size=chunk).tolist()} for _ in range(-(-total // chunk))]
        sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
        self.llm.generate(prompts, sp, use_tqdm=False)
        self.drain()

    def decode(self, prompts: list[list[int]], tokens: int) -> dict[str, Any]:
        """Output tokens/s once every request has its first token, to the end (stepping the engine ourselves)."""
        from vllm import SamplingParams

        engine = self.llm.llm_engine
        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        tag = f"decode-{time.monotonic_ns()}"
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, sp)
        before = self.samples()
        counts: dict[str, int] = {}
        t0 = time.perf_counter()
        t_decode: float | None = None
        n_decode = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                counts[out.request_id] = len(out.outputs[0].token_ids)
            if t_decode is None and len(counts) == len(prompts) and min(counts.values()) >= 1:
                t_decode, n_decode = time.perf_counter(), sum(counts.values())
        t1 = time.perf_counter()
        rec: dict[str, Any] = {"requests": len(prompts), "prompt_tokens": len(prompts[0]), "max_tokens": tokens,
                               "total_s": t1 - t0, "output_tokens": sum(counts.values())}
        if t_decode is not None and t1 > t_decode:
            rec["decode_s"] = t1 - t_decode
            rec["decode_tok_s"] = (sum(counts.values()) - n_decode) / (t1 - t_decode)
        if before:
            after = self.samples()
            rec["d2h_bytes"] = after.get("dynkv_bytes_moved_total{direction=d2h}", 0.0) - before.get(
                "dynkv_bytes_moved_total{direction=d2h}", 0.0)
        self.drain()
        return rec

    def _disk_records(self, prompt: list[int]) -> tuple[list[bytes], list[tuple[int, bytes]]]:
        """The prompt's page keys, and ``(disk slot, key)`` of those the disk tier holds."""
        import numpy as np

        from dynkv.keys import block_keys

        full = (len(prompt) - 1) // self.block_size
        keys = block_keys(self.connector.fingerprint, np.asarray(prompt[: full * self.block_size], dtype=np.int64),
                          self.block_size)
        located = ((self.connector.leader.index.location(k, "disk"), k) for k in keys)
        return keys, [(s, k) for s, k in located if s is not None]

    def disk_probe(self, prompt: list[int], repeat: int, before: Any = None) -> dict[str, Any]:
        """The disk tier's batched reads of ``prompt``'s records with no request running, in GB/s.

        Into scratch memory (anonymous, and pinned like the host tier), into
        the host-tier pages that hold those very pages now (the destination of
        a disk hit; the bytes read are the bytes there), and while the idle
        engine steps, and into pinned memory right after ``before`` (the
        filler pass of each disk-tier hit; it runs last, as it empties the
        host tier): which of these the in-engine read phase is missing.
        Each case carries what the device, the CPUs and the threads did
        (:class:`HostSample`) in its median run.
        """
        import mmap

        from dynkv.memory import HostPool

        leader = self.connector.leader
        disk = leader.disk
        _, held = self._disk_records(prompt)
        if not held:
            return {"error": "none of the prompt's pages is on the disk tier"}
        n, page = len(held), disk.page_bytes
        pinned = HostPool.create(n * page, name=None)
        scratch = {"anonymous": memoryview(mmap.mmap(-1, n * page)), "pinned": memoryview(pinned.as_tensor().numpy())}
        dests = {name: [buf[i * page : (i + 1) * page] for i in range(n)] for name, buf in scratch.items()}
        host_slots = [leader.index.location(k, "host") for _, k in held]
        if all(s is not None for s in host_slots):  # the hits just before left every page in the host tier
            dests["host tier"] = [leader._host_page(s) for s in host_slots]
        out: dict[str, Any] = {"pages": n, "pinned": pinned.pinned, "host": {}}
        try:
            for dest, beside in (("anonymous", ""), ("pinned", ""), ("host tier", ""), ("pinned", "engine stepping"),
                                 ("pinned", "after fillers")):
                if dest not in dests or (beside == "after fillers" and before is None):
                    continue
                times, hosts = [], []
                for _ in range(repeat):
                    if beside == "after fillers":
                        before()
                    host0 = self.host_sample()
                    t0 = time.perf_counter()
                    futs = disk.read_many([(s, k, dst) for (s, k), dst in zip(held, dests[dest])])
                    while beside == "engine stepping" and not all(f.done() for f in futs):
                        self.llm.llm_engine.step()  # the idle engine's loop, as while a disk hit waits
                    for f in futs:
                        f.result()
                    times.append(time.perf_counter() - t0)
                    hosts.append(host0.since() if host0 is not None else None)
                label = dest + (f", {beside}" if beside else "")
                out[label] = round(n * page / statistics.median(times) / 1e9, 3)
                out["host"][label] = hosts[_median_index(times)]
        finally:
            pinned.close()
        return out

    def disk_records_dd(self, prompt: list[int], repeat: int, before: Any = None) -> dict[str, Any]:
        """``dd iflag=direct`` over the disk-tier records that hold ``prompt``'s pages.

        ``before``: called before each run (outside its time), e.g. the filler
        pass that precedes each disk-tier hit, so dd reads in the same state.
        """
        leader = self.connector.leader
        keys, located = self._disk_records(prompt)
        held = [s for s, _ in located]
        if not held:
            return {"error": "none of the prompt's pages is on the disk tier"}
        by_file: dict[str, list[int]] = {}
        for s in held:
            path, off = leader.disk.location(s)
            by_file.setdefault(path, []).append(off)
        record = leader.disk.record_bytes
        runs = [(path, min(offs), max(offs) + record) for path, offs in by_file.items()]
        span = sum(end - start for _, start, end in runs)
        times, hosts = [], []
        for _ in range(repeat):
            if before is not None:
                before()
            host0 = self.host_sample()
            t0 = time.perf_counter()
            for path, start, end in runs:
                subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=64M", f"skip={start}", f"count={end - start}",
                                "iflag=direct,skip_bytes,count_bytes", "status=none"], check=True)
            times.append(time.perf_counter() - t0)
            hosts.append(host0.since() if host0 is not None else None)
        return {"pages": len(held), "pages_wanted": len(keys), "bytes": span, "payload_bytes": len(held) * record,
                "seconds": times, "median_s": statistics.median(times), "gbps": span / statistics.median(times) / 1e9,
                "host": hosts[_median_index(times)]}


def kernels(vllm_config: Any) -> dict[str, Any]:
    """How this engine's model kernels were chosen: eager PyTorch, or ``torch.compile`` with or without timing.

    Eager kernels are chosen by shape alone. Compiled ones are chosen by
    timing unless Inductor runs in its deterministic mode (see
    :mod:`dynkv.benchmarks.e2e.run`), so two engines' compiled kernels
    compute alike only in that mode.
    """
    import os

    cc = vllm_config.compilation_config
    mode = getattr(cc, "mode", None)
    if mode is None:  # vLLM before the mode/level rename
        mode = getattr(cc, "level", 0)
    compiled = not vllm_config.model_config.enforce_eager and int(mode or 0) != 0
    deterministic = bool((cc.inductor_compile_config or {}).get("deterministic")) or os.environ.get(
        "TORCHINDUCTOR_DETERMINISTIC") == "1"
    return {"compiled": compiled, "deterministic": compiled and deterministic}


def _median_index(times: list[float]) -> int:
    """Index of the run closest to the median."""
    med = statistics.median(times)
    return min(range(len(times)), key=lambda i: abs(times[i] - med))


def _guard(eng: _Engine, what: str, fn: Any, *args: Any) -> Any:
    """Run one measurement; a failure is recorded and the run goes on to the next."""
    try:
        return fn(*args)
    except Exception as e:  # one path failing must not lose the others' numbers
        eng.report["errors"].append(f"{what}: {type(e).__name__}: {e}")
        print(f"[{eng.spec['name']}] {what} failed: {e}", file=sys.stderr, flush=True)
        return None


def _in_variant(eng: _Engine, name: str, knobs: dict[str, Any], fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with the variant's knobs set on the engine, then put back; None if they could not be set."""
    restore = _guard(eng, f"variant {name}", apply_variant, eng.connector, knobs)
    if restore is None:
        return None
    try:
        return fn(*args)
    finally:
        restore()


def _paths(eng: _Engine, prompt: list[int], rec: dict[str, Any], repeat: int, length: int) -> None:
    kind = eng.spec.get("connector")
    first = length == eng.spec["lengths"][0]

    def one(name: str, before: Any, p: list[int]) -> None:
        runs = rec.setdefault(name, [])
        before()
        r = _guard(eng, f"{name} ttft", eng.ttft, p)
        if r is not None:
            runs.append(r)
            if eng.watch is not None and name in _KV_CHECKED and name not in rec.setdefault("kv", {}):
                rec["kv"][name] = _guard(eng, f"{name} KV digests", eng.kv_digests, p)
        eng.save()

    def series(name: str, before: Any, probe: bool = True, prompt_of: Any = lambda i: prompt) -> None:
        rec[name] = []
        for i in range(repeat):
            one(name, before, prompt_of(i))
        if eng.spec.get("trace_dir") and first and probe:
            before()
            trace = Path(eng.spec["trace_dir"]) / f"trace-{eng.spec['name']}-{name}-{length}.json.gz"
            rec[f"{name}_traced"] = _guard(eng, f"{name} traced ttft", eng.traced, lambda: eng.ttft(prompt), trace)
            eng.save()
        if eng.spec.get("profile") and kind == "dynkv" and probe:
            # One more run, profiled and kept apart: the profiler slows the Python it watches.
            before()
            rec[f"{name}_profiled"] = _guard(eng, f"{name} profiled ttft", eng.profiled_ttft, prompt)
            eng.save()

    def checked(name: str, before: Any) -> None:
        before()
        rec.setdefault("checks", {})[name] = _guard(eng, f"{name} check", eng.check, prompt)
        eng.save()

    def turns(name: str, before: Any) -> None:
        # The next turn of a conversation: the cached prompt and new tokens (fresh ones each time).
        if eng.spec.get("turn_tokens"):
            series(name, before, probe=False, prompt_of=lambda i: prompt + eng.turn(i))

    if kind is None:
        series("recompute", eng.reset_device_cache)
        series("device", lambda: None)
        checked("device", lambda: None)
        checked("recompute", eng.reset_device_cache)
        turns("turn_device", lambda: None)
        return
    one("miss", eng.reset_device_cache, prompt)
    if kind == "offload":
        series("offload", eng.reset_device_cache)
        checked("offload", eng.reset_device_cache)
        turns("turn_offload", eng.reset_device_cache)
        return
    series("host", eng.reset_device_cache)
    checked("host", eng.reset_device_cache)
    turns("turn_host", eng.reset_device_cache)

    def off_host() -> None:
        eng.flush_host_tier()
        eng.reset_device_cache()

    series("disk", off_host)
    checked("disk", off_host)
    # The same hits with dynkv's copy knobs changed in place (dynkv.benchmarks.e2e.probe), the variants taking turns
    # hit by hit, so that a drift of the host over the run touches them alike. Decode variants run after
    # the decode runs.
    def variant_hits(name: str, knobs: dict[str, Any]) -> None:
        for path in variant_paths(knobs):
            one(f"{path}@{name}", eng.reset_device_cache if path == "host" else off_host, prompt)

    hits = [(n, k) for n, k in (eng.spec.get("variants") or {}).items() if "decode" not in variant_paths(k)]
    for _ in range(repeat) if first else ():
        for name, knobs in hits:
            _in_variant(eng, name, knobs, variant_hits, name, knobs)

    # After the hits (the probe reads into the host-tier pages they left), and last: the probe's and dd's
    # filler passes leave the prompt out of the host tier.
    if eng.spec.get("disk_probe") and first:
        rec["disk_probe"] = _guard(eng, "disk probe", eng.disk_probe, prompt, eng.spec["repeat"], off_host)
        eng.save()
    if eng.spec.get("dd_repeat"):
        # dd right after the filler pass each disk-tier hit follows (the hit's state), then back to back.
        rec["dd_after_fillers"] = _guard(eng, "dd after fillers", eng.disk_records_dd, prompt, eng.spec["dd_repeat"],
                                         off_host)
        rec["dd"] = _guard(eng, "dd", eng.disk_records_dd, prompt, eng.spec["dd_repeat"])
        eng.save()


def _choose(eng: _Engine, cands: list[list[int]], rec: dict[str, Any], length: str) -> int:
    """Index of the candidate whose smallest top-2 logprob gap under recompute is largest (recorded in ``rec``)."""
    gaps: list[float | None] = []
    for i, p in enumerate(cands):
        eng.reset_device_cache()
        r = _guard(eng, f"candidate {i} check", eng.check, p)
        gaps.append(min(r["top2_gaps"], default=None) if r else None)
    best = max(range(len(cands)), key=lambda i: -1.0 if gaps[i] is None else gaps[i])
    rec["prompt_choice"] = {"min_top2_gaps": gaps, "chosen": best}
    eng.report.setdefault("chosen", {})[length] = best
    print(f"[{eng.spec['name']}] {length} tokens: smallest top-2 gaps of {len(cands)} candidate prompts "
          f"{[None if g is None else round(g, 3) for g in gaps]}; measuring candidate {best}", flush=True)
    eng.reset_device_cache()
    return best


def _decode_runs(eng: _Engine, prompt_sets: list[list[list[int]]], tokens: int) -> None:
    """The decode runs, each followed by one per decode variant (``paths=decode``), in turn.

    A variant's runs take fresh prompts of the same lengths: the engine's own
    prefix cache (and dynkv's tiers) would otherwise hold them, and their
    prefill and stores would not be the same work.
    """
    import numpy as np

    variants = {n: k for n, k in (eng.spec.get("variants") or {}).items() if "decode" in variant_paths(k)}
    lo, hi = eng.spec["vocab"]
    eng.report["decode"] = []
    for i, prompts in enumerate(prompt_sets):
        rec = _guard(eng, "decode", eng.decode, prompts, tokens)
        if rec is not None:
            eng.report["decode"].append(rec)
        for j, (name, knobs) in enumerate(variants.items()):
            rng = np.random.default_rng(eng.spec["seed"] + 7_368_787 * (1 + i * len(variants) + j))
            fresh = [rng.integers(lo, hi, size=len(p)).tolist() for p in prompts]
            rec = _in_variant(eng, name, knobs, _guard, eng, f"decode, variant {name}", eng.decode, fresh, tokens)
            if rec is not None:
                eng.report.setdefault(f"decode@{name}", []).append(rec)
        eng.save()


def run(spec: dict[str, Any], out_path: Path) -> dict[str, Any]:
    """Measure one engine as ``spec`` says (see :mod:`dynkv.benchmarks.e2e.run`); the report is also written to ``out_path``."""
    eng = _Engine(spec, out_path)
    prompts = spec["prompts"]
    print(f"[{spec['name']}] engine up in {eng.report['startup_s']:.1f} s", flush=True)
    # Warm-up on a prompt of its own: Triton kernels compile for the first
    # prefill, the first cached-prefix step and the first connector load.
    warm = prompts["warmup"]
    _guard(eng, "warm-up", eng.ttft, warm)
    if spec.get("connector"):
        eng.reset_device_cache()
    _guard(eng, "warm-up revisit", eng.ttft, warm)
    for length in spec["lengths"]:
        rec: dict[str, Any] = {}
        eng.report["lengths"][str(length)] = rec
        t0 = time.perf_counter()
        prompt = prompts[str(length)]
        cands = (spec.get("candidates") or {}).get(str(length))
        if cands:
            prompt = cands[_choose(eng, cands, rec, str(length))]
        _paths(eng, prompt, rec, spec["repeat"], length)
        print(f"[{spec['name']}] {length} tokens measured in {time.perf_counter() - t0:.1f} s", flush=True)
    dec = spec.get("decode")
    if dec:
        _decode_runs(eng, prompts["decode"], dec["tokens"])
    eng.report["samples"] = eng.samples()
    eng.save()
    eng.llm.llm_engine.engine_core.shutdown()
    return eng.report


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
