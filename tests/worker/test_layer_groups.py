"""The layer groups of a layer-wise load on each copy path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvtensors import SHAPES, make_pages, make_rank_kv

import dynkv
import dynkv.worker.staging as staging
from dynkv.worker.staging import STAGED_GROUP_RUN, STAGED_MIN_GROUPS, CopyPaths


def _view(rng: np.random.Generator, num_layers: int):
    kv = make_rank_kv(rng, SHAPES[0], dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 4), num_blocks=2,
                      num_layers=num_layers)
    return kv.view(num_heads_total=4)


@pytest.mark.parametrize("num_layers", [1, 3, 8, 32, 64, 80])
def test_layer_groups_cover_every_layer_once_in_order(rng: np.random.Generator, num_layers: int) -> None:
    view = _view(rng, num_layers)
    tile = view.geometry.tile_bytes  # 5 KiB: seven layers make a 32 KiB run
    assert -(-STAGED_GROUP_RUN // tile) == 7
    kernel = CopyPaths(view, h2d="kernel").layer_groups()
    assert kernel == [(i, i + 1) for i in range(num_layers)]
    staged = CopyPaths(view, h2d="staged").layer_groups()
    assert [b for b, _ in staged] == sorted({b for b, _ in staged}) and staged[0][0] == 0
    assert all(e == b2 for (_, e), (b2, _) in zip(staged, staged[1:])) and staged[-1][1] == num_layers
    per = staged[0][1] - staged[0][0]
    # Runs of 32 KiB where the model has layers enough for eight groups of them; else eight groups or one layer each.
    assert per == max(1, min(7, -(-num_layers // STAGED_MIN_GROUPS)))
    assert all(e - b == per for b, e in staged[:-1])


def test_staged_loads_go_in_slot_order(rng: np.random.Generator, monkeypatch) -> None:
    """A layer-wise staged load takes its pages in host slot order, each with its block, so that pages handed out
    in reverse (a free list after evictions) still join one copy per group; the blocks get the pages' bytes."""
    kv = make_rank_kv(rng, SHAPES[0], dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 4), num_blocks=12,
                      num_layers=8)
    view = kv.view(num_heads_total=4)
    pages = make_pages(view.geometry, 12, fill=rng)
    paths = CopyPaths(view, h2d="staged")
    slots, blocks = [9, 8, 7, 6, 5, 2, 1, 0], [3, 11, 0, 7, 5, 1, 10, 4]
    seen = []
    real = staging.staged_scatter

    def spy(pages_, view_, slots_, blocks_, *args, **kw):
        seen.append((list(slots_), list(blocks_)))
        return real(pages_, view_, slots_, blocks_, *args, **kw)

    monkeypatch.setattr(staging, "staged_scatter", spy)
    kv.poison()
    paths.load(pages.buffer, slots, blocks, None, paths.layer_groups())
    assert seen == [([0, 1, 2, 5, 6, 7, 8, 9], [4, 10, 1, 5, 7, 0, 11, 3])]
    got = kv.snapshot()
    kv.poison()
    dynkv.scatter(pages.buffer, view, slots, blocks)
    assert all(torch.equal(a, b) for a, b in zip(got, kv.snapshot()))
