"""Runs one vLLM engine (CPU build) through phases of prompts and prints what it saw, as JSON.

``python tests/support/vllm_driver.py spec.json out.json``. The engine core runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the scheduler's
connector, and its leader, can be read between phases; TP workers are
processes of their own. Spec keys:

model
    Model directory.
engine
    Extra ``vllm.LLM`` keyword arguments.
dynkv
    ``kv_connector_extra_config`` for dynkv, or null to run without a connector.
by_name
    Load the connector by its registered name (``dynkv.plugin.register()``)
    instead of ``kv_connector_module_path``.
corrupt_loads
    Make every load copy a different host page than planned (the model must notice).
same_group_keys
    Give every KV-cache group of a hybrid model the same page keys, so one group's pages load into the
    others' blocks (the model must notice).
record_events
    Count the blocks of the KV events the connector hands vLLM (``events`` in the output).
phases
    List of ``{"name", "prompts": [[token ids]], "max_tokens", "reset_device_cache",
    "reset_dynkv", "corrupt_disk", "before"}``: ``reset_device_cache`` empties vLLM's
    prefix cache first; ``reset_dynkv`` empties dynkv's host and disk tiers too
    (the shared tier is other engines' and stays); ``corrupt_disk`` flips payload
    bytes of every disk-tier record first; ``before`` is a list of commands (argv
    lists) run first, each expected to succeed (to corrupt or stop a store).

Each phase reports greedy ``tokens``, the chosen tokens' ``logprobs``, and
with dynkv the leader's ``stats()`` and metric ``samples``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _corrupt_disk(paths: list[str]) -> int:
    from dynkv.tiers.diskfile import HEADER_BYTES

    n = 0
    for d in paths:
        for f in Path(d).glob("*.pages"):
            size = f.stat().st_size
            fd = os.open(f, os.O_RDWR | os.O_SYNC)
            try:
                # Records follow the superblock: [header][payload]; hit every 4 KiB of
                # the file past the first header so each record's payload is hit.
                for off in range(2 * HEADER_BYTES + 512, size, 4096):
                    b = os.pread(fd, 1, off)
                    os.pwrite(fd, bytes([b[0] ^ 0x5A]), off)
                    n += 1
            finally:
                os.close(fd)
    return n


def _shift_loads() -> None:
    """Patch the worker so each load copies the wrong host page (neighbouring slot)."""
    from dataclasses import replace

    from dynkv.worker import Worker

    def shifted(op: Any) -> Any:
        return replace(op, slots=tuple(s + 1 for s in op.slots))

    launch_load, launch_sync = Worker._launch_load, Worker._launch_sync

    def launch_load_shifted(self: Worker, op: Any) -> None:
        launch_load(self, shifted(op))

    def launch_sync_shifted(self: Worker, ops: Any, **kw: Any) -> None:
        launch_sync(self, [shifted(op) for op in ops], **kw)

    # Both launch paths: async loads, and sync loads whether start_early or start launches them.
    Worker._launch_load = launch_load_shifted  # type: ignore[method-assign]
    Worker._launch_sync = launch_sync_shifted  # type: ignore[method-assign]


def _same_group_keys() -> None:
    """Patch the connector so every KV-cache group's pages share one key per block."""
    import dynkv.connector.groups as groups

    groups.group_keys = lambda keys, tag: list(keys)  # type: ignore[assignment]


def _record_events(counts: dict[str, int]) -> None:
    """Patch the connector to count the blocks of the KV events it hands vLLM, as ``<Type>:<medium>``.

    One event can carry a run of chained blocks (its ``block_hashes``): the count is of blocks.
    """
    from dynkv.connector import DynKVConnector

    take = DynKVConnector.take_events

    def take_counted(self: DynKVConnector) -> list[Any]:
        events = list(take(self))
        for ev in events:
            key = f"{type(ev).__name__}:{ev.medium}"
            counts[key] = counts.get(key, 0) + max(1, len(getattr(ev, "block_hashes", None) or ()))
        return events

    DynKVConnector.take_events = take_counted  # type: ignore[method-assign]


def _connector(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler.connector


def _drain(llm: Any, timeout: float = 60.0) -> None:
    """Step the engine until dynkv has nothing in flight (stores reported, disk writes done)."""
    conn = _connector(llm)
    deadline = time.monotonic() + timeout
    while conn.has_pending_push_work() and time.monotonic() < deadline:
        llm.llm_engine.step()
        time.sleep(0.005)


def _samples(conn: Any) -> dict[str, float]:
    from dynkv.connector.engine import metric_samples

    counters, gauges = metric_samples(conn.leader.metrics.registry)
    return {**counters, **gauges}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("corrupt_loads"):
        _shift_loads()
    if spec.get("same_group_keys"):
        _same_group_keys()
    events: dict[str, int] = {}
    if spec.get("record_events"):
        _record_events(events)
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(dtype="float32", block_size=32, enforce_eager=True, enable_prefix_caching=True,
                                  max_model_len=512, max_num_seqs=4, max_num_batched_tokens=512, seed=0,
                                  gpu_memory_utilization=0.2)
    kwargs.update(spec.get("engine", {}))
    if spec.get("dynkv") is not None:
        xfer: dict[str, Any] = {"kv_connector": "DynKVConnector", "kv_role": "kv_both",
                                "kv_connector_extra_config": spec["dynkv"]}
        if spec.get("by_name"):
            from dynkv.plugin import register

            register()
        else:
            xfer["kv_connector_module_path"] = "dynkv.connector"
        kwargs["kv_transfer_config"] = xfer
    llm = LLM(model=spec["model"], **kwargs)
    conn = _connector(llm) if spec.get("dynkv") is not None else None
    out: dict[str, Any] = {"phases": []}
    for phase in spec["phases"]:
        for cmd in phase.get("before", []):
            subprocess.run(cmd, check=True, timeout=120)
        if phase.get("reset_device_cache") or phase.get("reset_dynkv"):
            assert llm.reset_prefix_cache(reset_connector=bool(phase.get("reset_dynkv"))), \
                "vLLM refused to reset its prefix cache"
        if phase.get("corrupt_disk"):
            out.setdefault("corrupted_bytes", 0)
            out["corrupted_bytes"] += _corrupt_disk(spec["dynkv"]["disk_paths"])
        sp = SamplingParams(max_tokens=phase.get("max_tokens", 8), temperature=0.0, logprobs=1,
                            ignore_eos=True)
        t0 = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": p} for p in phase["prompts"]], sp, use_tqdm=False)
        seconds = time.perf_counter() - t0
        rec: dict[str, Any] = {"name": phase.get("name", ""), "seconds": seconds, "tokens": [], "logprobs": []}
        for r in results:
            c = r.outputs[0]
            rec["tokens"].append(list(c.token_ids))
            rec["logprobs"].append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
        if conn is not None:
            _drain(llm)
            rec["stats"] = conn.leader.stats()
            rec["samples"] = _samples(conn)
        if kwargs.get("disable_log_stats") is False:
            rec["vllm_metrics"] = [[m.name, m.labels, m.value] for m in llm.get_metrics()
                                   if ("dynkv" in m.name or "cached_by_source" in m.name) and hasattr(m, "value")]
        out["phases"].append(rec)
    if conn is not None:
        out["pool_name"] = conn.leader.pool_name
    out["events"] = events
    if conn is not None and spec.get("record_sync_starts"):
        from dynkv.worker import in_process

        out["sync_starts"] = dict(in_process(conn.pool_name).sync_launches)  # the engine's worker, this process
    llm.llm_engine.engine_core.shutdown()
    return out


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run(spec), default=str))
