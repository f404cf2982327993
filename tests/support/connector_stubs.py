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


def fake_config(extra: dict[str, Any] | None = None, *, groups: int = 1, pp: int = 1,
                block_size: int = BS) -> tuple[Any, Any]:
    spec = SimpleNamespace(head_size=4, block_size=block_size, dtype=torch.float16, sliding_window=None,
                           state_content_size_bytes=16)
    kcc = SimpleNamespace(
        kv_cache_groups=[SimpleNamespace(layer_names=list(LAYERS), kv_cache_spec=spec) for _ in range(groups)],
        kv_cache_tensors=[SimpleNamespace(layers=[n]) for n in LAYERS],
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


def blocks(ids: list[int]) -> Any:
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def step(new: dict[str, list[int]] | None = None, scheduled: dict[str, int] | None = None,
         cached: dict[str, list[int] | None] | None = None, resumed: set[str] = frozenset(),
         preempted: set[str] = frozenset()) -> Any:
    cached = cached or {}
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,)) for r, b in (new or {}).items()],
        scheduled_cached_reqs=SimpleNamespace(req_ids=list(cached), new_block_ids=[
            None if b is None else (b,) for b in cached.values()], resumed_req_ids=set(resumed)),
        num_scheduled_tokens=dict(scheduled or {}),
        preempted_req_ids=set(preempted),
    )


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
