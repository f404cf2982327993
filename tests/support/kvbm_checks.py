"""Checks of the block manager run by the CPU tests and again, with the KV cache on a GPU, by the GPU tests."""

from __future__ import annotations

import numpy as np
import pytest
from harness import Engine, Model, make_leader


def random_prompt(rng: np.random.Generator, model: Model, blocks: int) -> list[int]:
    return rng.integers(0, 1000, blocks * model.block_size).tolist()


def check_one_steps_stores(rng: np.random.Generator, device: str = "cpu", copy_path: str = "auto") -> None:
    """store_many (a decode step's stores): one job per request, launched as one copy; a page two requests store
    is stored once; every loaded byte exact. A step whose copy cannot start stores none of its pages."""
    model = Model(device=device)
    leader = make_leader(model, copy_path=copy_path)
    engine = Engine(leader, model, tp=1, processes=False)
    try:
        shared = rng.integers(0, 1000, 2 * model.block_size).tolist()
        own = [rng.integers(0, 1000, model.block_size).tolist() for _ in range(3)]
        keys = [engine.keys(shared + tail) for tail in own]
        assert keys[0][:2] == keys[1][:2] and keys[0][2] != keys[1][2]
        blocks = [[engine.free_blocks.pop() for _ in k] for k in keys]
        for rid, k in zip("abc", keys):
            assert leader.lookup(rid, k) == 0
            leader.begin_load(rid, [])
        with pytest.raises(ValueError, match="'b': 3 keys but 2 blocks"):
            leader.store_many([("a", keys[0], blocks[0]), ("b", keys[1], blocks[1][:2])])
        assert leader.stats()["host"]["pending"] == 0, "a bad call allocates nothing"
        assert leader.store_many([("a", keys[0], blocks[0]), ("b", keys[1], blocks[1])]) == [3, 1]
        assert leader.store_many([("a", keys[0], blocks[0])]) == [0], "pages already pending are skipped"
        plans, build = [], leader.build_plan
        leader.build_plan = lambda: plans.append(build()) or plans[-1]  # type: ignore[method-assign]
        engine.step(writes=[*zip(blocks[0], keys[0]), *zip(blocks[1], keys[1])])
        # c's last block id is past the KV cache: the step's one copy fails to start, for c and for a2.
        a2 = rng.integers(0, 1000, model.block_size).tolist()
        k2 = engine.keys(shared + own[0] + a2)[3]
        assert leader.store_many([("a", [k2], [engine.free_blocks[-1]]),
                                  ("c", keys[2][2:], [10**6])]) == [1, 1]
        engine.step(writes=[(engine.free_blocks[-1], k2)])
        leader.build_plan = build  # type: ignore[method-assign]
        assert [(op.req_id, len(op.slots)) for op in plans[0].stores] == [("a", 3), ("b", 1)]
        assert [op.req_id for op in plans[1].stores] == ["a", "c"]
        for rid, b in zip("abc", blocks):
            engine.finish(rid, b)
        engine.drain()
        assert leader.metrics.value("dynkv_store_errors_total", tier="host") == 2
        assert leader.lookup("probe", [*keys[0], k2]) == 3 and leader.lookup("probe2", keys[2]) == 2
        leader.request_finished("probe")
        leader.request_finished("probe2")
        for i, tail in enumerate(own[:2]):
            out = engine.serve(f"again{i}", shared + tail + [1])
            assert out.loaded == 3 and out.mismatched == []
    finally:
        engine.close()
        leader.close()


def check_sync_loads(rng: np.random.Generator, model: Model, *, tp: int, processes: bool,
                     load_priority: int | None = None, early: bool | str = False, copy_path: str = "auto") -> None:
    leader = make_leader(model, tp=tp, copy_path=copy_path)
    engine = Engine(leader, model, tp=tp, num_blocks=96, processes=processes)
    try:
        if load_priority is not None:  # in-process ranks only
            for r in engine.ranks:
                w = r.state.worker
                w.set_load_priority(load_priority)
                assert w._streams is None or (w._streams[0].priority < 0) == (load_priority < 0)
        prompts = [random_prompt(rng, model, 6) for _ in range(3)]
        for i, p in enumerate(prompts):
            engine.serve(f"first{i}", p)
        engine.drain()
        for i, p in enumerate(prompts):
            out = engine.serve(f"again{i}", p + [7] * model.block_size, sync=True, early=early)
            assert out.loaded == 6
            assert out.late == [], f"the forward read layers before they arrived: {out.late[:8]}"
            assert out.load_errors == set() and out.mismatched == []
            assert f"again{i}" not in engine.recving, "a sync load is not reported as finished receiving"
        engine.drain()
        assert leader.stats()["host"]["pinned"] == 0, "every sync load was acknowledged and unpinned"
        assert leader.metrics.value("dynkv_hits_total", tier="host") == 18
    finally:
        engine.close()
        leader.close()


def check_skipped_hooks(rng: np.random.Generator, hooks: str, device: str = "cpu", copy_path: str = "auto") -> None:
    model = Model(num_layers=4, device=device)
    leader = make_leader(model, copy_path=copy_path)
    engine = Engine(leader, model, tp=1, processes=False)
    try:
        a, b = random_prompt(rng, model, 5), random_prompt(rng, model, 5)
        engine.serve("a", a)
        engine.serve("b", b)
        engine.drain()
        out = engine.serve("a2", a + [1] * model.block_size, sync=True, hooks=hooks, verify=False)
        assert out.loaded == 5
        assert out.load_errors == set(out.blocks[:5]), "every block of the unasked step is a load error"
        # From now on the forward waits for whole loads before it starts: right without any hook.
        out = engine.serve("b2", b + [1] * model.block_size, sync=True, hooks="none")
        assert out.loaded == 5 and out.late == [] and out.load_errors == set() and out.mismatched == []
        engine.drain()
        assert leader.stats()["host"]["pinned"] == 0
    finally:
        engine.close()
        leader.close()
