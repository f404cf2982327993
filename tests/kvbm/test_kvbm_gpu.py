"""The KVBM with the KV cache on a GPU: loads and stores through pinned host pages on CUDA streams."""

from __future__ import annotations

import numpy as np
import pytest
from harness import Engine, Model, conversation_stream, make_leader, serve_stream
from kvbm_checks import check_one_steps_stores, check_skipped_hooks, check_sync_loads, random_prompt

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("copy_path", ["kernel", "staged"])
@pytest.mark.parametrize("dims", ["LBHNC", "LBNHC"])
def test_gpu_stream_in_process(rng: np.random.Generator, dims: str, copy_path: str) -> None:
    model = Model(dims=dims, device="cuda")
    leader = make_leader(model, tp=2, host_pages=24, copy_path=copy_path)
    engine = Engine(leader, model, tp=2, processes=False)
    try:
        paths = [r.state.worker.copy_paths for r in engine.ranks]
        assert [(p.h2d, p.d2h) for p in paths] == [(copy_path, copy_path)] * 2
        totals = serve_stream(engine, conversation_stream(rng, num_prefixes=5, requests=30, block_size=model.block_size))
        assert totals["loaded"] > 0
        assert leader.metrics.value("dynkv_bytes_moved_total", direction="h2d") > 0
    finally:
        engine.close()
        leader.close()


@pytest.mark.parametrize("copy_path", ["kernel", "staged"])
def test_gpu_one_steps_stores_of_several_requests(rng: np.random.Generator, copy_path: str) -> None:
    check_one_steps_stores(rng, "cuda", copy_path=copy_path)


def test_gpu_tp_processes(rng: np.random.Generator) -> None:
    model = Model(dims="LBNHC", device="cuda")
    leader = make_leader(model, tp=2, host_pages=32)
    engine = Engine(leader, model, tp=2, processes=True)
    try:
        totals = serve_stream(engine, conversation_stream(rng, num_prefixes=3, requests=8, block_size=model.block_size))
        assert totals["loaded"] > 0
    finally:
        engine.close()
        leader.close()


@pytest.mark.parametrize("copy_path", ["kernel", "staged"])
@pytest.mark.parametrize("tp,processes,early", [(1, False, False), (2, True, False), (1, False, True),
                                                (2, True, True), (1, False, "scheduler")])
def test_gpu_sync_layer_by_layer_loads(rng: np.random.Generator, tp: int, processes: bool,
                                       early: bool | str, copy_path: str) -> None:
    """Each layer's reads, queued on the compute stream after its wait, see the loaded pages, on either path."""
    check_sync_loads(rng, Model(dims="LBNHC", device="cuda", num_layers=8), tp=tp, processes=processes,
                     early=early, copy_path=copy_path)


@pytest.mark.parametrize("tp,processes,early", [(1, False, False), (2, True, True), (1, False, "scheduler")])
def test_gpu_staged_loads_in_groups_of_layers(rng: np.random.Generator, tp: int, processes: bool,
                                              early: bool | str) -> None:
    """24 layers on the staged path: eight groups of three, each waited for by the attention of its first layer."""
    model = Model(dims="LBHNC", device="cuda", num_layers=24)
    check_sync_loads(rng, model, tp=tp, processes=processes, early=early, copy_path="staged")


@pytest.mark.parametrize("priority", [0, -1])
def test_gpu_sync_loads_at_either_load_priority(rng: np.random.Generator, priority: int) -> None:
    """The load stream's priority changes when copies run, never what the forward reads."""
    check_sync_loads(rng, Model(dims="LBHNC", device="cuda", num_layers=8), tp=1, processes=False,
                     load_priority=priority)


@pytest.mark.parametrize("copy_path", ["kernel", "staged"])
def test_gpu_forward_without_layer_hooks_gets_load_errors(rng: np.random.Generator, copy_path: str) -> None:
    check_skipped_hooks(rng, "even", device="cuda", copy_path=copy_path)


def test_gpu_scheduler_launch_follows_work_queued_on_the_steps_stream(rng: np.random.Generator) -> None:
    """A load the scheduler launches lands after work already queued on the stream the steps compute on.

    The steps run on a side stream, as a model runner's may. Before the hit's step, that stream
    still writes junk into the very blocks the hit loads, behind a long sleep (a freed block's
    last writer); the scheduler then launches the load from the default stream. The forward,
    on the side stream, must read the pages, not the junk.
    """
    import torch

    model = Model(dims="LBNHC", device="cuda", num_layers=4)
    leader = make_leader(model)
    engine = Engine(leader, model, tp=1, processes=False)
    state = engine.ranks[0].state
    side = torch.cuda.Stream()
    real_step = state.step
    junked: list[int] = []

    def step(plan, writes, reads, *forward):
        if reads:
            with torch.cuda.stream(side):
                torch.cuda._sleep(100_000_000)
                for block, key in reads:
                    for layer in range(model.num_layers):
                        state.kv.set_block(state.layers, layer, block, torch.full_like(state._expected(key, layer), 7))
                    junked.append(block)
            assert state.worker.start_scheduled(plan), "the scheduler shares the steps' thread"
        with torch.cuda.stream(side):
            return real_step(plan, writes, reads, *forward)

    state.step = step
    try:
        a = random_prompt(rng, model, 5)
        engine.serve("a", a)
        engine.drain()
        out = engine.serve("a2", a + [9] * model.block_size, sync=True)
        torch.cuda.synchronize()
        assert sorted(junked) == sorted(out.blocks[:5])
        assert state.worker.sync_launches == {"scheduler": 5}
        assert out.late == [], f"the forward read junk: the load landed before the junk {out.late[:8]}"
        assert out.loaded == 5 and out.load_errors == set() and out.mismatched == []
    finally:
        engine.close()
        leader.close()
