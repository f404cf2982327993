"""Random interleavings of requests, steps and finishes against the leader and two in-process ranks.

Invariants after every step: no host slot is handed out twice, capacity is
never exceeded, every pin belongs to a load in flight or a lookup not yet
loaded; every block a finished request loaded holds exactly the bytes stored
under its key; once all requests finish and the workers drain, nothing is
pinned or pending.
"""

from __future__ import annotations

import numpy as np
from harness import Engine, Model
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dynkv.config import DynKVConfig
from dynkv.leader import Leader

MODEL = Model(num_layers=2, num_heads=2, head_size=4, block_size=2)
PREFIXES = [np.random.default_rng(i).integers(0, 500, 6 * MODEL.block_size).tolist() for i in range(4)]
HOST_PAGES = 8


class LeaderMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        cfg = DynKVConfig.from_dict({"host_pages": HOST_PAGES}, env={})
        self.leader = Leader(cfg, MODEL.geometry(), MODEL.fingerprint(), world_size=2, engine_id=f"props-{id(self)}")
        self.engine = Engine(self.leader, MODEL, tp=2, num_blocks=48, processes=False)
        self.active: dict[str, tuple[list[int], list[bytes], int]] = {}
        self.n = 0

    @rule(prefix=st.integers(0, len(PREFIXES) - 1), cut=st.integers(1, 6), tail=st.integers(0, 3))
    def begin(self, prefix: int, cut: int, tail: int) -> None:
        tokens = PREFIXES[prefix][: cut * MODEL.block_size] + [prefix + 500] * (tail * MODEL.block_size)
        keys = self.engine.keys(tokens)
        if len(keys) > len(self.engine.free_blocks):
            return
        req = f"q{self.n}"
        self.n += 1
        loaded = self.leader.lookup(req, keys, 0)
        blocks = [self.engine.free_blocks.pop() for _ in keys]
        self.leader.begin_load(req, blocks[:loaded])
        self.leader.store(req, keys[loaded:], blocks[loaded:])
        self.engine.step(writes=list(zip(blocks[loaded:], keys[loaded:])))
        self.active[req] = (blocks, keys, loaded)

    @rule()
    def step(self) -> None:
        self.engine.step()

    @precondition(lambda self: bool(self.active))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(sorted(self.active)))
        blocks, keys, loaded = self.active.pop(req)
        self.engine.step_until(lambda: not loaded or self.engine.recving.get(req, 0) == 2, f"load of {req}")
        self.engine.recving.pop(req, None)
        errors = {b for b in self.engine.errors if b in blocks}
        assert not errors, f"load errors {errors} with no fault injected"
        for rank, r in enumerate(self.engine.ranks):
            bad = r.call("mismatches", list(zip(blocks, keys)))
            where = ["loaded" if blocks.index(b) < loaded else "computed" for b in bad]
            assert bad == [], f"rank {rank}: blocks {bad} ({where}) of {req} differ from their pages"
        self.engine.finish(req, blocks)

    @invariant()
    def index_is_consistent(self) -> None:
        t = self.leader.index._tiers["host"]
        slots = [e.slot for e in t.entries.values()]
        assert len(slots) == len(set(slots)), "a host slot is used twice"
        assert len(slots) + t.slots.num_free == HOST_PAGES
        assert t.num_pinned <= len(slots)
        pinned = sum(e.pins for e in t.entries.values())
        in_use = sum(len(ld.host_keys) for ld in self.leader._inflight.values() if hasattr(ld, "host_keys"))
        in_use += sum(len(ld.host_keys) for ld in self.leader._ready)
        in_use += sum(len(r.match) for r in self.leader._reqs.values())
        assert pinned == in_use, "a pin without a load or lookup holding it"

    def teardown(self) -> None:
        try:
            for req in sorted(self.active):
                self.finish_named(req)
            self.engine.drain()
            s = self.leader.stats()["host"]
            assert s["pinned"] == 0 and s["pending"] == 0
        finally:
            self.engine.close()
            self.leader.close()

    def finish_named(self, req: str) -> None:
        blocks, keys, loaded = self.active.pop(req)
        self.engine.step_until(lambda: not loaded or self.engine.recving.get(req, 0) == 2, f"load of {req}")
        self.engine.finish(req, blocks)


TestLeaderMachine = LeaderMachine.TestCase
TestLeaderMachine.settings = settings(
    max_examples=30, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
