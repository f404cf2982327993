"""vLLM 0.33's sleep-mode methods on the worker-side connector (vLLM 0.32 does not call them: driven directly).

The worker's side of it (copies drained, refused, the tiers kept, loads into
the KV cache taken back) is tested in ``tests/worker/test_sleep.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from connector_stubs import BS, LAYERS, fake_config
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from dynkv.connector import DynKVConnector, DynKVMetadata
from dynkv.protocol import LoadOp, StepPlan, StoreOp


def kv_caches(head_size: int = 4) -> dict[str, torch.Tensor]:
    """The two layers' KV tensors of :func:`fake_config`'s model (64 blocks, 2 heads), K and V packed per token."""
    return {name: torch.zeros(64, 2, BS, 2 * head_size, dtype=torch.float16) for name in LAYERS}


@pytest.fixture
def worker_conn(monkeypatch) -> Any:
    import vllm.distributed.parallel_state as ps

    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: 0)
    vllm_config, kcc = fake_config({"host_pages": 16})
    c = DynKVConnector(vllm_config, KVConnectorRole.WORKER, kcc)
    yield c
    c.shutdown()


def test_sleep_unregisters_refuses_and_restores_the_kv_cache(worker_conn: Any) -> None:
    conn = worker_conn
    assert conn.supports_sleep_mode() is True
    caches = kv_caches()
    conn.register_kv_caches(caches)
    first = conn.worker.view
    conn.unregister_kv_caches()
    assert conn.worker.asleep and conn.worker.view is None and conn.worker.copy_paths is None

    # A step planned while asleep: the load's blocks come back as load errors (vLLM recomputes them).
    plan = StepPlan(loads=[LoadOp(1, "r", (3, 4), (0, 1))], stores=[StoreOp(2, "s", (5,), (2,))])
    conn.bind_connector_metadata(DynKVMetadata(plan, early=True))
    conn.handle_preemptions(conn._connector_metadata)
    conn.start_load_kv(object())
    conn.wait_for_save()
    assert conn.get_block_ids_with_load_errors() == {3, 4}
    assert conn.get_finished(set()) == (None, {"r"})
    report = conn.worker.poll()
    assert report.failed == {1: 1, 2: 1} and not report.done

    conn.restore_kv_caches()  # no tensors given: the ones registered before, their addresses read again
    assert not conn.worker.asleep
    assert conn.worker.view is not first and [t.data_ptr() for t in conn.worker.view.tensors] == \
        [t.data_ptr() for t in first.tensors]
    conn.unregister_kv_caches()
    fresh = kv_caches()
    conn.restore_kv_caches(fresh)  # new tensors after wake-up
    assert [t.data_ptr() for t in conn.worker.view.tensors] == [fresh[n].data_ptr() for n in LAYERS]

    conn.unregister_kv_caches()
    with pytest.raises(ValueError, match="page geometry"):
        conn.restore_kv_caches(kv_caches(head_size=8))
    assert conn.worker.asleep  # still: nothing was registered


def test_scheduler_side_sleep_methods_do_nothing() -> None:
    vllm_config, kcc = fake_config({"host_pages": 16})
    c = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    try:
        c.unregister_kv_caches()
        c.restore_kv_caches()
        assert c.leader.stats()["host"]["capacity"] == 16
    finally:
        c.shutdown()
