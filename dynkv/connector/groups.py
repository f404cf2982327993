"""vLLM's KV-cache groups as dynkv pages them: hybrid (full and sliding-window attention) and sliding-window models.

vLLM's hybrid KV-cache manager gives each KV-cache group its own block table
over one block pool, and the groups' KV tensors overlay the same memory: one
paged view of the distinct tensors reaches every group's blocks by their
pool-wide block ids. dynkv keeps one page per group for each block of
tokens, under the group's own key (:func:`dynkv.keys.group_keys`), so a page
of one group is never found for another. A request's pages interleave group
by group within each block, so the leader's prefix match needs every group's
page of a block for a hit on it. A sliding-window group's blocks before the
window are matched but not loaded (vLLM holds its null block there), and are
stored only while vLLM still holds them for the request.

Groups whose state is not attention KV (Mamba, linear attention) are refused
when the connector is built, naming the model. Reads vLLM objects by
attribute only, like :mod:`.engine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dynkv.keys import group_keys

__all__ = ["KVGroups", "group_block_ids", "group_stores", "interleaved_keys", "kv_groups"]

# Attention specs whose blocks are not plain per-token KV of a prefix (chunked or ring-buffer windows,
# encoder and cross attention, sparse caches): dynkv refuses them, as it refuses state without a head size.
_REFUSED_SPECS = ("ChunkedLocalAttentionSpec", "CircularBufferSpec", "CrossAttentionSpec",
                  "EncoderOnlyAttentionSpec", "HiddenStateCacheSpec", "RSWASpec")


@dataclass(frozen=True)
class KVGroups:
    """vLLM's KV-cache groups as dynkv pages them (one group for most models).

    vLLM's hybrid KV-cache manager gives each group its own block table over
    one block pool; the groups' KV tensors overlay the same memory, so one
    paged view of the distinct tensors reaches every group's blocks by their
    (pool-wide) block ids. dynkv keeps one page per group for each block of
    tokens, under the group's own keys (:func:`dynkv.keys.group_keys`).

    ``windows[g]`` is group ``g``'s sliding window in tokens (None: full
    attention); ``retained[g]`` the tokens vLLM keeps beyond it; ``tags[g]``
    names the group in its pages' keys (empty for a model of one
    full-attention group, whose keys are the prefix keys themselves).
    """

    windows: tuple[int | None, ...] = (None,)
    retained: tuple[int, ...] = (0,)
    tags: tuple[bytes, ...] = (b"",)

    @property
    def count(self) -> int:
        return len(self.windows)

    @property
    def sliding(self) -> bool:
        """Some group keeps only a sliding window of blocks."""
        return any(w is not None for w in self.windows)

    @property
    def plain(self) -> bool:
        """One full-attention group: pages and keys as for any dense model."""
        return self.windows == (None,)

    def first_live_block(self, group: int, num_computed_tokens: int, block_size: int) -> int:
        """The first block of ``group`` that vLLM may still hold after ``num_computed_tokens`` tokens.

        A sliding-window group frees blocks that fell out of its window
        (``window - 1`` tokens and those it retains are kept); blocks before
        this one may already belong to another request.
        """
        window = self.windows[group]
        if window is None:
            return 0
        return max(0, num_computed_tokens - (window - 1 + self.retained[group])) // block_size


def _model_kind(model: Any) -> str:
    hf = getattr(model, "hf_config", None)
    archs = getattr(hf, "architectures", None) or getattr(model, "architectures", None) or ["?"]
    return f"{archs[0]} (model_type {getattr(hf, 'model_type', '?')!r})"


def kv_groups(vllm_config: Any, kv_cache_config: Any) -> KVGroups:
    """The KV-cache groups of the model vLLM serves, checked for what dynkv can page.

    Raises
    ------
    ValueError
        For a group that is not attention KV (Mamba or linear-attention state,
        chunked local attention, cross attention), naming the model type; for
        groups whose blocks differ in shape (their pages would differ in size).
    """
    if kv_cache_config is None:
        return KVGroups()
    groups = kv_cache_config.kv_cache_groups
    if not groups:
        raise ValueError("dynkv: vLLM's KV-cache config has no group; nothing to page")
    model = vllm_config.model_config
    windows, retained, tags, shapes = [], [], [], set()
    for g, group in enumerate(groups):
        spec = group.kv_cache_spec
        name = type(spec).__name__
        if (name in _REFUSED_SPECS or name.startswith("HiSparse") or "mamba" in name.lower()
                or not hasattr(spec, "head_size")):
            layers = ", ".join(list(group.layer_names)[:3])
            raise ValueError(
                f"dynkv: {_model_kind(model)} keeps {name} in KV-cache group {g} (layers {layers}...); dynkv "
                "stores attention KV only (full and sliding-window attention), not Mamba, linear-attention or "
                "other state: serve this model without the DynKVConnector"
            )
        shapes.add((spec.head_size, getattr(spec, "num_kv_heads", 1), spec.block_size, str(spec.dtype)))
        window = getattr(spec, "sliding_window", None)
        windows.append(int(window) if window is not None else None)
        retained.append(int(getattr(spec, "extra_retained_tokens", 0) or 0))
        kind = "full" if window is None else f"sliding:{window}:{retained[-1]}"
        tags.append(f"{g}|{kind}|{','.join(group.layer_names)}".encode())
    if len(shapes) > 1:
        raise ValueError(
            f"dynkv: {_model_kind(model)} has KV-cache groups of different block shapes {sorted(shapes)} "
            "(head size, KV heads, block size, dtype); dynkv pages groups of one shape only"
        )
    if windows == [None]:
        return KVGroups()
    return KVGroups(tuple(windows), tuple(retained), tuple(tags))




def interleaved_keys(groups: KVGroups, keys: Sequence[bytes], cache: list[bytes], n: int) -> list[bytes]:
    """Page keys of the first ``n`` blocks (prefix ``keys``): every group's, block by block.

    ``cache`` holds those of earlier calls for the same request and is extended.
    """
    count, have = groups.count, len(cache) // groups.count
    if len(keys) > have:
        new = [group_keys(keys[have:], tag) for tag in groups.tags]
        cache.extend(k for block in zip(*new) for k in block)
    return cache[: min(n, len(keys)) * count]


def group_block_ids(groups: KVGroups, ids: Sequence[Sequence[int]], base: int, n: int) -> list[int]:
    """Every group's block of blocks ``base .. base + n``, in :func:`interleaved_keys` order.

    -1 where vLLM holds none (a sliding window's null block before the window):
    that page is matched but not loaded.
    """
    return [ids[g][i] if i < len(ids[g]) and ids[g][i] > 0 else -1
            for i in range(base, base + n) for g in range(groups.count)]


def group_stores(groups: KVGroups, page_keys: Sequence[bytes], block_ids: Sequence[Sequence[int]], stored: int,
                 full: int, num_computed_tokens: int, block_size: int) -> tuple[list[bytes], list[int]]:
    """Keys and blocks to store of every group's blocks ``stored .. full`` that vLLM still holds.

    A sliding window's blocks before :meth:`KVGroups.first_live_block` may
    already be another request's: they are not stored.
    """
    count = groups.count
    keys, blocks = [], []
    for g in range(count):
        for i in range(max(stored, groups.first_live_block(g, num_computed_tokens, block_size)), full):
            if block_ids[g][i] > 0:
                keys.append(page_keys[i * count + g])
                blocks.append(block_ids[g][i])
    return keys, blocks
