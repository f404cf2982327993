"""A worker's side of a decode step: launching the stores of a step that fills a block of every running request.

vLLM runs the worker's connector calls on the step's critical path; a decode
step of 32 requests fills (and stores) 32 blocks at once. ``one launch`` is
the worker's path (one copy for the step's stores); ``per request`` launches
each request's store alone, as the worker did before. Each round launches
the stores and waits for them, so the copy itself is in the time: small
pages keep it a minor part.
"""

from __future__ import annotations

import pytest
from harness import Engine, Model

from dynkv.config import DynKVConfig
from dynkv.leader import Leader
from dynkv.protocol import StoreOp

RUNNING = 32


def _device(name: str) -> str:
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
    return name


@pytest.mark.parametrize("mode", ["one launch", "per request"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_worker_launches_a_decode_steps_stores(benchmark, device: str, mode: str) -> None:
    model = Model(num_layers=32, num_heads=8, head_size=16, block_size=16, dims="LBNHC", device=_device(device))
    leader = Leader(DynKVConfig.from_dict({"host_pages": 4 * RUNNING}, env={}), model.geometry(),
                    model.fingerprint(), engine_id=f"bench-worker-{device}-{mode.replace(' ', '-')}")
    engine = Engine(leader, model, tp=1, num_blocks=2 * RUNNING, processes=False)
    worker = engine.ranks[0].state.worker
    ops = [StoreOp(job, f"r{job}", (job,), (job,)) for job in range(RUNNING)]
    jobs = iter(range(RUNNING, 10**9))

    def step() -> int:
        batch = [StoreOp(next(jobs), op.req_id, op.block_ids, op.slots) for op in ops]
        if mode == "one launch":
            worker._stores_next = batch
            worker.after_forward()
        else:
            for op in batch:
                worker._launch_stores([op])
        worker.wait()
        report = worker.poll()
        return len(report.done) if not report.failed else -1

    try:
        assert benchmark(step) == RUNNING, "every store of every round done"
        if benchmark.stats:
            benchmark.extra_info["us per store"] = benchmark.stats["median"] / RUNNING * 1e6
    finally:
        engine.close()
        leader.close()
