"""The KV check of `bench e2e` (dynkv.benchmarks.e2e.kv): what a request's blocks and copies were, and how digests compare."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dynkv.benchmarks.e2e.kv import KVWatch, compare
from dynkv.protocol import LoadOp, StepPlan, StoreOp


def _rank(rank: int, blocks: list[int], stored: list[tuple[int, int]] = (), loaded: list[tuple[int, int]] = ()) -> dict:
    return {"rank": rank, "heads": [rank, rank + 1], "blocks": blocks, "stored": list(stored), "loaded": list(loaded)}


def test_compare_counts_equal_blocks_over_ranks_and_names_the_first_that_differs() -> None:
    ours = {"blocks": 4, "ranks": [_rank(0, [1, 2, 3, 4], stored=[(0, 1), (1, 2)], loaded=[(2, 3)]),
                                   _rank(1, [5, 6, 7, 8], stored=[(0, 5), (1, 99)], loaded=[(2, 7)])]}
    ref = {"blocks": 4, "ranks": [_rank(0, [1, 2, 3, 0]), _rank(1, [5, 6, 7, 8])]}
    c = compare(ours, ref)
    # Block 1's page differs on rank 1 only: the block counts as differing.
    assert c["stored"] == {"equal": 1, "of": 2, "first_differing": 1}
    assert c["loaded"] == {"equal": 1, "of": 1, "first_differing": None}
    assert c["vs_reference"] == {"equal": 3, "of": 4, "first_differing": 3}
    assert "vs_reference" not in compare(ours)


def test_compare_refuses_another_tp_size() -> None:
    ours = {"blocks": 1, "ranks": [_rank(0, [1]), _rank(1, [2])]}
    with pytest.raises(ValueError, match="not the same TP size"):
        compare(ours, {"blocks": 1, "ranks": [_rank(0, [1])]})


class _Scheduler:
    def __init__(self, outputs: list) -> None:
        self.outputs = outputs

    def schedule(self) -> object:
        return self.outputs.pop(0)


class _Connector:
    def __init__(self, plans: list) -> None:
        self.plans = plans

    def build_connector_meta(self, scheduler_output: object) -> object:
        return SimpleNamespace(plan=self.plans.pop(0))


def _out(new=(), cached=(), resumed=()) -> SimpleNamespace:
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(list(b),)) for r, b in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[r for r, _ in cached],
                                              new_block_ids=[None if b is None else (list(b),) for _, b in cached],
                                              resumed_req_ids=set(resumed)))


def test_watch_follows_a_request_over_steps_and_its_copies() -> None:
    sched = _Scheduler([_out(new=[("a", [4, 5])]), _out(cached=[("a", [6]), ("b", None)]),
                        _out(cached=[("a", [9, 10])], resumed=["a"])])
    conn = _Connector([StepPlan(loads=[LoadOp(1, "a", (4, 5), (7, 8))]),
                       StepPlan(stores=[StoreOp(2, "a", (6,), (3,))]), StepPlan()])
    watch = KVWatch(sched, conn)
    sched.schedule()
    conn.build_connector_meta(None)
    sched.schedule()
    conn.build_connector_meta(None)
    seen = watch.take()
    assert seen == {"a": {"blocks": [4, 5, 6], "stored": {6: 3}, "loaded": {4: 7, 5: 8}}}
    sched.schedule()  # a resumed request gets its blocks anew
    conn.build_connector_meta(None)
    assert watch.take() == {"a": {"blocks": [9, 10], "stored": {}, "loaded": {}}}
    assert watch.take() == {}
