"""vLLM KV connector: a thin adapter from vLLM's connector API to dynkv.

The scheduler-side connector drives a :class:`dynkv.leader.Leader` (prefix
lookups, which full blocks to offload, each step's plan); the worker-side
connector drives a :class:`dynkv.worker.Worker` (the copies). Plans travel in
vLLM's per-step connector metadata and reports come back in its worker
metadata: no extra socket. Policy (what to keep, where, for how long) lives in
the leader; this module only translates.

Enable it with ``--kv-transfer-config '{"kv_connector":"DynKVConnector",
"kv_role":"kv_both","kv_connector_extra_config":{...}}'`` once dynkv is
installed (:mod:`dynkv.plugin` registers the name), or add
``"kv_connector_module_path":"dynkv.connector"``. The extra config takes the
keys of :class:`dynkv.config.DynKVConfig`.

Disaggregated prefill/decode (:mod:`dynkv.disagg`) follows ``kv_role``: a
``kv_producer`` engine exports the pages of each request that asks for a
remote decode (``kv_transfer_params`` ``do_remote_decode``) and returns
``kv_transfer_params`` naming them, signed under the deployment's
``transfer_secret``; a ``kv_consumer`` engine (or ``kv_both`` with
``accept_remote_prefill``) given those params checks them
(:class:`dynkv.disagg.trust.RemoteGate`), pulls the pages it does not hold
with NIXL, and recomputes whatever could not be pulled or was refused.

One code base for vLLM 0.26 to 0.33: hooks that only some versions have are
implemented and simply not called by the others (0.33's sleep-mode methods
among them: :mod:`dynkv.worker.sleep`). Where the worker -> scheduler
metadata channel is missing, worker reports ride in the connector stats
(:class:`DynKVStats`), which vLLM also carries from workers to the scheduler.

Models with sliding-window layers or several KV-cache groups (vLLM's hybrid
manager) keep one page per group and block under the group's own keys
(:mod:`.groups`); their hits load asynchronously, and a failed load fails its
request (recomputed), the only failure vLLM takes from such models.

The class is kept whole (about 670 lines): it is vLLM's connector interface,
one method per hook, each a few lines of translation; splitting it would scatter
one interface over several files. Geometry, KV-cache groups, stats, events and
snapshots already live in :mod:`.engine`, :mod:`.groups`, :mod:`.stats`,
:mod:`.events` and :mod:`.snapshot`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from dynkv.config import DynKVConfig
from dynkv.connector.events import KVEvents
from dynkv.connector.snapshot import SnapshotDesk
from dynkv.connector.stats import DynKVPromMetrics, DynKVStats
from dynkv.disagg.params import RemotePrefill, asks_remote_decode
from dynkv.disagg.trust import RemoteGate
from dynkv.connector.engine import (
    check_vllm_version,
    data_parallel_rank,
    distinct_layers,
    metric_samples,
    model_geometry,
    paged_view,
)
from dynkv.connector.groups import group_block_ids, group_stores, interleaved_keys, kv_groups
from dynkv.keys import block_keys
from dynkv.protocol import StepPlan, WorkerReport
from dynkv.tiers.host import pool_name_for
from dynkv.worker import in_process

try:  # vLLM >= the worker -> scheduler metadata channel
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:
    KVConnectorWorkerMetadata = None  # type: ignore[assignment,misc]
try:  # vLLM >= request-level load failures (the only kind it takes from models of several KV-cache groups)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:
    KVConnectorTransferResults = None  # type: ignore[assignment,misc]
try:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:
    CacheHitSource = None  # type: ignore[assignment,misc]
try:
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys
except ImportError:
    generate_block_hash_extra_keys = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["DynKVConnector", "DynKVMetadata", "DynKVPromMetrics", "DynKVStats", "DynKVWorkerMetadata"]

log = logging.getLogger("dynkv.connector")


def _share_vllm_logging() -> None:
    """Send ``dynkv.*`` records where vLLM sends its own, at vLLM's level.

    vLLM configures its ``vllm`` logger only, so dynkv's INFO lines (the
    tiers set up, pages recovered, the copy path chosen) went nowhere. Where
    the application configured the ``dynkv`` or root logger itself, nothing
    changes.
    """
    ours, theirs = logging.getLogger("dynkv"), logging.getLogger("vllm")
    if ours.handlers or logging.getLogger().handlers or not theirs.handlers:
        return
    for h in theirs.handlers:
        ours.addHandler(h)
    ours.setLevel(theirs.getEffectiveLevel())
    ours.propagate = False

_UNSET: Any = object()
_VERSION_CHECKED = False


@dataclass
class DynKVMetadata(KVConnectorMetadata):
    """Scheduler -> workers, each step: the leader's plan and the requests vLLM preempted."""

    plan: StepPlan
    preempted: tuple[str, ...] = ()
    early: bool = False  # workers launch the plan's sync loads in handle_preemptions, before input preparation
    # A uniform decode batch, which vLLM may replay as one full CUDA graph (no per-layer hooks): sync loads are
    # waited for whole. Some model runners start loads outside the forward context, where the mode is not shown.
    whole: bool = False
    # Sliding-window models: vLLM frees blocks that leave the window and hands them to other requests at once,
    # so workers finish the stores in flight before this step's inputs are prepared (or its blocks written).
    settle: bool = False


@dataclass
class DynKVWorkerMetadata(KVConnectorWorkerMetadata or object):  # type: ignore[misc]
    """Workers -> scheduler, each step: one rank's report; vLLM merges the ranks' with :meth:`aggregate`."""

    report: WorkerReport = field(default_factory=WorkerReport)

    def aggregate(self, other: Any) -> DynKVWorkerMetadata:
        if not isinstance(other, DynKVWorkerMetadata):
            raise TypeError(f"cannot merge {type(other).__name__} into dynkv worker metadata")
        return DynKVWorkerMetadata(self.report.merge(other.report))


class DynKVConnector(KVConnectorBase_V1, SupportsHMA):
    """dynkv as a vLLM KV connector (``kv_role`` ``kv_both``, ``kv_producer`` or ``kv_consumer``).

    Hits in the host tier load in the step that computes the request, layer
    by layer under its forward (``layerwise``, the default); hits on disk or
    on a prefill engine load asynchronously (the scheduler never waits on
    I/O), as every hit does with ``layerwise`` off. Full blocks are
    stored after the step that fills them; a finished request's blocks are
    freed once its stores are done; blocks whose load failed are reported to
    vLLM, which recomputes them. A producer exports finished requests' pages
    to decode engines; a consumer (or ``kv_both``) pulls them.
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        if kv_cache_config is None:
            super().__init__(vllm_config, role)  # vLLM whose connectors take no kv_cache_config
        else:
            super().__init__(vllm_config, role, kv_cache_config)
        _share_vllm_logging()  # vLLM has configured its logging by the time it builds a connector
        xfer = vllm_config.kv_transfer_config
        self.config = self.check_extra_config(xfer.kv_connector_extra_config)
        dp = data_parallel_rank(vllm_config)
        if dp is not None:  # each DP rank is an engine of its own: its own disk directory and ports
            self.config = self.config.for_rank(*dp)
        if getattr(xfer, "kv_load_failure_policy", "recompute") != "recompute":
            # dynkv is a cache: a page that fails its checks is recomputed, not
            # a failed request. vLLM's scheduler reads the policy after creating
            # its connector.
            log.info("dynkv: kv_load_failure_policy %r -> 'recompute'", xfer.kv_load_failure_policy)
            xfer.kv_load_failure_policy = "recompute"
        self.geometry, self.fingerprint = model_geometry(vllm_config, kv_cache_config,
                                                         model_version=self.config.model_version)
        self.groups = kv_groups(vllm_config, kv_cache_config)
        # vLLM takes block-level load errors from models of one KV-cache group only: with several, every load
        # is asynchronous and a failed one fails its request (recomputed whole).
        self._several = self.groups.count > 1
        self.layerwise = self.config.layerwise and not self._several
        self.block_size = self.geometry.block_size
        self.world_size = vllm_config.parallel_config.tensor_parallel_size
        self.pool_name = pool_name_for(str(xfer.engine_id), self.fingerprint)
        kv_role = getattr(xfer, "kv_role", None) or "kv_both"
        if not self.groups.plain and kv_role != "kv_both":
            raise ValueError(
                f"dynkv: kv_role {kv_role!r} (disaggregated prefill/decode) is not supported for models with "
                f"sliding-window or several KV-cache groups ({self.groups.count}); use kv_role 'kv_both'"
            )
        if self._several and self.config.layerwise:
            log.info("dynkv: %d KV-cache groups: host hits load asynchronously (not layer by layer)",
                     self.groups.count)
        self._exports = kv_role == "kv_producer"
        self.leader: Any = None
        self.worker: Any = None
        self._reqs: dict[str, _Req] = {}
        # The tensors last registered, for restore_kv_caches without arguments: vLLM's attention layers hold the
        # same ones, so this keeps no memory alive that vLLM does not (sleep mode unmaps it under them).
        self._kv_caches: dict[str, torch.Tensor] | None = None
        self._counters: dict[str, float] = {}
        self._stats_at = float("-inf")
        self._stats_version = -1
        self.disk_wait_s = self.config.disk_wait_ms / 1e3  # see DynKVConfig.disk_wait_ms
        self.early_loads = self.config.early_loads
        self.scheduler_loads = True  # with early_loads: launched by the scheduler where the worker shares its thread
        self.load_last_block = self.config.load_last_block
        spec = getattr(vllm_config, "speculative_config", None)
        self._decode_query_len = 1 + (getattr(spec, "num_speculative_tokens", None) or 0)
        disk_dir = self.config.disk_paths[0] if self.config.disk_gb and self.config.disk_paths else None
        self._unpublished: list[Any] = []  # tier events taken early (see has_pending_push_work)
        self._desk: SnapshotDesk | None = None
        self._events = KVEvents(vllm_config, self.block_size, log_dir=disk_dir,
                                fingerprint=self.fingerprint.digest() if role == KVConnectorRole.SCHEDULER else None)
        if role == KVConnectorRole.SCHEDULER:
            from dynkv.leader import Leader

            self.leader = Leader(self.config, self.geometry, self.fingerprint, world_size=self.world_size,
                                 engine_id=str(xfer.engine_id))
            self._gate = RemoteGate(self.fingerprint, secret=self.config.transfer_secret, kv_role=kv_role,
                                    accept=self.config.accept_remote_prefill, metrics=self.leader.metrics)
            if self._events.on:  # a router that lost the events' history asks for a snapshot on the metrics port
                self._desk = SnapshotDesk(self._events)
                self.leader.metrics.routes["/kv/snapshot"] = self._desk.serve
            if self._exports:
                try:
                    self.leader.start_export()
                except BaseException:
                    self.leader.close()
                    raise
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            from dynkv.worker import Worker

            self.rank = get_tensor_model_parallel_rank()
            self.worker = Worker(self.config, rank=self.rank, world_size=self.world_size, pool_name=self.pool_name,
                                 fingerprint=self.fingerprint, engine_id=str(xfer.engine_id),
                                 prepare_pulls=kv_role == "kv_consumer")

    # -- worker side -----------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = distinct_layers(kv_caches)
        kcc = getattr(self, "_kv_cache_config", None)  # absent where connectors take no kv_cache_config
        if kcc is not None:
            num_blocks = kcc.num_blocks
        else:
            num_blocks = getattr(self._vllm_config.cache_config, "num_gpu_blocks", None) or layers[0].shape[0]
        view = paged_view(layers, num_blocks, self.geometry, self.rank, self.world_size)

        def storage(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
            return t.data_ptr(), tuple(t.stride())

        index = {storage(t): i for i, t in enumerate(layers)}
        names = {n: index[storage(t)] for n, t in kv_caches.items() if storage(t) in index}
        self.worker.register(view, names)
        self._kv_caches = kv_caches

    def supports_sleep_mode(self) -> bool:
        return True  # unregister_kv_caches and restore_kv_caches below

    def unregister_kv_caches(self) -> None:
        """vLLM's sleep mode is about to free the KV cache: copies in flight finish, then none touches it.

        Loads asked for until :meth:`restore_kv_caches` are refused (vLLM
        recomputes their blocks); the host and disk tiers keep their pages.
        """
        if self.worker is not None:
            self.worker.unregister()

    def restore_kv_caches(self, kv_caches: dict[str, torch.Tensor] | None = None) -> None:
        """After sleep mode: take the KV cache again (``kv_caches``, else the tensors registered before).

        The tensors' addresses are read again; the KV cache must have the
        geometry, head slice and block count it had before the sleep
        (``ValueError`` naming what differs otherwise).
        """
        if self.worker is None:
            return
        caches = kv_caches if kv_caches is not None else self._kv_caches
        if caches is None:
            raise RuntimeError("DynKVConnector.restore_kv_caches: no KV cache was registered before the sleep and "
                               "none was given")
        self.register_kv_caches(caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # vLLM's V1 model runner calls this first in a step, before it prepares the inputs; its V2 runner calls
        # it right before start_load_kv.
        if not isinstance(kv_connector_metadata, DynKVMetadata):
            return
        if kv_connector_metadata.settle:
            self.worker.wait(kind="store")
        if kv_connector_metadata.preempted:
            # vLLM hands a preempted request's blocks to others at once: stores still reading them finish first.
            self.worker.wait(kv_connector_metadata.preempted)
        if kv_connector_metadata.early:
            self.worker.start_early(kv_connector_metadata.plan, layer_hooks=not kv_connector_metadata.whole)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if isinstance(meta, DynKVMetadata):
            # A forward replayed as one full CUDA graph skips wait_for_layer_load: sync loads are waited for whole.
            mode = getattr(forward_context, "cudagraph_runtime_mode", None)
            self.worker.start(meta.plan, layer_hooks=getattr(mode, "name", "") != "FULL" and not meta.whole)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        # Launches this step's stores; they run while the next step computes.
        self.worker.after_forward()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving = self.worker.finished()
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        sending, recving = self.get_finished(finished_req_ids)
        # With several KV-cache groups a failed load fails its request (vLLM maps no block ids back to requests).
        failed = self.worker.failed_requests() if self._several else set()
        return KVConnectorTransferResults(finished_sending=set(sending or ()),
                                          finished_recving=set(recving or ()) | failed, failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors = self.worker.load_error_blocks()
        return set() if self._several else errors  # several groups: reported per request, above

    def build_connector_worker_meta(self) -> Any:
        if KVConnectorWorkerMetadata is None:
            return None
        report = self.worker.poll()
        return None if report.is_empty() and not report.moved else DynKVWorkerMetadata(report)

    # -- scheduler side --------------------------------------------------------

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache, not a hand-off: a store lost to preemption is a later miss

    def on_new_request(self, request: Request) -> None:
        self._track(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._track(request)
        if st.keyless or getattr(request, "skip_reading_prefix_cache", False):
            return 0, False
        bs, groups = self.block_size, self.groups.count
        base = -(-num_computed_tokens // bs)
        # Every full block, the last one included: pulls from a prefill engine (and load_last_block) load it,
        # and after an asynchronous load that covers the whole prompt vLLM rewinds one token and computes that.
        limit = max(base, request.num_tokens // bs)
        # A block is a hit when every group's page of it is held (groups' pages interleave, block by block).
        n = self.leader.lookup(request.request_id, self._page_keys(st, limit), base * groups) // groups
        remote, more = self._remote(st), 0
        if remote is not None:
            more = self.leader.match_remote(request.request_id, st.keys[:limit], base + n, remote)
            if more is None:
                return None, False  # another request is pulling some of these pages: ask again next step
            n += more
        st.lookup_tokens = num_computed_tokens
        st.sync = False
        if n and self.layerwise and (remote is None or more == 0) and self.leader.on_host(request.request_id, n):
            # Host pages load in the step that computes the request, layer by layer under its forward. That
            # step computes at least one token: a hit on the whole prompt leaves its last block out.
            n = min(n, (request.num_tokens - 1) // bs - base)
            st.sync = n > 0
            return ((base + n) * bs - num_computed_tokens if n > 0 else 0), False
        if n and not (self.load_last_block or more):
            # Stop where vLLM's own prefix cache would: the last block is computed, not loaded (the same KV,
            # the same tokens as vLLM's hit). With load_last_block, vLLM rewinds one token and computes that.
            n = min(n, (request.num_tokens - 1) // bs - base)
        if n <= 0:
            return 0, False
        return (base + n) * bs - num_computed_tokens, True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or st.lookup_tokens is None:
            return  # the call after a finished load, or a request dynkv did not look up
        computed, st.lookup_tokens = st.lookup_tokens, None
        base = -(-computed // self.block_size)
        n = max(0, (computed + num_external_tokens) // self.block_size - base) if num_external_tokens else 0
        if self.groups.plain:
            block_ids = list(blocks.get_block_ids()[0][base : base + n]) if n else []
        else:
            block_ids = group_block_ids(self.groups, blocks.get_block_ids(), base, n)
        # begin_load also unpins what is not loaded
        st.load_tiers = self.leader.begin_load(request.request_id, block_ids, sync=st.sync)
        st.sync = False
        pages = sum(st.load_tiers.values())
        if not self.groups.plain and pages:  # several pages a block: each tier's share of the blocks, for vLLM
            st.load_tiers = {t: round(c * n / pages) for t, c in st.load_tiers.items()}

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        st = self._reqs.get(request.request_id)
        if not num_external_tokens:
            return {}
        if st is None or not st.load_tiers:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        disk = min(num_external_tokens, st.load_tiers.get("disk", 0) * self.block_size)
        remote = min(num_external_tokens - disk, st.load_tiers.get("remote", 0) * self.block_size)
        shared = min(num_external_tokens - disk - remote, st.load_tiers.get("shared", 0) * self.block_size)
        p2p = getattr(CacheHitSource, "P2P", CacheHitSource.EXTERNAL_UNSPECIFIED)
        out: dict[Any, int] = {CacheHitSource.DISK: disk, p2p: remote,
                               CacheHitSource.HOST: num_external_tokens - disk - remote - shared}
        # vLLM names no source for a store shared by engines: its "remote store" fallback.
        out[CacheHitSource.EXTERNAL_UNSPECIFIED] = out.get(CacheHitSource.EXTERNAL_UNSPECIFIED, 0) + shared
        return {k: v for k, v in out.items() if v}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        if self.disk_wait_s and not any(scheduler_output.num_scheduled_tokens.values()):
            self.leader.wait_disk(self.disk_wait_s)  # nothing to compute: wait for a disk read, not spin
        self._update_block_ids(scheduler_output)
        self.leader.step_begin(sum(scheduler_output.num_scheduled_tokens.values()))
        bs, reqs, stores = self.block_size, self._reqs, []
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            st = reqs.get(req_id)
            if st is None or st.keyless:
                continue
            req = st.request
            reach = req.num_computed_tokens + n
            if reach < (st.stored + 1) * bs:
                continue  # no block fills this step (most decode steps)
            # Blocks full once this step's tokens are written; tokens not known yet do not count.
            full = min(min(reach, req.num_tokens) // bs, min(len(b) for b in st.block_ids))
            if full > st.stored:
                keys = self._keys(st, full)
                if self.groups.plain:
                    stores.append((req_id, keys[st.stored : full], st.block_ids[0][st.stored : full]))
                else:
                    stores.append((req_id, *group_stores(self.groups, self._page_keys(st, full), st.block_ids,
                                                         st.stored, full, req.num_computed_tokens, bs)))
                if self._events.on:
                    self._events.remember(st.keys, getattr(req, "block_hashes", ()), req.all_token_ids,
                                          req.lora_request, st.stored, full)
                st.stored = full
        if stores:
            self.leader.store_many(stores)
        preempted = tuple(getattr(scheduler_output, "preempted_req_ids", None) or ())
        plan = self.leader.build_plan()
        settle = self.groups.sliding
        if not plan.sync_loads():
            return DynKVMetadata(plan, preempted, settle=settle)
        early = self.early_loads and not _writes_blocks_first(scheduler_output)
        # vLLM's uniform decode batch: every request computes 1 + (speculative tokens) tokens.
        counts = scheduler_output.num_scheduled_tokens.values()
        whole = all(n == self._decode_query_len for n in counts)
        if early and self.scheduler_loads:
            # TP=1 under the uni executor: the worker shares this thread, and the copy starts now, before vLLM
            # hands the step over (its own hook then finds it launched).
            worker = in_process(self.pool_name)
            if worker is not None:
                worker.start_scheduled(plan, preempted, layer_hooks=not whole)
        return DynKVMetadata(plan, preempted, early, whole, settle)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.leader.step_end()
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, DynKVWorkerMetadata):
            self.leader.update(meta.report)
        stats = getattr(connector_output, "kv_connector_stats", None)
        if KVConnectorWorkerMetadata is None and isinstance(stats, DynKVStats):
            self.leader.update(stats.take_report())

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        params = None
        if st is not None and asks_remote_decode(getattr(request, "kv_transfer_params", None)):
            if self._exports:
                full = len(getattr(request, "prompt_token_ids", None) or ()) // self.block_size
                keys = self._keys(st, full)[:full]
                params = self.leader.export(request.request_id, keys) if keys else None
            else:
                log.warning("dynkv: request %s asks for a remote decode but this engine's kv_role is not "
                            "kv_producer; it exports nothing", request.request_id)
        return self.leader.request_finished(request.request_id), params

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    def has_pending_push_work(self) -> bool:
        # Keeps the engine stepping until copies in flight are reported and
        # delayed frees released, even with no request left to run; and until
        # tier events are published (vLLM publishes only from a step): the
        # pages found on disk at start are announced by an idle engine too.
        if self.leader is None:
            return False
        if self._events.on:
            self._unpublished += self.leader.take_events()
        return not self.leader.idle() or bool(self._unpublished)

    def take_events(self) -> Iterable[Any]:
        if self.leader is None:
            return ()
        events, self._unpublished = self._unpublished + self.leader.take_events(), []
        return self._events.convert(events)  # drained even when nobody listens

    def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
        if self._desk is not None:
            self._desk.bind_pool(gpu_block_pool)  # lists vLLM's cached device blocks in snapshots

    def reset_cache(self) -> bool | None:
        self.leader.reset()
        for st in self._reqs.values():
            st.stored = 0  # running requests offload their blocks again
        self._events.clear()
        if self.groups.sliding:
            for st in self._reqs.values():
                st.stored = len(st.keys)  # blocks that left a window are not theirs any more: not stored again
        return True

    def get_kv_connector_stats(self) -> Any:
        if self.leader is None:
            if KVConnectorWorkerMetadata is None and self.worker is not None:
                report = self.worker.poll()
                return None if report.is_empty() and not report.moved else DynKVStats.with_report(report)
            return None
        # Counters and gauges at every step where one changed (a version check when none did); the latency
        # histogram (most of the samples) at most once per stats_interval_s (see DynKVConfig): its sums and
        # counts accumulate in between.
        m, now = self.leader.metrics, time.monotonic()
        whole = now - self._stats_at >= self.config.stats_interval_s
        if not whole and m.version == self._stats_version:
            return None
        self._stats_version = m.version
        if whole:
            self._stats_at = now
        counters, gauges = metric_samples(m.registry) if whole else m.samples()
        last = self._counters
        delta = {k: v - last.get(k, 0.0) for k, v in counters.items() if v != last.get(k, 0.0)}
        last.update(counters)
        return DynKVStats(data={"counters": delta, "gauges": gauges}) if delta else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> DynKVStats:
        return DynKVStats(data=dict(data) if data is not None else {})

    @classmethod
    def check_extra_config(cls, extra_config: dict[str, Any] | None) -> DynKVConfig:
        """dynkv's settings from ``kv_connector_extra_config`` (and ``DYNKV_*``).

        Called as vLLM builds its config, before any engine starts or any
        weight loads (:mod:`dynkv.plugin`), and again by each connector. The
        first call also checks vLLM's version (:func:`.engine.check_vllm_version`).

        Raises
        ------
        ValueError
            For a bad setting, naming its key; for a vLLM older than dynkv supports.
        """
        global _VERSION_CHECKED
        if not _VERSION_CHECKED:  # once per process: a warning for a newer vLLM is not repeated per lookup
            import vllm

            warning = check_vllm_version(getattr(vllm, "__version__", "0.0"))
            if warning:
                log.warning("%s", warning)
            _VERSION_CHECKED = True
        try:
            return DynKVConfig.from_dict(extra_config or {})
        except ValueError as e:
            raise ValueError(f"DynKVConnector: bad kv_connector_extra_config: {e}") from None

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        cls.check_extra_config(extra_config)  # vLLM asks while it builds its config, with CUDA graphs on
        return False  # a forward replayed as one full CUDA graph waits for its sync loads whole

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> DynKVPromMetrics:
        return DynKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self.leader is not None:
            self.leader.close()
            self.leader = None
        self._events.close()

    # -- internals -------------------------------------------------------------

    def _track(self, request: Request) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _Req(request, block_ids=[[] for _ in range(self.groups.count)])
        return st

    def _keys(self, st: _Req, n: int) -> list[bytes]:
        """The request's page keys, extended to at least ``n`` (when its tokens are known)."""
        have = len(st.keys)
        if n <= have or st.keyless:
            return st.keys
        bs, req = self.block_size, st.request
        tokens = req.all_token_ids[have * bs : n * bs]  # a list: block_keys packs short ones without numpy
        extra: list[Any] | None = None
        try:
            if _has_extra_keys(req):
                if generate_block_hash_extra_keys is None:
                    raise TypeError("this vLLM has no generate_block_hash_extra_keys")
                extra = []
                for i in range(have, n):
                    e, st.mm_idx = generate_block_hash_extra_keys(req, i * bs, (i + 1) * bs, st.mm_idx)
                    extra.append(e)
            st.keys.extend(block_keys(self.fingerprint, tokens, bs, extra, st.keys[-1] if st.keys else None))
        except TypeError as e:
            log.warning("dynkv: request %s has extra keys dynkv cannot hash (%s); it is not cached",
                        req.request_id, e)
            st.keyless, st.keys = True, []
        return st.keys

    def _page_keys(self, st: _Req, n: int) -> list[bytes]:
        """The keys of the request's pages for its first ``n`` blocks: every group's, block by block."""
        keys = self._keys(st, n)
        if self.groups.plain or st.keyless:
            return keys
        return interleaved_keys(self.groups, keys, st.group_keys, n)

    def _remote(self, st: _Req) -> RemotePrefill | None:
        """The remote prefill the request's ``kv_transfer_params`` name, checked once (None: none usable).

        The pages' keys are this engine's, from the request's own tokens (:class:`RemoteGate`)."""
        if st.remote is _UNSET:
            params = getattr(st.request, "kv_transfer_params", None)
            # Models with several KV-cache groups take no remote prefills (refused at start for P/D roles).
            st.remote = (self._gate.admit(st.request.request_id, params, lambda n: self._keys(st, n))
                         if self.groups.plain else None)
        return st.remote

    def _update_block_ids(self, out: SchedulerOutput) -> None:
        for data in out.scheduled_new_reqs:
            st = self._reqs.get(data.req_id)
            if st is not None:
                st.block_ids = [list(ids) for ids in data.block_ids]
        cached = out.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None)
        if resumed is None:  # older vLLM: one flag per request
            flags = getattr(cached, "resumed_from_preemption", ())
            resumed = {r for r, f in zip(cached.req_ids, flags) if f}
        for req_id, new in zip(cached.req_ids, cached.new_block_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            if req_id in resumed:
                st.block_ids = [list(ids) for ids in new] if new else [[] for _ in range(self.groups.count)]
            elif new:
                for have, ids in zip(st.block_ids, new):
                    have.extend(ids)


@dataclass
class _Req:
    """Scheduler-side state of one request."""

    request: Any
    keys: list[bytes] = field(default_factory=list)
    mm_idx: int = 0
    keyless: bool = False  # extra keys dynkv cannot hash: never cached
    group_keys: list[bytes] = field(default_factory=list)  # several groups: each group's key, block by block
    block_ids: list[list[int]] = field(default_factory=lambda: [[]])  # per KV-cache group
    stored: int = 0  # leading blocks handed to the leader for storing
    lookup_tokens: int | None = None  # num_computed_tokens of a lookup awaiting its allocation
    load_tiers: dict[str, int] = field(default_factory=dict)
    sync: bool = False  # the pending lookup's pages load in the step that computes the request
    remote: Any = _UNSET  # RemotePrefill of kv_transfer_params, None when none is usable


def _writes_blocks_first(out: SchedulerOutput) -> bool:
    """Whether vLLM writes KV blocks in this step's input preparation (zeroes fresh ones, copies some).

    A sync load launched before that could land first and be overwritten;
    such a step's loads start where vLLM starts them, after it.
    """
    return bool(getattr(out, "new_block_ids_to_zero", None) or getattr(out, "kv_cache_block_copies", None))


def _has_extra_keys(req: Any) -> bool:
    return bool(
        getattr(req, "lora_request", None)
        or getattr(req, "mm_features", None)
        or getattr(req, "cache_salt", None)
        or getattr(req, "prompt_embeds", None) is not None
    )
