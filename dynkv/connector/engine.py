"""What the connector needs to know about the engine vLLM runs, without importing vLLM.

Page geometry and model fingerprint from vLLM's config objects, the order and
axes of the KV tensors vLLM registers, and the flat samples of a metrics
registry that travel as connector stats. Everything here reads vLLM objects by
attribute only, so it is testable with stand-ins and stays stable across the
vLLM versions dynkv supports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from dynkv.connector.groups import kv_groups
from dynkv.identity import weights_identity
from dynkv.keys import ModelFingerprint
from dynkv.layout import PagedView, PageGeometry, head_range

__all__ = ["OLDEST_VLLM", "NEWEST_VLLM", "check_vllm_version", "data_parallel_rank", "distinct_layers", "infer_dims", "metric_samples", "model_geometry", "paged_view"]


# The vLLM releases dynkv's connector is written and tested against (its hooks differ between them).
OLDEST_VLLM = (0, 26)
NEWEST_VLLM = (0, 33)


def check_vllm_version(version: str) -> str | None:
    """Refuse a vLLM older than :data:`OLDEST_VLLM`; a warning (returned) for one newer than :data:`NEWEST_VLLM`.

    Raises
    ------
    ValueError
        For a vLLM release older than dynkv supports (or a version it cannot read).
    """
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"dynkv: cannot read vLLM's version {version!r}; dynkv supports vLLM "
                         f"{'.'.join(map(str, OLDEST_VLLM))} to {'.'.join(map(str, NEWEST_VLLM))}")
    have = (int(m.group(1)), int(m.group(2)))
    span = f"{'.'.join(map(str, OLDEST_VLLM))} to {'.'.join(map(str, NEWEST_VLLM))}"
    if have < OLDEST_VLLM:
        raise ValueError(f"dynkv: vLLM {version} is older than dynkv supports ({span}); upgrade vLLM")
    if have > NEWEST_VLLM:
        return (f"dynkv: vLLM {version} is newer than dynkv was tested with ({span}); its connector hooks may "
                "have changed: check the load and store counts in dynkv's metrics")
    return None


def data_parallel_rank(vllm_config: Any) -> tuple[int, int | None] | None:
    """``(rank, rank on this node)`` when the engine is one rank of vLLM's data parallelism, else None.

    vLLM runs the DP ranks of a dense model as independent engines and resets
    their ``data_parallel_size`` and ``data_parallel_rank`` to one engine's;
    ``data_parallel_index`` keeps the rank, and every DP engine's
    ``engine_id`` ends in ``_dp<rank>``.
    """
    par = vllm_config.parallel_config
    local = getattr(par, "data_parallel_rank_local", None)
    if (getattr(par, "data_parallel_size", 1) or 1) > 1:
        return int(par.data_parallel_rank or 0), local
    index = getattr(par, "data_parallel_index", None)
    engine_id = str(getattr(getattr(vllm_config, "kv_transfer_config", None), "engine_id", "") or "")
    m = re.search(r"_dp(\d+)$", engine_id)
    if index is not None and m is not None and int(m.group(1)) == index:
        return int(index), local
    return None

def _elem_bytes(dtype: Any) -> int:
    return torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 1


def model_geometry(vllm_config: Any, kv_cache_config: Any = None, *,
                   model_version: str | None = None) -> tuple[PageGeometry, ModelFingerprint]:
    """Page geometry and fingerprint of the model vLLM serves; scheduler and workers derive the same.

    Parameters
    ----------
    vllm_config
        vLLM's ``VllmConfig``.
    kv_cache_config
        vLLM's ``KVCacheConfig`` when the connector API passes it; else the
        model config alone decides.
    model_version
        The weights' identity as the user names it; default: digested from the
        model's files (:func:`dynkv.identity.weights_identity`).

    Raises
    ------
    ValueError
        For KV caches dynkv cannot page (:func:`kv_groups`: Mamba or
        linear-attention state, groups of different shapes), and pipeline
        parallelism.
    """
    model, cache, par = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        raise ValueError(
            f"dynkv: pipeline_parallel_size={par.pipeline_parallel_size} is not supported (each stage would need "
            "its own pages of its layers); use tensor parallelism, or serve without the DynKVConnector"
        )
    mla = bool(getattr(model, "use_mla", False))
    if kv_cache_config is not None:
        groups = kv_cache_config.kv_cache_groups
        kv_groups(vllm_config, kv_cache_config)  # refuses what dynkv cannot page
        spec = groups[0].kv_cache_spec
        mla = mla or type(spec).__name__.startswith(("MLA", "SlidingWindowMLA"))
        tensors = getattr(kv_cache_config, "kv_cache_tensors", ())

        def slots(names: set[str]) -> int:
            # vLLM >= 0.32: a tensor holds ``layers`` (one each, or a packed span); earlier
            # versions name ``shared_by`` the layers that share one tensor: one layer of KV.
            return sum(len(set(t.layers) & names) if hasattr(t, "layers") else int(bool(set(t.shared_by) & names))
                       for t in tensors) or len(names)

        # The groups' tensors overlay one another: a page holds the layers of the largest group.
        num_layers = max(slots(set(g.layer_names)) for g in groups)
        head_size, block_size, dtype = spec.head_size, spec.block_size, spec.dtype
        elem = _elem_bytes(dtype)
        token_bytes = getattr(spec, "state_content_size_bytes", None) or (1 if mla else 2) * head_size * elem
    else:
        num_layers = model.get_num_layers(par)
        head_size, block_size = model.get_head_size(), cache.block_size
        dtype = model.dtype
        elem = _elem_bytes(dtype) if cache.cache_dtype == "auto" else 1
        token_bytes = (1 if mla else 2) * head_size * elem
    num_heads = 1 if mla else model.get_total_num_kv_heads()
    model_id = str(model.model)
    if getattr(model, "revision", None):
        model_id += f"@{model.revision}"
    if getattr(model, "quantization", None):
        model_id += f"+{model.quantization}"
    kv_dtype = str(dtype) if cache.cache_dtype == "auto" else str(cache.cache_dtype)
    geometry = PageGeometry(num_layers, num_heads, block_size, token_bytes, elem)
    weights = (f"version:{model_version}" if model_version
               else weights_identity(str(model.model), getattr(model, "revision", None)))
    fingerprint = ModelFingerprint(model_id, kv_dtype, num_layers, num_heads, head_size, block_size, weights=weights)
    return geometry, fingerprint


def _layer_index(name: str) -> int:
    # vLLM names attention layers "model.layers.<i>.self_attn.attn".
    m = re.search(r"\.(\d+)\.", name) or re.search(r"(\d+)", name)
    return int(m.group(1)) if m else 0


def distinct_layers(kv_caches: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per-layer KV tensors in model order, each once (layers sharing one KV cache count once)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: list[torch.Tensor] = []
    for name in sorted(kv_caches, key=lambda n: (_layer_index(n), n)):
        t = kv_caches[name]
        ident = (t.data_ptr(), tuple(t.stride()))
        if ident not in seen:
            seen.add(ident)
            out.append(t)
    if not out:
        raise ValueError("dynkv: vLLM registered no KV cache tensors")
    return out


def infer_dims(t: torch.Tensor, num_blocks: int, num_heads: int, block_size: int) -> str:
    """Axis names (for :meth:`PagedView.from_tensors`) of one layer's KV tensor as vLLM hands it over.

    vLLM >= 0.32 hands logical ``[B, H, N, C]`` views; earlier versions hand
    each attention backend's own shape, e.g. ``[2, B, N, H, D]`` (K/V split),
    whose axes are told apart by size.

    Raises
    ------
    ValueError
        When the axes cannot be told apart, or the tensor splits vLLM's
        blocks into smaller kernel blocks.
    """
    shape = tuple(t.shape)
    if t.dim() == 4:
        if shape[0] != num_blocks:
            raise ValueError(
                f"dynkv: a KV tensor of shape {shape} holds {shape[0]} blocks but vLLM manages {num_blocks}: "
                "kernel block splitting is not supported; use a block size the attention backend takes whole"
            )
        return "BHNC"
    if t.dim() == 5:
        names = [""] * 5
        for name, size in (("B", num_blocks), ("K", 2), ("N", block_size), ("H", num_heads)):
            free = [i for i in range(4) if shape[i] == size and not names[i]]
            if len(free) != 1:
                break
            names[free[0]] = name
        else:
            names[4] = "D"
            return "".join(names)
    raise ValueError(
        f"dynkv: cannot tell the axes of a KV tensor of shape {shape} ({num_blocks} blocks, {num_heads} heads, "
        f"{block_size} tokens per block); this vLLM version's KV layout is not supported"
    )


def paged_view(layers: list[torch.Tensor], num_blocks: int, geometry: PageGeometry, rank: int,
               world_size: int) -> PagedView:
    """One TP rank's KV tensors (:func:`distinct_layers`) as a :class:`PagedView` of ``geometry``.

    Raises
    ------
    ValueError
        When the tensors' axes cannot be told apart, or they give another
        geometry than the model config (a KV-cache layout dynkv does not
        support).
    """
    h0, h1 = head_range(rank, world_size, geometry.num_heads)
    dims = infer_dims(layers[0], num_blocks, h1 - h0, geometry.block_size)
    view = PagedView.from_tensors(layers, dims=dims, num_heads_total=geometry.num_heads, head_start=h0,
                                  block_size=geometry.block_size)
    if view.geometry != geometry:
        raise ValueError(
            f"dynkv: vLLM's KV tensors give page geometry {view.geometry} but the model config gives "
            f"{geometry}; this KV-cache layout is not supported"
        )
    return view


def metric_samples(registry: Any) -> tuple[dict[str, float], dict[str, float]]:
    """``(counters, gauges)`` of a Prometheus registry, keyed ``name{label=value,...}``.

    Counters include histograms' ``_sum`` and ``_count``; ``_created``
    timestamps are left out.
    """
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    for metric in registry.collect():
        for s in metric.samples:
            if metric.type == "gauge":
                target = gauges
            elif s.name.endswith(("_total", "_sum", "_count")):
                target = counters
            else:
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            target[f"{s.name}{{{labels}}}"] = float(s.value)
    return counters, gauges
