"""Load or recompute (dynkv.policy.cost), on a simulated clock: no timing is asserted on."""

from __future__ import annotations

import numpy as np
import pytest
from harness import Engine, Model, make_leader

from dynkv.policy.cost import MIN_STEP_TOKENS, CostModel

MiB = 1 << 20


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
