"""A worker across vLLM's sleep mode: copies drained, the KV cache forgotten, loads refused, then taken back.

Driven through the harness engine (a real leader with host and disk tiers, a
real worker in this process), as vLLM 0.33 drives the connector's
``unregister_kv_caches`` and ``restore_kv_caches``.
"""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
import torch
from harness import DTYPE, Engine, Model, layer_name, make_leader
from kvtensors import make_rank_kv

import dynkv.worker.worker as worker_mod

POISON = 0xA5


def poison(state, blocks: list[int]) -> None:
    """Fill every layer of ``blocks`` with :data:`POISON` bytes."""
    for layer in range(state.model.num_layers):
        for b in blocks:
            t = state.kv.block(state.layers, layer, b)
            state.kv.set_block(state.layers, layer, b, torch.full_like(t, POISON))


def poisoned(state, blocks: list[int]) -> bool:
    return all(bool((state.kv.block(state.layers, layer, b) == POISON).all())
               for layer in range(state.model.num_layers) for b in blocks)


def fresh_kv(state, rng: np.random.Generator, num_blocks: int, head_size: int | None = None):
    """A new KV cache for the rank (vLLM's memory after wake-up), in the layout of the old one."""
    m = state.model
    shape = m.shape if head_size is None else type(m.shape)("harness", num_heads=m.num_heads, head_size=head_size,
                                                               block_size=m.block_size)
    return make_rank_kv(rng, shape, dims=m.dims, form="separate", dtype=DTYPE, heads=state.heads,
                        num_layers=m.num_layers, num_blocks=num_blocks, device=m.device)


def hold_next_store(monkeypatch, w) -> tuple[threading.Event, threading.Event]:
    """Hold the worker's next store copy back: ``(release, finished)``.

    On CPU the copy waits in its thread until ``release`` is set; on a GPU the
    store stream waits behind a long kernel on the compute stream (``release``
    is set already). ``finished`` is set once the CPU copy is done.
    """
    release, finished = threading.Event(), threading.Event()
    if w.view.device.type == "cuda":
        real_after = w.after_forward

        def after_forward() -> None:
            torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, before the store is launched
            monkeypatch.setattr(w, "after_forward", real_after)
            real_after()

        monkeypatch.setattr(w, "after_forward", after_forward)
        release.set()
        return release, finished
    real_gather = worker_mod.gather

    def slow_gather(*args, **kw):
        release.wait()
        real_gather(*args, **kw)
        finished.set()
        monkeypatch.setattr(worker_mod, "gather", real_gather)

    monkeypatch.setattr(worker_mod, "gather", slow_gather)
    return release, finished


@pytest.mark.parametrize("device,copy_path", [
    ("cpu", "auto"),
    pytest.param("cuda", "kernel", marks=pytest.mark.gpu),
    pytest.param("cuda", "staged", marks=pytest.mark.gpu),
])
def test_sleep_drains_copies_refuses_loads_keeps_the_tiers_and_restores(tmp_path, rng: np.random.Generator,
                                                                         monkeypatch, device: str,
                                                                         copy_path: str) -> None:
    model = Model(device=device)
    leader = make_leader(model, host_pages=64, disk_gb=0.01, disk_paths=[str(tmp_path)], disk_admit_min_hits=0,
                         copy_path=copy_path)
    engine = Engine(leader, model, tp=1, num_blocks=48, processes=False)
    state = engine.ranks[0].state
    w = state.worker
    try:
        shared = rng.integers(0, 1000, 3 * model.block_size).tolist()
        assert engine.serve("a", shared + [1, 2]).loaded == 0
        engine.drain()
        before = leader.stats()
        assert before["host"]["stored"] == 3 and before["disk"]["stored"] == 3

        # A store in flight when vLLM sleeps: unregister returns only once it is done.
        release, finished = hold_next_store(monkeypatch, w)
        held = engine.serve("s", rng.integers(0, 1000, model.block_size).tolist(), verify=False, finish=False)
        assert device == "cuda" or not finished.is_set()
        (store_job,) = [j.job for j in w._jobs if j.kind == "store"]
        view = weakref.ref(w.view)
        paths = None if w.copy_paths is None else (w.copy_paths.h2d, w.copy_paths.d2h)
        threading.Thread(target=release.set).start()  # may run before or after unregister begins to wait
        w.unregister()
        report = w.poll()
        assert report.done.get(store_job) == 1, "unregister returned with a store still copying"
        leader.update(report)
        gc.collect()
        assert w.asleep and w.view is None and w.copy_paths is None
        assert view() is None, "the worker still holds the KV cache's pointers"
        engine.finish("s", held.blocks)
        engine.drain()
        assert leader.stats()["host"]["stored"] == 4  # the drained store landed

        # Asleep: a host hit is refused (its blocks recomputed, not one byte written), a store too.
        poison(state, list(engine.free_blocks))
        out = engine.serve("b", shared + rng.integers(0, 1000, model.block_size).tolist() + [3], verify=False)
        assert out.loaded == 3 and out.load_errors == set(out.blocks[:3])
        assert poisoned(state, out.blocks[:3]), "a refused load wrote into the unregistered KV cache"
        engine.drain()
        stored = leader.stats()
        assert stored["host"]["stored"] == 4, "a store asked for while asleep was kept"
        assert stored["disk"]["stored"] >= before["disk"]["stored"]  # host and disk tiers intact

        # Another KV cache of the same shape after wake-up: loads land in it, the old memory is not touched.
        with pytest.raises(ValueError, match="blocks 40, before the sleep 48"):
            w.register(fresh_kv(state, rng, 40).view(num_heads_total=model.num_heads, head_start=state.heads[0]))
        with pytest.raises(ValueError, match="page geometry"):
            w.register(fresh_kv(state, rng, 48, head_size=2 * model.head_size).view(
                num_heads_total=model.num_heads, head_start=state.heads[0]))
        assert w.asleep
        old_kv, old_layers = state.kv, state.layers
        poison(state, list(range(48)))
        state.kv = fresh_kv(state, rng, 48)
        state.layers = state.kv.layers()
        w.register(state.kv.view(num_heads_total=model.num_heads, head_start=state.heads[0]),
                   {layer_name(i): i for i in range(model.num_layers)})
        assert not w.asleep
        assert paths is None or (w.copy_paths.h2d, w.copy_paths.d2h) == paths  # the choice before the sleep
        out = engine.serve("c", shared + [4])
        assert out.loaded == 3 and out.load_errors == set() and out.mismatched == []
        engine.drain()
        assert all(bool((old_kv.block(old_layers, layer, b) == POISON).all())
                   for layer in range(model.num_layers) for b in range(48)), "a copy touched the old KV cache"
    finally:
        engine.close()
        leader.close()


def test_a_second_sleep_notice_changes_nothing() -> None:
    model = Model()
    leader = make_leader(model, host_pages=16)
    engine = Engine(leader, model, tp=1, num_blocks=16, processes=False)
    w = engine.ranks[0].state.worker
    try:
        w.unregister()
        w.unregister()
        assert w.asleep and w.view is None
        v = engine.ranks[0].state.kv.view(num_heads_total=model.num_heads)
        w.register(v)
        assert not w.asleep and w.view is v
    finally:
        engine.close()
        leader.close()
