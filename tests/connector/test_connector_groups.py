"""The connector on models of several KV-cache groups (vLLM's hybrid manager) and sliding-window models.

Built with stand-ins for vLLM's config (a sliding-window group and a
full-attention group over the same two KV tensors) around a real leader:
each group's pages under its own keys, sliding-window blocks that left the
window never stored, the window's blocks only loaded, and the refusals
(Mamba state, disaggregated roles, pipeline parallelism) naming what is
refused. End-to-end runs in real vLLM are in ``tests/e2e/test_hybrid_vllm.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from connector_stubs import BS, FakeRequest, blocks, complete, fake_config, step, tokens
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from dynkv.connector import DynKVConnector
from dynkv.connector.engine import kv_groups, model_geometry

WINDOW = 64  # tokens: with 32-token blocks, a sliding group holds the two blocks before the next token


@pytest.fixture
def conn() -> Any:
    vllm_config, kcc = fake_config({"host_pages": 64}, windows=(WINDOW, None))
    c = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    yield c
    c.shutdown()


class MambaSpec(SimpleNamespace):
    """Named as vLLM's: recurrent state, no head size."""


def test_groups_share_one_page_geometry_and_have_their_own_tags() -> None:
    vllm_config, kcc = fake_config(windows=(WINDOW, None))
    geometry, _ = model_geometry(vllm_config, kcc)
    assert geometry.num_layers == 2  # the groups' tensors overlay: a page holds one group's two layers
    groups = kv_groups(vllm_config, kcc)
    assert groups.windows == (WINDOW, None) and groups.count == 2 and groups.sliding
    assert len(set(groups.tags)) == 2
    assert kv_groups(*fake_config()).plain


def test_state_without_attention_kv_is_refused_naming_the_model() -> None:
    vllm_config, kcc = fake_config(windows=(None, None))
    kcc.kv_cache_groups[1].kv_cache_spec = MambaSpec(block_size=BS, state_dim=16)
    vllm_config.model_config.hf_config = SimpleNamespace(architectures=["FooMambaForCausalLM"], model_type="foo")
    with pytest.raises(ValueError, match=r"FooMambaForCausalLM \(model_type 'foo'\) keeps MambaSpec in KV-cache "
                                         r"group 1 .*not Mamba"):
        model_geometry(vllm_config, kcc)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 is not supported"):
        model_geometry(*fake_config(pp=2, windows=(WINDOW, None)))
    vllm_config, kcc = fake_config(windows=(WINDOW, None))
    vllm_config.kv_transfer_config.kv_role = "kv_producer"
    with pytest.raises(ValueError, match="kv_role 'kv_producer' .* not supported for models with sliding-window"):
        DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)


def test_each_group_stores_and_loads_its_own_pages(conn: Any, rng: np.random.Generator) -> None:
    shared = tokens(rng, 5 * BS)
    a = FakeRequest("a", shared + tokens(rng, 10))
    conn.on_new_request(a)
    assert conn.get_num_new_matched_tokens(a, 0) == (0, False)
    sliding_a, full_a = [1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15, 16]
    meta = conn.build_connector_meta(step(new={"a": (sliding_a, full_a)}, scheduled={"a": a.num_tokens}))
    (store,) = meta.plan.stores
    assert meta.settle  # workers finish stores before vLLM hands a freed sliding block to another request
    assert sorted(store.block_ids) == sorted(sliding_a[:5] + full_a[:5])
    stored_in = dict(zip(store.block_ids, store.slots))
    complete(conn, meta)
    assert conn.leader.stats()["host"]["stored"] == 10  # five blocks, two groups: ten keys

    b = FakeRequest("b", shared + tokens(rng, 40))
    conn.on_new_request(b)
    # Several groups: hits load asynchronously (vLLM takes only request-level failures from such models).
    assert conn.get_num_new_matched_tokens(b, 0) == (5 * BS, True)
    # vLLM holds the sliding group's blocks of the window only: the null block (0) before it.
    sliding_b, full_b = [0, 0, 0, 24, 25, 26, 27], [31, 32, 33, 34, 35, 36, 37]
    conn.update_state_after_alloc(b, blocks(sliding_b, full_b), 5 * BS)
    assert conn.leader.stats()["host"]["pinned"] == 7  # the five full-attention pages and the window's two
    meta = conn.build_connector_meta(step())
    (load,) = meta.plan.loads
    loaded = dict(zip(load.block_ids, load.slots))
    # Each block gets the page its own group stored at that position.
    assert loaded == {**{f: stored_in[e] for f, e in zip(full_b[:5], full_a[:5])},
                      24: stored_in[4], 25: stored_in[5]}
    complete(conn, meta)
    assert conn.leader.stats()["host"]["pinned"] == 0


def test_a_hit_needs_every_groups_page_of_each_block(conn: Any, rng: np.random.Generator) -> None:
    prompt = tokens(rng, 4 * BS + 5)
    a = FakeRequest("a", prompt)
    conn.on_new_request(a)
    conn.get_num_new_matched_tokens(a, 0)
    meta = conn.build_connector_meta(step(new={"a": ([1, 2, 3, 4, 5], [11, 12, 13, 14, 15])},
                                          scheduled={"a": a.num_tokens}))
    complete(conn, meta)
    sliding_keys = conn._page_keys(conn._reqs["a"], 4)[0::2]
    conn.leader.index.remove("host", [sliding_keys[2]])  # the sliding group's page of block 2 is gone
    b = FakeRequest("b", prompt + [7])
    conn.on_new_request(b)
    assert conn.get_num_new_matched_tokens(b, 0) == (2 * BS, True)


def test_sliding_blocks_that_left_the_window_are_not_stored(conn: Any, rng: np.random.Generator) -> None:
    """Blocks before the window may already be another request's: only the full group's are stored."""
    prompt = tokens(rng, 6 * BS + 8)
    a = FakeRequest("a", prompt)
    conn.on_new_request(a)
    conn.get_num_new_matched_tokens(a, 5 * BS)  # vLLM's own prefix cache holds five blocks
    a.num_computed_tokens = 5 * BS
    sliding, full = [1, 2, 3, 4, 5, 6, 7], [11, 12, 13, 14, 15, 16, 17]
    meta = conn.build_connector_meta(step(new={"a": (sliding, full)}, scheduled={"a": a.num_tokens - 5 * BS}))
    (store,) = meta.plan.stores
    # The window after 160 tokens reaches back 63 tokens: sliding blocks 3 and later (ids 4, 5, 6).
    assert sorted(store.block_ids) == [4, 5, 6, *full[:6]]
