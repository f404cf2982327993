"""Synchronous, layer-by-layer loads: host pages copied in the step that computes the request.

The harness forward reads every loaded block at each layer right after asking
for that layer (as attention does), so a layer that arrives late is caught;
a forward that does not ask (a captured CUDA graph) must turn into load
errors, never into wrong KV. Runs on CPU; ``test_kvbm_gpu.py`` runs the same
checks with the KV cache on a GPU.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
from harness import Engine, Model, make_leader
from kvbm_checks import check_skipped_hooks, check_sync_loads, random_prompt

import dynkv.worker
import dynkv.worker.sync
from dynkv.protocol import LoadOp


@pytest.mark.parametrize("early", [False, True, "scheduler"])
@pytest.mark.parametrize("dims", ["LBHNC", "LBNHC"])
def test_sync_loads_in_process(rng: np.random.Generator, dims: str, early: bool) -> None:
    check_sync_loads(rng, Model(dims=dims, num_layers=6), tp=1, processes=False, early=early)


@pytest.mark.parametrize("tp,early", [(2, False), (4, False), (2, True)])
def test_sync_loads_tp_processes(rng: np.random.Generator, tp: int, early: bool) -> None:
    check_sync_loads(rng, Model(num_layers=5), tp=tp, processes=True, early=early)


@pytest.mark.parametrize("where", ["early", "scheduler"])
@pytest.mark.parametrize("layer_hooks", [True, False])
def test_early_sync_loads_launch_once_before_the_forward(rng: np.random.Generator, monkeypatch,
                                                         layer_hooks: bool, where: str) -> None:
    """start_early (or start_scheduled, then vLLM's hook) launches the sync loads once; start only the rest."""
    # layer_hooks False: a uniform decode step (whole copy, launched early, waited for at the forward)
    model = Model(num_layers=4)
    leader = make_leader(model)
    engine = Engine(leader, model, tp=1, processes=False)
    worker = engine.ranks[0].state.worker
    launches: list[tuple[str, bool]] = []
    real_sync = dynkv.worker.Worker._launch_sync
    in_start = []

    def launch_sync(self, ops, **kw):
        launches.append(("sync", bool(in_start)))
        return real_sync(self, ops, **kw)

    def start(plan, *, layer_hooks=True, _real=worker.start):
        in_start.append(1)
        try:
            return _real(plan, layer_hooks=layer_hooks)
        finally:
            in_start.clear()

    monkeypatch.setattr(dynkv.worker.Worker, "_launch_sync", launch_sync)
    monkeypatch.setattr(worker, "start", start)
    try:
        a = random_prompt(rng, model, 4)
        engine.serve("a", a)
        engine.drain()
        launches.clear()
        early = True if where == "early" else where
        out = engine.serve("a2", a + [3], sync=True, early=early, layer_hooks=layer_hooks,
                           hooks="all" if layer_hooks else "none")
        assert launches == [("sync", False)], "one launch, before start, none from start"
        assert worker.sync_launches == {where: 4}
        assert out.loaded == 4 and out.late == [] and out.load_errors == set() and out.mismatched == []
        # A plan launched before it was not seen is launched by start, as before.
        launches.clear()
        out = engine.serve("a3", a + [4], sync=True)
        assert launches == [("sync", True)]
        assert worker.sync_launches == {where: 4, "late": 4}
        assert set(worker.sync_launch_s) == {where, "late"} and all(t > 0 for t in worker.sync_launch_s.values())
        assert out.loaded == 4 and out.late == [] and out.load_errors == set() and out.mismatched == []
        engine.drain()
        assert leader.stats()["host"]["pinned"] == 0
    finally:
        engine.close()
        leader.close()


def test_scheduler_launches_only_in_the_thread_that_runs_the_steps(rng: np.random.Generator) -> None:
    """start_scheduled refuses before any step and from another thread; a copy of the plan counts as the plan."""
    model = Model(num_layers=3)
    leader = make_leader(model)
    engine = Engine(leader, model, tp=1, processes=False)
    worker = engine.ranks[0].state.worker
    try:
        a = random_prompt(rng, model, 3)
        assert worker.start_scheduled(leader.build_plan()) is False, "no step has run: its thread is unknown"
        engine.serve("a", a)
        engine.drain()
        assert dynkv.worker.in_process(worker.pool_name) is worker
        # The hit's plan, offered from another thread: refused, nothing launched; the step then loads as before.
        real_step = engine.ranks[0].state.step
        refused = []

        def step(plan, *args, **kw):
            t = threading.Thread(target=lambda: refused.append(worker.start_scheduled(plan)))
            t.start()
            t.join()
            return real_step(plan, *args, **kw)

        engine.ranks[0].state.step = step
        out = engine.serve("a2", a + [5], sync=True)
        assert False in refused and True not in refused
        assert worker.sync_launches == {"late": 3}
        assert out.loaded == 3 and out.late == [] and out.load_errors == set() and out.mismatched == []
        # Launched from the scheduler; vLLM's own hook and start then get a copy of the plan (no relaunch).
        engine.ranks[0].state.step = real_step
        copies = []

        def step_copy(plan, *args, **kw):
            assert worker.start_scheduled(plan) is True
            twin = copy.deepcopy(plan)
            copies.append(twin)
            return real_step(twin, *args, **kw)

        engine.ranks[0].state.step = step_copy
        out = engine.serve("a3", a + [6], sync=True, early=True)
        assert copies and worker.sync_launches == {"late": 3, "scheduler": 3}
        assert out.loaded == 3 and out.late == [] and out.load_errors == set() and out.mismatched == []
        engine.drain()
        assert leader.stats()["host"]["pinned"] == 0
    finally:
        engine.close()
        leader.close()
    assert dynkv.worker.in_process(worker.pool_name) is None, "a closed worker is no longer offered to the scheduler"


@pytest.mark.parametrize("hooks", ["none", "even"])
def test_forward_that_skips_layers_gets_load_errors_then_whole_loads(rng: np.random.Generator, hooks: str) -> None:
    """Layers the forward never asked for may have been read early: those blocks are recomputed."""
    check_skipped_hooks(rng, hooks)


def test_full_graph_step_waits_for_the_whole_load(rng: np.random.Generator) -> None:
    """A forward replayed as one CUDA graph (no per-layer hooks) waits for the copy before it starts."""
    model = Model(num_layers=4)
    leader = make_leader(model)
    engine = Engine(leader, model, tp=1, processes=False)
    try:
        a = random_prompt(rng, model, 4)
        engine.serve("a", a)
        engine.drain()
        out = engine.serve("a2", a + [3], sync=True, hooks="none", layer_hooks=False)
        assert out.loaded == 4 and out.late == [] and out.load_errors == set() and out.mismatched == []
    finally:
        engine.close()
        leader.close()


def test_failed_copy_lets_the_forward_go_on_and_reports_errors(rng: np.random.Generator, monkeypatch) -> None:
    model = Model(num_layers=4)
    leader = make_leader(model)
    engine = Engine(leader, model, tp=1, processes=False)
    real = dynkv.worker.sync.scatter_layers

    def fail_after_two_layers(pages, view, slots, blocks, groups, *, after=None, **kw):
        real(pages, view, slots, blocks, groups[:2], after=after, **kw)
        raise RuntimeError("copy failed at layer 2")

    try:
        a = random_prompt(rng, model, 4)
        engine.serve("a", a)
        engine.drain()
        monkeypatch.setattr(dynkv.worker.sync, "scatter_layers", fail_after_two_layers)
        out = engine.serve("a2", a + [3], sync=True, verify=False)  # would hang if layers 2-3 never came
        assert out.loaded == 4 and out.load_errors == set(out.blocks[:4])
        engine.drain()
        assert leader.stats()["host"]["pinned"] == 0
    finally:
        engine.close()
        leader.close()


@pytest.mark.gpu
@pytest.mark.parametrize("fail", [False, True])
def test_gpu_staged_group_loads_are_queued_by_the_launch_thread(rng: np.random.Generator, monkeypatch,
                                                                fail: bool) -> None:
    """A staged load in layer groups is queued by the rank's launch thread, the forward waiting for each group
    once its event is recorded; a launch that stops after two groups lets the forward go on, and every block of
    the load is a load error in that step (vLLM recomputes them), never KV read as loaded."""
    import dynkv.worker.staging

    model = Model(dims="LBHNC", device="cuda", num_layers=8)
    leader = make_leader(model, copy_path="staged")
    engine = Engine(leader, model, tp=1, processes=False)
    worker = engine.ranks[0].state.worker
    real = dynkv.worker.staging.staged_scatter
    threads: list[str] = []

    def staged(pages, view, slots, blocks, ring, *, groups=None, events=(), after=None, **kw):
        threads.append(threading.current_thread().name)
        if not fail:
            return real(pages, view, slots, blocks, ring, groups=groups, events=events, after=after, **kw)
        real(pages, view, slots, blocks, ring, groups=groups[:2], events=events[:2], after=after, **kw)
        raise RuntimeError("launch failed after two groups")

    try:
        assert len(worker.copy_paths.layer_groups()) > 2
        a = random_prompt(rng, model, 4)
        engine.serve("a", a)
        engine.drain()
        monkeypatch.setattr(dynkv.worker.staging, "staged_scatter", staged)
        out = engine.serve("a2", a + [3], sync=True, verify=not fail)  # would hang if groups 2.. never came
        assert threads and all(t.startswith("dynkv-launch") for t in threads), threads
        assert out.loaded == 4
        if fail:
            assert out.load_errors == set(out.blocks[:4])
        else:
            assert out.late == [] and out.load_errors == set() and out.mismatched == []
        engine.drain()
        assert leader.stats()["host"]["pinned"] == 0
    finally:
        engine.close()
        leader.close()


@pytest.mark.gpu
def test_gpu_forward_waits_only_for_the_groups_it_reaches(rng: np.random.Generator, monkeypatch) -> None:
    """While the launch thread is held after the first layer group, the forward's wait for a layer of that
    group returns (its event is recorded), and the load's later groups are not issued yet; released, the
    forward reads every group as loaded."""
    import dynkv.worker.staging

    model = Model(dims="LBHNC", device="cuda", num_layers=8)
    leader = make_leader(model, copy_path="staged")
    engine = Engine(leader, model, tp=1, processes=False)
    worker = engine.ranks[0].state.worker
    real = dynkv.worker.staging.staged_scatter
    hold, held = threading.Event(), threading.Event()
    seen: list[tuple[int, int]] = []

    def staged(pages, view, slots, blocks, ring, *, groups=None, events=(), after=None, **kw):
        real(pages, view, slots, blocks, ring, groups=groups[:1], events=events[:1], after=after, **kw)
        held.set()
        assert hold.wait(timeout=60)
        real(pages, view, slots, blocks, ring, groups=groups[1:], events=events[1:], **kw)
        for i in range(1, len(groups)):
            after.set(i)

    real_wait = worker.wait_for_layer

    def wait_for_layer(name: str) -> None:
        real_wait(name)
        st = worker._sync
        if st is not None and st.queued is not None:
            seen.append((worker._layer_of[name], st.queued.issued))
            if worker._layer_of[name] == 0:
                hold.set()  # the first group's wait returned with the others unissued: let the launch go on

    try:
        a = random_prompt(rng, model, 4)
        engine.serve("a", a)
        engine.drain()
        monkeypatch.setattr(dynkv.worker.staging, "staged_scatter", staged)
        monkeypatch.setattr(worker, "wait_for_layer", wait_for_layer)
        out = engine.serve("a2", a + [3], sync=True)
        assert held.is_set() and seen and seen[0] == (0, 1), seen
        assert out.loaded == 4 and out.late == [] and out.load_errors == set() and out.mismatched == []
    finally:
        hold.set()
        engine.close()
        leader.close()


def test_sync_load_needs_every_page_on_the_host(tmp_path, rng: np.random.Generator) -> None:
    model = Model()
    leader = make_leader(model, tmp_path, host_pages=8, disk_paths=[str(tmp_path)], disk_gb=0.01,
                         disk_admit_min_hits=0)
    engine = Engine(leader, model, tp=1, processes=False)
    try:
        a = random_prompt(rng, model, 6)
        engine.serve("a", a)
        for i in range(3):  # push a's pages out of the 8-page host tier, onto disk
            engine.serve(f"f{i}", random_prompt(rng, model, 6))
        engine.drain()
        keys = engine.keys(a)
        n = leader.lookup("a2", keys)
        assert n > 0 and not leader.on_host("a2", n)
        with pytest.raises(ValueError, match="synchronous load needs every page in the host tier"):
            leader.begin_load("a2", list(range(n)), sync=True)
        leader.request_finished("a2")
        assert leader.stats()["host"]["pinned"] == 0
    finally:
        engine.close()
        leader.close()


def test_sync_load_op_copies_host_pages_only() -> None:
    with pytest.raises(ValueError, match="copies host pages only"):
        LoadOp(1, "r", (1,), (2,), failed=(3,), sync=True)
