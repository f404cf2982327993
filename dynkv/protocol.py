"""What the leader tells the workers each step, and what they report back.

Small picklable dataclasses: in vLLM they ride inside the connector's
per-step metadata (leader -> workers) and worker metadata (workers ->
leader); in the test harness they go through pipes. A *job* is one op of one
step on every TP rank; it is complete when each rank has reported it done or
failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


__all__ = [
    "LoadOp",
    "PullSpec",
    "StepPlan",
    "StoreOp",
    "WorkerReport",
]

@dataclass(frozen=True)
class PullSpec:
    """Pages to pull from a prefill engine's host pool before a load (disaggregated serving).

    Each rank reads its head slice of remote page ``remote_slots[i]`` of
    ``transfer`` into local host page ``local_slots[i]``. ``host:port`` is the
    prefill engine's side channel; ``instance`` names the run of that engine
    (its handshake says the same), so an engine restarted at the same address
    is told apart.
    """

    engine_id: str
    host: str
    port: int
    instance: str
    transfer: str
    local_slots: tuple[int, ...]
    remote_slots: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.local_slots) != len(self.remote_slots):
            raise ValueError(f"pull of transfer {self.transfer!r}: {len(self.local_slots)} local slots but "
                             f"{len(self.remote_slots)} remote slots")


@dataclass(frozen=True)
class LoadOp:
    """Copy host pages ``slots[i]`` into device blocks ``block_ids[i]``.

    ``failed`` lists further blocks of the same request that the leader could
    not bring to the host tier (a disk page failed its checks): workers copy
    nothing into them and report them as load errors, so vLLM recomputes.
    With ``pull``, some of ``slots`` are first filled from a prefill engine;
    when that fails, their blocks are load errors and the others still load.
    ``sync``: the request is computed in this same step (its pages are all
    in the host tier), so the step's forward waits for the copy; it is not
    reported as finished receiving.
    """

    job: int
    req_id: str
    block_ids: tuple[int, ...]
    slots: tuple[int, ...]
    failed: tuple[int, ...] = ()
    pull: PullSpec | None = None
    sync: bool = False

    def __post_init__(self) -> None:
        if len(self.block_ids) != len(self.slots):
            raise ValueError(f"load job {self.job}: {len(self.block_ids)} blocks but {len(self.slots)} slots")
        if self.pull is not None and not set(self.pull.local_slots) <= set(self.slots):
            raise ValueError(f"load job {self.job}: pulls into host slots it does not load")
        if self.sync and (self.pull is not None or self.failed):
            raise ValueError(f"load job {self.job}: a synchronous load copies host pages only")


@dataclass(frozen=True)
class StoreOp:
    """Copy device blocks ``block_ids[i]`` into host pages ``slots[i]`` after this step's forward."""

    job: int
    req_id: str
    block_ids: tuple[int, ...]
    slots: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.block_ids) != len(self.slots):
            raise ValueError(f"store job {self.job}: {len(self.block_ids)} blocks but {len(self.slots)} slots")


@dataclass
class StepPlan:
    """One step's work for every worker.

    ``finished`` names requests vLLM finished while their stores were in
    flight: a worker reports each in ``finished_sending`` once its own stores
    for it are done, and vLLM then frees the blocks.
    """

    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.finished)

    def sync_loads(self) -> list[LoadOp]:
        """The loads that feed this step's forward (:attr:`LoadOp.sync`, with blocks to copy)."""
        return [op for op in self.loads if op.sync and op.block_ids]


@dataclass
class WorkerReport:
    """Jobs that completed on one or more ranks since the last report.

    ``done[job]`` and ``failed[job]`` count ranks; ``failed_blocks`` are the
    device blocks whose loads failed (vLLM recomputes them); ``moved`` sums
    ``direction -> (bytes, seconds)`` of finished copies, for metrics;
    ``copy_paths`` is a rank's copy-path choice, once, after it registered its
    KV cache: ``direction -> {"path", "gbps": {path or "memcpy": GB/s measured}, "source"}``.
    """

    done: dict[int, int] = field(default_factory=dict)
    failed: dict[int, int] = field(default_factory=dict)
    failed_blocks: set[int] = field(default_factory=set)
    moved: dict[str, tuple[int, float]] = field(default_factory=dict)
    copy_paths: dict[str, dict] = field(default_factory=dict)

    def merge(self, other: WorkerReport) -> WorkerReport:
        """Sum of both reports (the ranks of one engine); neither input changes."""
        out = WorkerReport(dict(self.done), dict(self.failed), set(self.failed_blocks), dict(self.moved),
                           dict(self.copy_paths or other.copy_paths))
        for job, n in other.done.items():
            out.done[job] = out.done.get(job, 0) + n
        for job, n in other.failed.items():
            out.failed[job] = out.failed.get(job, 0) + n
        out.failed_blocks |= other.failed_blocks
        for d, (b, s) in other.moved.items():
            b0, s0 = out.moved.get(d, (0, 0.0))
            out.moved[d] = (b0 + b, s0 + s)
        return out

    def is_empty(self) -> bool:
        return not (self.done or self.failed or self.failed_blocks or self.copy_paths)
