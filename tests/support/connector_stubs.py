"""Stand-ins for vLLM's config, requests and scheduler output, to drive :class:`dynkv.connector.DynKVConnector`
without an engine (``tests/connector`` and the scheduler-side benchmarks in ``bench/``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from dynkv.connector import DynKVConnector, DynKVMetadata, DynKVWorkerMetadata
from dynkv.protocol import WorkerReport

BS = 32
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(2)]


class SlidingWindowSpec(SimpleNamespace):
    """Named as vLLM's: a sliding-window group's spec."""


def fake_config(extra: dict[str, Any] | None = None, *, groups: int = 1, pp: int = 1, block_size: int = BS,
                windows: tuple[int | None, ...] | None = None) -> tuple[Any, Any]:
    """vLLM's config and KV-cache config; ``windows``: one KV-cache group per entry (None: full attention,
    else a sliding window in tokens), each of the two layers of :data:`LAYERS` (the hybrid manager's overlay)."""
    def spec(window: int | None) -> Any:
        cls = SimpleNamespace if window is None else SlidingWindowSpec
        return cls(head_size=4, block_size=block_size, dtype=torch.float16, sliding_window=window,
                   state_content_size_bytes=16)

    if windows is None:
        group_list = [SimpleNamespace(layer_names=list(LAYERS), kv_cache_spec=spec(None)) for _ in range(groups)]
    else:
        group_list = [SimpleNamespace(layer_names=[f"{n}.g{g}" for n in LAYERS], kv_cache_spec=spec(w))
                      for g, w in enumerate(windows)]
    kcc = SimpleNamespace(
        kv_cache_groups=group_list,
        kv_cache_tensors=[SimpleNamespace(layers=[grp.layer_names[i]]) for grp in group_list
                          for i in range(len(LAYERS))],
        num_blocks=64,
    )
    model = SimpleNamespace(model="/models/unit", revision=None, quantization=None, use_mla=False,
                            get_total_num_kv_heads=lambda: 2)
    vllm_config = SimpleNamespace(
        model_config=model,
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=block_size),
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp, tensor_parallel_size=1),
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra or {"host_pages": 16},
                                           engine_id="unit-engine", kv_load_failure_policy="fail"),
        kv_events_config=None,
    )
    return vllm_config, kcc


class FakeRequest:
    def __init__(self, rid: str, tokens: list[int]) -> None:
        self.request_id = rid
        self.all_token_ids = list(tokens)
        self.num_computed_tokens = 0
        self.lora_request = None
        self.mm_features: list[Any] = []
        self.cache_salt = None
        self.prompt_embeds = None
        self.skip_reading_prefix_cache = False

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def blocks(ids: list[int], *groups: list[int]) -> Any:
    """vLLM's ``KVCacheBlocks`` of a request: ``ids`` of group 0, then the others' (0: the null block)."""
    return SimpleNamespace(get_block_ids=lambda: (list(ids), *map(list, groups)))


def step(new: dict[str, list[int]] | None = None, scheduled: dict[str, int] | None = None,
         cached: dict[str, list[int] | None] | None = None, resumed: set[str] = frozenset(),
         preempted: set[str] = frozenset()) -> Any:
    cached = cached or {}
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=_groups(b)) for r, b in (new or {}).items()],
        scheduled_cached_reqs=SimpleNamespace(req_ids=list(cached), new_block_ids=[
            None if b is None else _groups(b) for b in cached.values()], resumed_req_ids=set(resumed)),
        num_scheduled_tokens=dict(scheduled or {}),
        preempted_req_ids=set(preempted),
    )


def _groups(ids: Any) -> tuple[list[int], ...]:
    """Block ids as vLLM hands them, per KV-cache group: a tuple of lists is one per group, a list group 0's."""
    return tuple(ids) if isinstance(ids, tuple) else (ids,)


def complete(conn: DynKVConnector, meta: DynKVMetadata) -> None:
    """Every rank did every job of the plan."""
    jobs = [op.job for op in meta.plan.loads + meta.plan.stores]
    report = WorkerReport(done={j: 1 for j in jobs})
    conn.update_connector_output(SimpleNamespace(kv_connector_worker_meta=DynKVWorkerMetadata(report)))


def served(conn: DynKVConnector, rid: str, toks: list[int], block_ids: list[int], *, finish: bool = True) -> FakeRequest:
    """A request computed in one step (looked up, every full block stored) and, with ``finish``, finished."""
    req = FakeRequest(rid, toks)
    conn.on_new_request(req)
    conn.get_num_new_matched_tokens(req, 0)
    complete(conn, conn.build_connector_meta(step(new={rid: block_ids}, scheduled={rid: req.num_tokens})))
    if finish:
        conn.request_finished(req, block_ids)
    return req


def tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(16, 1000, size=n).tolist()
