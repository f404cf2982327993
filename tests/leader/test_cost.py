"""Load or recompute (dynkv.policy.cost), on a simulated clock: no timing is asserted on."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from harness import Engine, Model, make_leader

from dynkv.policy.cost import BANDWIDTH_HORIZON_S, MIN_STEP_TOKENS, MIN_WINDOW_S, CostModel, Decision
from dynkv.protocol import WorkerReport

MiB = 1 << 20


def fold(sums: tuple[float, float], *samples: tuple[float, float]) -> float:
    """The bandwidth estimate after samples ``(bytes, busy seconds)`` added to ``sums`` (bytes, busy seconds):
    both sums fade by e over BANDWIDTH_HORIZON_S of busy time. An estimate set directly counts as one
    window's worth: ``(bw * MIN_WINDOW_S, MIN_WINDOW_S)``."""
    b, t = sums
    for nbytes, busy in samples:
        keep = math.exp(-busy / BANDWIDTH_HORIZON_S)
        b, t = keep * b + nbytes, keep * t + busy
    return b / t


def set_to(bw: float) -> tuple[float, float]:
    return bw * MIN_WINDOW_S, MIN_WINDOW_S


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def model_with(clock: Clock) -> CostModel:
    return CostModel(clock=clock)


def test_nothing_measured_loads_everything() -> None:
    c = CostModel(clock=Clock())
    d = c.disk_pays(512, 2 * MiB, 16)
    assert d.load and d.disk_pages == 512 and d.load_s is None
    assert c.disk_pays(0, 2 * MiB, 16).load


def test_prefill_rate_from_steps_and_only_prefill_steps_count() -> None:
    clock = Clock()
    c = model_with(clock)
    c.step_begin(8192)
    clock.t += 0.5
    c.step_end()
    assert c.prefill_tokens_per_s == pytest.approx(16384)
    c.step_begin(MIN_STEP_TOKENS - 1)  # a decode step: not a prefill sample
    clock.t += 10
    c.step_end()
    assert c.prefill_tokens_per_s == pytest.approx(16384)
    c.step_begin(0)  # nothing scheduled: no model runs, no output comes back for it
    c.step_begin(4096)
    clock.t += 0.5
    c.step_end()
    assert c.prefill_tokens_per_s == pytest.approx(0.8 * 16384 + 0.2 * 8192)
    c.step_end()  # more ends than begins: ignored
    assert c.prefill_tokens_per_s == pytest.approx(0.8 * 16384 + 0.2 * 8192)


def test_overlapping_steps_pair_first_in_first_out() -> None:
    clock = Clock()
    c = model_with(clock)
    c.step_begin(1000)  # async scheduling: the next step is handed over before the first returns
    clock.t += 1
    c.step_begin(3000)
    clock.t += 1
    c.step_end()  # the first: 1000 tokens in 2 s
    assert c.prefill_tokens_per_s == pytest.approx(500)


def test_disk_bandwidth_counts_service_not_queueing() -> None:
    clock = Clock()
    c = model_with(clock)
    c.disk_submitted(1, 100 * MiB)
    c.disk_submitted(2, 100 * MiB)  # queued behind job 1
    assert c.queue_bytes == 200 * MiB
    clock.t += 1
    c.disk_done(1)
    assert c.disk_bytes_per_s == pytest.approx(100 * MiB)
    clock.t += 1
    c.disk_done(2)  # served from t=101 on, not from its submission at t=100
    assert c.disk_bytes_per_s == pytest.approx(100 * MiB)
    assert c.queue_bytes == 0
    c.disk_done(3)  # unknown job: nothing changes
    c.disk_submitted(4, 0)
    assert c.queue_bytes == 0 and c.disk_bytes_per_s == pytest.approx(100 * MiB)


def test_disk_bandwidth_of_loads_read_side_by_side_is_the_disk_s_not_each_load_s() -> None:
    """Sixteen loads read at once on the I/O threads, pages done in turn at 1000 MiB/s in all: 1000 MiB/s.

    Timed load by load from the previous one's end, the last fifteen loads
    (which finish 2 ms apart) would read as 8000 MiB/s each.
    """
    clock = Clock()
    c = model_with(clock)
    loads, pages, page = 16, 8, 2 * MiB
    for job in range(1, loads + 1):
        c.disk_submitted(job, pages * page, tokens=pages * 16, page_bytes=page)
    left = dict.fromkeys(range(1, loads + 1), pages)
    for k in range(loads * pages):
        clock.t += page / (1000 * MiB)
        job = k % loads + 1
        c.disk_read(job, page)
        left[job] -= 1
        if not left[job]:
            c.disk_done(job)
    assert c.queue_bytes == 0
    assert c.disk_bytes_per_s == pytest.approx(1000 * MiB, rel=1e-6)
    clock.t += 10  # idle: no time counts
    c.disk_submitted(99, 10 * page)
    for _ in range(10):
        clock.t += page / (500 * MiB)
        c.disk_read(99, page)
    c.disk_done(99)
    # Samples near 500 MiB/s (windows of 20 ms, the first with the last pages before the pause) pull the
    # average below 1000; with the idle 10 s counted the first would be about 2 MiB/s, pulling it to 800.
    after = c.disk_bytes_per_s / MiB
    assert 810 < after < 990, after


def test_disk_bandwidth_times_reads_when_their_threads_finished_them_not_when_they_are_applied() -> None:
    """The leader applies completions at its next call; a disk that read 4 MiB in 4 ms is not 8 MiB/s slow."""
    clock = Clock()
    c = model_with(clock)
    start = clock.t
    c.disk_submitted(1, 4 * MiB, tokens=64, page_bytes=2 * MiB)
    clock.t += 0.5  # the next scheduler step
    c.disk_read(1, 2 * MiB, at=start + 0.002)
    c.disk_read(1, 2 * MiB, at=start + 0.004)
    c.disk_done(1, at=start + 0.004)
    assert c.disk_bytes_per_s == pytest.approx(1000 * MiB, rel=1e-6)


def test_decision_weighs_queue_plus_read_against_recompute() -> None:
    clock = Clock()
    c = model_with(clock)
    c.prefill_tokens_per_s, c.disk_bytes_per_s = 20_000.0, 2e9  # an H100 prefilling 8B, a 2 GB/s disk
    # 16 tokens per 2 MiB page: 0.8 ms to recompute, 1.05 ms to read: recompute.
    d = c.disk_pays(256, 2 * MiB, 16)
    assert not d.load and d.load_s == pytest.approx(256 * 2 * MiB / 2e9) and d.recompute_s == pytest.approx(0.2048)
    c.disk_bytes_per_s = 8e9  # a fast array: reading wins while the queue is short
    assert c.disk_pays(256, 2 * MiB, 16).load
    c.queue_bytes = 2048 * MiB  # other requests' reads ahead of this one
    assert not c.disk_pays(256, 2 * MiB, 16).load
    c.queue_bytes = 0
    c.prefill_tokens_per_s = 1e6  # a model that prefills far faster than any disk
    assert not c.disk_pays(256, 2 * MiB, 16).load
    with pytest.raises(ValueError, match="margin"):
        CostModel(margin=0)


@pytest.mark.parametrize("fast_disk", [True, False])
def test_leader_stops_the_match_before_disk_pages_that_do_not_pay(rng: np.random.Generator, tmp_path,
                                                                   fast_disk: bool) -> None:
    model = Model()
    leader = make_leader(model, host_pages=8, disk_gb=0.01, disk_paths=[str(tmp_path / "d")], disk_direct_io=False,
                         disk_admit_min_hits=0)
    engine = Engine(leader, model, tp=1, num_blocks=64, processes=False)
    try:
        assert leader.cost is not None
        prompt, other = (rng.integers(0, 1000, 8 * model.block_size).tolist() for _ in range(2))
        engine.serve("first", prompt)
        engine.drain()
        engine.serve("other", other)  # fills the 8-page host tier: the first prompt's pages stay on disk only
        engine.drain()
        keys = engine.keys(prompt)
        assert leader.stats()["disk"]["stored"] >= 8
        leader.cost.prefill_tokens_per_s = 1e3
        leader.cost.disk_bytes_per_s = 1e12 if fast_disk else 1.0
        n = leader.lookup("again", keys)
        tiers = [t for t, _, _ in leader._reqs["again"].match]
        if fast_disk:
            assert n == 8 and tiers == ["disk"] * 8
            assert leader.metrics.value("dynkv_cost_tokens_total", choice="load") == 8 * model.block_size
        else:
            assert n == 0 and tiers == []
            assert leader.metrics.value("dynkv_cost_tokens_total", choice="recompute") == 8 * model.block_size
        leader.request_finished("again")
        assert all(leader.index.pins(k, t) == 0 for k in keys for t in ("host", "disk")), "no pin outlives the match"
        out = engine.serve("third", prompt + [1])
        assert out.mismatched == [] and out.load_errors == set()
    finally:
        engine.close()
        leader.close()


def test_no_cost_model_without_a_disk_tier_or_when_off(tmp_path) -> None:
    model = Model()
    for cfg in ({}, {"disk_gb": 0.01, "disk_paths": [str(tmp_path / "d")], "disk_direct_io": False,
                     "cost_model": False}):
        leader = make_leader(model, **cfg)
        try:
            assert leader.cost is None
            leader.step_begin(1000)
            leader.step_end()
        finally:
            leader.close()


def test_a_load_waiting_behind_others_gives_up_past_the_recompute_time() -> None:
    clock = Clock()
    c = model_with(clock)
    c.prefill_tokens_per_s, c.disk_bytes_per_s = 10_000.0, 100 * MiB  # 1 page (16 tokens) = 1.6 ms to recompute
    assert c.gives_up(1) is None, "an unknown job"
    c.disk_submitted(1, 100 * MiB, tokens=50 * 16, page_bytes=2 * MiB)  # 1 s of reads, 80 ms to recompute
    c.disk_submitted(2, 2 * MiB, tokens=16 * 16, page_bytes=2 * MiB)  # 1 page of 16 blocks' worth behind it
    first, second = c.gives_up(1), c.gives_up(2)
    assert first is not None and not first.load and first.disk_pages == 50
    assert first.load_s == pytest.approx(1.0) and first.recompute_s == pytest.approx(0.08)
    assert second is not None and not second.load and second.load_s == pytest.approx(1.02), "queued behind job 1"
    c.disk_read(1, 100 * MiB, cancelled=True)  # job 1 gave up before its reads started
    assert c.queue_bytes == 2 * MiB
    second = c.gives_up(2)
    assert second is not None and second.load, "with nothing ahead, 20 ms of reading beats 25.6 ms of recompute"
    assert second.load_s == pytest.approx(0.02) and second.recompute_s == pytest.approx(0.0256)
    clock.t += 0.03  # waited longer than the whole load's recompute time: the disk is slower than measured
    late = c.gives_up(2)
    assert late is not None and not late.load
    c.disk_done(1)
    assert c.disk_bytes_per_s == 100 * MiB, "a load that read nothing says nothing of the disk's bandwidth"


def test_partly_read_loads_weigh_what_is_left() -> None:
    clock = Clock()
    c = model_with(clock)
    c.prefill_tokens_per_s, c.disk_bytes_per_s = 1000.0, 10 * MiB
    c.disk_submitted(1, 10 * MiB, tokens=1000, page_bytes=1 * MiB)  # 1 s to read, 1 s to recompute
    d = c.gives_up(1)
    assert d is not None and d.load and d.disk_pages == 10
    clock.t += 0.5
    c.disk_read(1, 6 * MiB)
    d = c.gives_up(1)
    # The 6 MiB read in 0.5 s is a bandwidth sample, added to the estimate set at 10 MiB/s.
    bw = fold(set_to(10 * MiB), (6 * MiB, 0.5))
    assert 10 * MiB < bw < 12 * MiB
    assert d is not None and d.load and d.disk_pages == 4 and d.load_s == pytest.approx(4 * MiB / bw)
    assert d.recompute_s == pytest.approx(0.4) and c.queue_bytes == 4 * MiB
    clock.t += 0.25
    c.disk_read(1, 4 * MiB)
    c.disk_done(1)
    # Two samples, one per read: 6 MiB in 0.5 s, then 4 MiB in 0.25 s.
    assert c.queue_bytes == 0 and c.disk_bytes_per_s == pytest.approx(
        fold(set_to(10 * MiB), (6 * MiB, 0.5), (4 * MiB, 0.25)))
    c.disk_submitted(3, 4 * MiB)  # no tokens given: never given up
    assert c.gives_up(3) == Decision(True, 0)
    c.prefill_tokens_per_s = None
    c.disk_submitted(4, 4 * MiB, tokens=16, page_bytes=MiB)
    assert c.gives_up(4).load, "no prefill rate yet: wait, as without a model"


def test_loads_that_wait_too_long_give_up_cancel_queued_reads_and_keep_running_ones(
        rng: np.random.Generator, tmp_path, monkeypatch) -> None:
    """Two disk hits on one I/O thread: the first one's reads run (held at a gate), the second's queue behind.

    On a simulated clock both wait past their recompute time: both go out at
    once with their disk blocks to recompute; the queued reads are never
    made, the running ones land in the host tier for the next request.
    """
    import threading

    import dynkv.tiers.disk as disk_mod

    model = Model()
    leader = make_leader(model, host_pages=8, disk_gb=0.01, disk_paths=[str(tmp_path / "d")], disk_direct_io=False,
                         disk_admit_min_hits=0, io_threads=1)
    engine = Engine(leader, model, tp=1, num_blocks=64, processes=False)
    clock = Clock()
    try:
        a, b = (rng.integers(0, 1000, 4 * model.block_size).tolist() for _ in range(2))
        for name, prompt in (("a", a), ("b", b), ("filler", rng.integers(0, 1000, 8 * model.block_size).tolist())):
            engine.serve(name, prompt)
            engine.drain()
        keys_a, keys_b = engine.keys(a), engine.keys(b)
        assert not any(leader.index.holds(k, "host") for k in keys_a + keys_b), "the filler pushed both off the host"
        leader.cost = CostModel(clock=clock)
        leader.cost.prefill_tokens_per_s, leader.cost.disk_bytes_per_s = 1000.0, 1e12  # the model admits both
        gate, entered = threading.Event(), threading.Event()
        read_records = disk_mod._C.read_records

        def held(*args):
            entered.set()
            assert gate.wait(30)
            return read_records(*args)

        monkeypatch.setattr(disk_mod._C, "read_records", held)
        read0 = leader.disk.stats().get("pages_read", 0)
        assert leader.lookup("a2", keys_a) == 4
        leader.begin_load("a2", [40, 41, 42, 43])
        assert entered.wait(30), "a2's reads are running"
        assert leader.lookup("b2", keys_b) == 4
        leader.begin_load("b2", [50, 51, 52, 53])
        assert leader.build_plan().loads == [], "both wait for their reads"
        clock.t += 1.0  # past 4 blocks' recompute time at 1000 tokens/s
        plan = leader.build_plan()
        ops = {op.req_id: op for op in plan.loads}
        assert sorted(ops) == ["a2", "b2"] and all(op.block_ids == () for op in ops.values())
        assert sorted(ops["a2"].failed) == [40, 41, 42, 43] and sorted(ops["b2"].failed) == [50, 51, 52, 53]
        assert leader.metrics.value("dynkv_cost_tokens_total", choice="gave_up") == 8 * model.block_size
        leader.update(WorkerReport(done={op.job: 1 for op in plan.loads}))
        for r in ("a2", "b2"):
            leader.request_finished(r)
        assert not leader.idle(), "a2's reads are still running"
        gate.set()
        engine.drain()
        leader.disk._pool.submit(lambda: None).result(30)  # one I/O thread: whatever was queued has run
        assert leader.disk.stats().get("pages_read", 0) - read0 == 4, "b2's queued reads were never made"
        assert leader.metrics.value("dynkv_disk_reads_given_up_total", state="landed") == 4
        assert leader.metrics.value("dynkv_disk_reads_given_up_total", state="cancelled") == 4
        assert all(leader.index.holds(k, "host") and leader.index.pins(k, "host") == 0 for k in keys_a)
        assert not any(leader.index.holds(k, "host") for k in keys_b)
        assert all(leader.index.holds(k, "disk") and leader.index.pins(k, "disk") == 0 for k in keys_b)
        assert leader.cost.queue_bytes == 0 and leader.stats()["host"]["pending"] == 0
        out = engine.serve("a3", a + [1])  # the next turn: a's pages from the host tier, exact
        assert out.loaded == 4 and out.mismatched == [] and out.load_errors == set()
    finally:
        gate.set()
        engine.close()
        leader.close()


def test_an_aborted_request_cancels_its_queued_disk_reads(rng: np.random.Generator, tmp_path, monkeypatch) -> None:
    import threading

    model = Model()
    leader = make_leader(model, host_pages=8, disk_gb=0.01, disk_paths=[str(tmp_path / "d")], disk_direct_io=False,
                         disk_admit_min_hits=0, io_threads=1, cost_model=False)
    engine = Engine(leader, model, tp=1, num_blocks=64, processes=False)
    gate = threading.Event()
    try:
        a = rng.integers(0, 1000, 4 * model.block_size).tolist()
        for name, prompt in (("a", a), ("filler", rng.integers(0, 1000, 8 * model.block_size).tolist())):
            engine.serve(name, prompt)
            engine.drain()
        leader.disk._pool.submit(gate.wait, 30)  # the I/O thread is busy: a2's reads queue
        read0 = leader.disk.stats().get("pages_read", 0)
        keys = engine.keys(a)
        assert leader.lookup("a2", keys) == 4
        leader.begin_load("a2", [40, 41, 42, 43])
        assert not leader.request_finished("a2")  # aborted while its reads wait
        plan = leader.build_plan()
        assert [(op.req_id, op.block_ids) for op in plan.loads] == [("a2", ())], "an empty op frees its blocks"
        leader.update(WorkerReport(done={plan.loads[0].job: 1}))
        gate.set()
        engine.drain()
        leader.disk._pool.submit(lambda: None).result(30)  # one I/O thread: whatever was queued has run
        assert leader.disk.stats().get("pages_read", 0) == read0, "no read made for an aborted request"
        assert leader.metrics.value("dynkv_disk_reads_given_up_total", state="cancelled") == 4
        assert all(leader.index.pins(k, t) == 0 for k in keys for t in ("host", "disk"))
        assert leader.stats()["host"]["pending"] == 0
    finally:
        gate.set()
        engine.close()
        leader.close()


def test_a_load_gives_up_at_the_first_check_that_predicts_it_lands_past_its_deadline() -> None:
    """A load behind a stalled one: admitted at 0.6 s of reads against 1 s of recompute, checked every 125 ms.

    It gives up at the first check where now + 0.6 s passes its deadline (at
    0.5 s waited), not before, and not only once it has waited the whole
    recompute time (at 1.125 s) as a wait-and-see rule would.
    """
    clock = Clock()
    c = model_with(clock)
    c.prefill_tokens_per_s, c.disk_bytes_per_s = 1000.0, 100 * MiB
    c.disk_submitted(1, 50 * MiB)  # another load's reads, ahead; never given up itself (no tokens)
    d = c.disk_pays(10, MiB, 100)
    assert d.load and d.load_s == pytest.approx(0.6) and d.recompute_s == pytest.approx(1.0)
    c.disk_submitted(2, 10 * MiB, tokens=1000, page_bytes=MiB)
    decisions = []
    for _ in range(6):
        d = c.gives_up(2)
        assert d is not None and d.load_s == pytest.approx(0.6) and d.recompute_s == pytest.approx(1.0)
        decisions.append(d.load)
        clock.t += 0.125  # the disk stalls: nothing is read
    assert decisions == [True, True, True, True, False, False]


def test_writes_running_on_the_disk_count_ahead_of_reads() -> None:
    clock = Clock()
    running = [0]
    c = CostModel(clock=clock, writes_ahead=lambda: running[0])
    c.prefill_tokens_per_s, c.disk_bytes_per_s = 1000.0, 100 * MiB
    assert c.disk_pays(10, MiB, 100).load_s == pytest.approx(0.1)
    running[0] = 40 * MiB  # four 10 MiB writes on the device
    d = c.disk_pays(10, MiB, 100)
    assert d.load and d.load_s == pytest.approx(0.5)
    c.disk_submitted(1, 10 * MiB, tokens=1000, page_bytes=MiB)
    assert c.gives_up(1).load_s == pytest.approx(0.5)
    running[0] = 100 * MiB  # more than a second of writes ahead: it would land after recomputing would
    assert not c.gives_up(1).load
    assert not c.disk_pays(10, MiB, 100).load


def test_a_load_that_lands_in_time_is_never_given_up() -> None:
    """Behind another load, 0.9 s of reads against 1 s of recompute; the disk keeps the measured pace."""
    clock = Clock()
    c = model_with(clock)
    c.prefill_tokens_per_s, c.disk_bytes_per_s = 1000.0, 100 * MiB
    c.disk_submitted(1, 80 * MiB, tokens=8000, page_bytes=MiB)
    c.disk_submitted(2, 10 * MiB, tokens=1000, page_bytes=MiB)
    for job, pages in ((1, 80), (2, 10)):
        for _ in range(pages):
            for j in (1, 2):
                d = c.gives_up(j)
                assert d is None or d.load, (j, clock.t, d)
            clock.t += 0.01
            c.disk_read(job, MiB)
        c.disk_done(job)
    assert clock.t == pytest.approx(100.9) and c.queue_bytes == 0
    assert c.disk_bytes_per_s == pytest.approx(100 * MiB)


def test_the_leader_gives_a_load_up_as_soon_as_it_would_land_past_its_deadline(
        rng: np.random.Generator, tmp_path, monkeypatch) -> None:
    """Two disk hits of 4 pages on one I/O thread, a2's reads running (held), b2's queued behind them.

    At the measured rates a2 needs 0.225 of its recompute time R to read,
    b2 0.45 (it waits for a2's reads too): both are admitted. The disk then
    stalls; the leader is called every R/8. b2 goes out (its blocks to
    recompute, its reads cancelled) at the first call past 0.55 R waited
    (5R/8), a2 at the first past 0.775 R (7R/8): each before the recompute
    time has passed, where waiting it out would have sent both at 9R/8.
    """
    import threading

    import dynkv.tiers.disk as disk_mod

    model = Model()
    leader = make_leader(model, host_pages=8, disk_gb=0.01, disk_paths=[str(tmp_path / "d")], disk_direct_io=False,
                         disk_admit_min_hits=0, io_threads=1)
    engine = Engine(leader, model, tp=1, num_blocks=64, processes=False)
    clock = Clock()
    gate = threading.Event()
    try:
        a, b = (rng.integers(0, 1000, 4 * model.block_size).tolist() for _ in range(2))
        for name, prompt in (("a", a), ("b", b), ("filler", rng.integers(0, 1000, 8 * model.block_size).tolist())):
            engine.serve(name, prompt)
            engine.drain()
        keys_a, keys_b = engine.keys(a), engine.keys(b)
        assert not any(leader.index.holds(k, "host") for k in keys_a + keys_b)
        rate, page = 1000.0, leader.geometry.page_bytes
        R = 4 * model.block_size / rate
        leader.cost = CostModel(clock=clock)
        leader.cost.prefill_tokens_per_s, leader.cost.disk_bytes_per_s = rate, 8 * page / (0.45 * R)
        entered = threading.Event()
        read_records = disk_mod._C.read_records

        def held(*args):
            entered.set()
            assert gate.wait(30)
            return read_records(*args)

        monkeypatch.setattr(disk_mod._C, "read_records", held)
        assert leader.lookup("a2", keys_a) == 4
        leader.begin_load("a2", [40, 41, 42, 43])
        assert entered.wait(30)
        assert leader.lookup("b2", keys_b) == 4
        leader.begin_load("b2", [50, 51, 52, 53])
        out = {}
        for k in range(1, 9):
            clock.t += R / 8
            for op in leader.build_plan().loads:
                out[op.req_id] = (k, sorted(op.failed), op.block_ids)
                leader.update(WorkerReport(done={op.job: 1}))
        assert out == {"b2": (5, [50, 51, 52, 53], ()), "a2": (7, [40, 41, 42, 43], ())}
        assert leader.metrics.value("dynkv_cost_tokens_total", choice="gave_up") == 8 * model.block_size
        for r in ("a2", "b2"):
            leader.request_finished(r)
        gate.set()
        engine.drain()
        leader.disk._pool.submit(lambda: None).result(30)
        assert leader.metrics.value("dynkv_disk_reads_given_up_total", state="landed") == 4
        assert leader.metrics.value("dynkv_disk_reads_given_up_total", state="cancelled") == 4
        assert leader.cost.queue_bytes == 0 and leader.stats()["host"]["pending"] == 0
        out3 = engine.serve("a3", a + [1])  # a's pages landed in the host tier while a2 recomputed
        assert out3.loaded == 4 and out3.mismatched == [] and out3.load_errors == set()
    finally:
        gate.set()
        engine.close()
        leader.close()


def test_the_leader_s_cost_model_counts_the_disk_writes_running(tmp_path) -> None:
    import threading

    model = Model()
    leader = make_leader(model, disk_gb=0.01, disk_paths=[str(tmp_path / "d")], disk_direct_io=False, io_threads=1)
    gate, entered = threading.Event(), threading.Event()

    def write() -> None:
        entered.set()
        assert gate.wait(30)

    try:
        assert leader.cost is not None and leader.cost.writes_ahead() == 0
        running = leader.disk._pool.submit_write(12345, write)
        assert entered.wait(30)
        queued = leader.disk._pool.submit_write(999, lambda: None)
        assert leader.cost.writes_ahead() == 12345, "running writes count, queued ones do not (reads overtake them)"
        gate.set()
        running.result(30)
        queued.result(30)
        assert leader.cost.writes_ahead() == 0
    finally:
        gate.set()
        leader.close()


# -- probes: an estimate that refuses is measured again (see dynkv.policy.cost) ---------------------------------

def slow_model(clock: Clock, **kw: object) -> CostModel:
    """A model whose one bandwidth sample was slow: 10 MiB read in 10 s, 1 MiB/s; the engine prefills 1000
    tokens/s. A match of 8 pages (1 MiB, 100 tokens each) would read for 8 s against 0.8 s to recompute."""
    c = CostModel(clock=clock, probe_every_s=5.0, probe_pages=2, **kw)
    c.prefill_tokens_per_s = 1000.0
    c.disk_submitted(1, 10 * MiB)
    clock.t += 10
    c.disk_done(1)
    assert c.disk_bytes_per_s == pytest.approx(MiB)
    return c


def probe_once(c: CostModel, clock: Clock, seconds: float, *, job: int = 2) -> None:
    """A probe of 2 pages that is read in ``seconds``."""
    d = c.disk_pays(8, MiB, 100)
    assert d.load and d.probe and d.disk_pages == 2, d
    c.disk_submitted(job, 2 * MiB, tokens=200, page_bytes=MiB, probe=True)
    clock.t += seconds
    c.disk_done(job)


def test_a_slow_estimate_refuses_until_it_is_a_probe_interval_old_then_lets_one_probe_through() -> None:
    clock = Clock()
    c = slow_model(clock)
    d = c.disk_pays(8, MiB, 100)
    assert not d.load and not d.probe and d.disk_pages == 8
    assert d.load_s == pytest.approx(8.0) and d.recompute_s == pytest.approx(0.8)
    clock.t += 4.9
    assert not c.disk_pays(8, MiB, 100).load, "the estimate is not old enough yet"
    clock.t += 0.1
    d = c.disk_pays(8, MiB, 100)
    assert d == Decision(True, 2, pytest.approx(8.0), pytest.approx(0.8), probe=True), "the first 2 pages only"
    assert not c.disk_pays(8, MiB, 100).load, "one probe per interval"
    # A probe that was let through but never read (its request went elsewhere): the next one waits an interval.
    clock.t += 4.9
    assert not c.disk_pays(8, MiB, 100).load
    clock.t += 0.1
    assert c.disk_pays(8, MiB, 100).probe


def test_a_fast_probe_replaces_the_estimate_and_full_matches_load_again() -> None:
    clock = Clock()
    c = slow_model(clock)
    clock.t += 5
    probe_once(c, clock, 0.01)  # 2 MiB in 10 ms: 200 MiB/s
    # Replaced, not added to the sums (that would be (1 MiB/s x 10 s x e^-0.01 + 2 MiB) / (10 s x e^-0.01 +
    # 0.01 s), about 1.2 MiB/s, still refusing 8 pages).
    assert c.disk_bytes_per_s == pytest.approx(200 * MiB)
    d = c.disk_pays(8, MiB, 100)
    assert d.load and not d.probe and d.disk_pages == 8 and d.load_s == pytest.approx(0.04)
    # Later samples add to the probe's sums as before.
    c.disk_submitted(3, 4 * MiB)
    clock.t += 0.04
    c.disk_done(3)
    assert c.disk_bytes_per_s == pytest.approx(fold((2 * MiB, 0.01), (4 * MiB, 0.04)))


def test_a_slow_probe_keeps_refusing_and_the_next_probe_waits_another_interval() -> None:
    clock = Clock()
    c = slow_model(clock)
    clock.t += 7
    probe_once(c, clock, 4.0)  # 2 MiB in 4 s: 0.5 MiB/s, slower still
    assert c.disk_bytes_per_s == pytest.approx(0.5 * MiB)
    clock.t += 4.9  # counted from the probe's sample, not from the estimate before it
    d = c.disk_pays(8, MiB, 100)
    assert not d.load and not d.probe and d.load_s == pytest.approx(16.0)
    clock.t += 0.1
    probe_once(c, clock, 0.02, job=3)  # the tier is fast again: 100 MiB/s
    assert c.disk_pays(8, MiB, 100).load


def test_no_probe_while_reads_are_in_flight() -> None:
    """Reads under way measure the tier themselves; a stale estimate with a load in flight is not probed."""
    clock = Clock()
    c = slow_model(clock)
    clock.t += 60
    c.disk_submitted(5, 4 * MiB)  # (a load admitted before the slow sample, say)
    assert not c.disk_pays(8, MiB, 100).load
    c.disk_read(5, 4 * MiB, cancelled=True)
    c.disk_done(5)
    assert c.disk_pays(8, MiB, 100).probe


def test_a_request_that_probes_and_asks_again_stays_the_probe() -> None:
    clock = Clock()
    c = slow_model(clock)
    clock.t += 5
    assert c.disk_pays(8, MiB, 100).probe
    assert not c.disk_pays(8, MiB, 100).load, "another request: no second probe"
    again = c.disk_pays(8, MiB, 100, probing=True)  # vLLM looks the same request up again
    assert again.load and again.probe and again.disk_pages == 2
    c.disk_bytes_per_s = 1000 * MiB  # measured fast meanwhile: the repeated lookup takes the whole match
    again = c.disk_pays(8, MiB, 100, probing=True)
    assert again.load and not again.probe and again.disk_pages == 8


def test_a_probe_gives_up_only_past_its_deadline_not_on_the_estimate_it_tests() -> None:
    clock = Clock()
    c = slow_model(clock)
    clock.t += 5
    assert c.disk_pays(8, MiB, 100).probe
    c.disk_submitted(2, 2 * MiB, tokens=200, page_bytes=MiB, probe=True)  # 0.2 s to recompute
    c.disk_submitted(3, 2 * MiB, tokens=200, page_bytes=MiB)  # the same, not a probe (behind the probe)
    plain = c.gives_up(3)
    assert plain is not None and not plain.load, "at 1 MiB/s 4 MiB take 4 s: an ordinary load gives up at once"
    d = c.gives_up(2)
    assert d is not None and d.load and d.load_s == 0.0
    clock.t += 0.2
    assert c.gives_up(2).load, "at its deadline, not past it"
    clock.t += 0.01
    assert not c.gives_up(2).load, "past its deadline"
    c.disk_read(2, 2 * MiB, cancelled=True)  # given up before its reads started: it measured nothing
    c.disk_done(2)
    c.disk_read(3, 2 * MiB, cancelled=True)
    c.disk_done(3)
    assert c.disk_bytes_per_s == pytest.approx(MiB)
    c.disk_submitted(4, 4 * MiB)  # the next ordinary sample adds to the estimate's sums: no probe is pending
    clock.t += 1
    c.disk_done(4)
    assert c.disk_bytes_per_s == pytest.approx(fold((10 * MiB, 10.0), (4 * MiB, 1.0)))


def test_probe_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="probe_every_s"):
        CostModel(probe_every_s=0)
    with pytest.raises(ValueError, match="probe_pages"):
        CostModel(probe_pages=0)


class OffsetClock:
    """``time.perf_counter`` plus a simulated advance: the I/O threads' completion times (perf_counter, patched to
    this clock) and the model's clock agree, and a probe interval passes without waiting for it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.perf_counter() + self.offset


def test_the_leader_probes_a_refused_disk_and_a_fast_probe_brings_full_matches_back(
        rng: np.random.Generator, tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    import dynkv.leader.tier_flow as tier_flow

    model = Model()
    leader = make_leader(model, host_pages=8, disk_gb=0.01, disk_paths=[str(tmp_path / "d")], disk_direct_io=False,
                         disk_admit_min_hits=0)
    engine = Engine(leader, model, tp=1, num_blocks=64, processes=False)
    clock = OffsetClock()
    monkeypatch.setattr(tier_flow, "time", SimpleNamespace(perf_counter=clock))
    try:
        a, b, filler = (rng.integers(0, 1000, 8 * model.block_size).tolist() for _ in range(3))
        for name, prompt in (("a", a), ("b", b), ("filler", filler)):
            engine.serve(name, prompt)
            engine.drain()
        keys_a, keys_b = engine.keys(a), engine.keys(b)
        assert not any(leader.index.holds(k, "host") for k in keys_a + keys_b)
        assert all(leader.index.holds(k, "disk") for k in keys_a + keys_b)
        tokens = 8 * model.block_size
        leader.cost = c = CostModel(clock=clock, probe_every_s=5.0, probe_pages=2)
        # As if one slow window had just been measured: 8 pages would take hours, recomputing them 3.2 s.
        c.prefill_tokens_per_s, c.disk_bytes_per_s = 10.0, 1.0
        assert leader.lookup("refused", keys_a) == 0
        leader.request_finished("refused")
        assert leader.metrics.value("dynkv_cost_tokens_total", choice="recompute") == tokens
        clock.offset += 5.0  # the estimate is a probe interval old: the next match is a probe of its first 2 pages
        assert leader.lookup("probe", keys_a) == 2
        assert leader.lookup("other", keys_a) == 0, "one probe per interval"
        leader.request_finished("other")
        out = engine.serve("probe", a)  # vLLM asks again for the same request: it stays the probe
        engine.drain()
        assert out.loaded == 2 and out.mismatched == [] and out.load_errors == set()
        assert leader.metrics.value("dynkv_cost_tokens_total", choice="probe") == 2 * 2 * model.block_size
        assert leader.metrics.value("dynkv_cost_tokens_total", choice="recompute") == 2 * tokens + 2 * 6 * model.block_size
        assert leader.metrics.value("dynkv_cost_tokens_total", choice="load") == 0
        # The probe's read replaced the estimate: b's whole match loads, exact.
        assert c.disk_bytes_per_s > 8 * leader.geometry.page_bytes / 3.2, c.disk_bytes_per_s
        out = engine.serve("b2", b)
        assert out.loaded == 8 and out.mismatched == [] and out.load_errors == set()
        assert leader.metrics.value("dynkv_cost_tokens_total", choice="load") == tokens
        assert leader.metrics.value("dynkv_cost_tokens_total", choice="probe") == 2 * 2 * model.block_size
    finally:
        engine.close()
        leader.close()


@pytest.mark.parametrize("threads,chunk_pages", [(1, 1), (4, 8), (16, 1), (16, 8)])
def test_reads_side_by_side_that_finish_in_bursts_measure_the_disk_not_the_bursts(
        rng: np.random.Generator, threads: int, chunk_pages: int) -> None:
    """A disk of 1.5 GB/s shared by ``threads`` reads of ``chunk_pages`` pages each (every page of a chunk
    completes with it); 200 loads of 64 pages queued at once, completions reported in order with their time.
    Averaging per-window ratios read 3.3-3.7 GB/s here (windows close on one page after a long wait, the next
    takes a burst in milliseconds)."""
    page, disk_bps = 2 * MiB, 1.5e9
    clock = Clock()
    c = CostModel(clock=clock)
    loads = {job: 64 for job in range(200)}
    for job, pages in loads.items():
        c.disk_submitted(job, pages * page, tokens=16 * pages, page_bytes=page)
    work = [(job, chunk_pages) for job, pages in loads.items() for _ in range(pages // chunk_pages)]
    active: list[list] = []  # [bytes left, job, pages]
    now, done = clock.t, []
    while work or active:
        while len(active) < threads and work:
            job, n = work.pop(0)
            active.append([n * page * rng.uniform(0.9, 1.1), job, n])
        rate = disk_bps / len(active)  # the disk's bandwidth shared by the reads running
        dt = min(a[0] for a in active) / rate
        now += dt
        for a in active:
            a[0] -= rate * dt
        done += [(now, a[1], a[2]) for a in active if a[0] <= 1e-6]
        active = [a for a in active if a[0] > 1e-6]
    for when, job, n in done:
        clock.t = when + 0.001  # collected a little later than it happened
        for _ in range(n):
            c.disk_read(job, page, at=when)
        loads[job] -= n
        if not loads[job]:
            c.disk_done(job, at=when)
    assert c.disk_bytes_per_s == pytest.approx(disk_bps, rel=0.2)
