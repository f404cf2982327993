"""Which copy path each direction takes on this GPU: measured at worker start, cached per GPU and driver.

The copy kernel's speed over PCIe depends on the host (the same kernel ran at
93% of a plain memcpy on one H200 host and at 60% for loads on one H100 host);
the staged path's copy engines do not, but hand a layer-wise load to the
forward in groups of layers, not one layer at a time (:mod:`dynkv.worker.staging`). So each worker times
both paths, and a plain memcpy of the same bytes, on scratch memory shaped like
its KV cache (a few tens of MiB, well under a second) and takes the staged path
where it is clearly faster (:data:`STAGED_MARGIN`). The result is cached in
``$DYNKV_CACHE_DIR`` (else
``$XDG_CACHE_HOME/dynkv``, else ``~/.cache/dynkv``), keyed by GPU model, driver,
CUDA runtime and the page shape, so the next start on that host skips it.
``copy_path`` (``DYNKV_COPY_PATH``) forces ``kernel`` or ``staged``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dynkv._version import __version__
from dynkv.env import env_report
from dynkv.layout import PagedView
from dynkv.memory import PageBuffer
from dynkv.ops import gather, scatter, staged_gather, staged_scatter
from dynkv.worker.staging import COPY_PATHS, in_slot_order, layer_groups, staging_for

__all__ = ["CACHE_FILE", "Calibration", "cache_dir", "cache_key", "choose", "measure"]

log = logging.getLogger("dynkv.worker")

CACHE_FILE = "copy-paths.json"
MEASURE_BYTES = 64 << 20  # per timed copy
REPEATS = 3  # timed copies per path, after one untimed
# The staged path must beat the kernel by this factor, per direction. Loads: inside vLLM (H100, llama3-8b,
# 8k-token host hits, 2026-12-07) a layer-wise staged load whose copy alone was 9% faster gave a median
# TTFT of 45.4 ms against the kernel's 32.1 ms in the same engine, hits taking turns: the forward started
# its layers as if behind the whole copy in most hits (docs/notes/2026-12-07-h100-launch-thread-e2e.md). So
# loads take the staged path only where the kernel is far slower (the 2026-12-06 H100 host: 60% of memcpy
# against 99%). Stores run beside the next steps, with no one waiting.
STAGED_MARGIN = {"h2d": 1.5, "d2h": 1.05}
DIRECTIONS = ("h2d", "d2h")


@dataclass(frozen=True)
class Calibration:
    """The path of one direction, and the GB/s each path (and a plain memcpy) reached when measured."""

    direction: str
    path: str
    gbps: dict[str, float] = field(default_factory=dict)
    source: str = "measured"  # measured, cached, or config


def cache_dir() -> Path:
    base = os.environ.get("DYNKV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dynkv")
    return Path(base)


def cache_key(view: PagedView) -> str:
    """GPU model, driver, CUDA runtime, dynkv's version and the shape of this rank's copies."""
    import torch

    report = env_report()
    g = view.geometry
    name = torch.cuda.get_device_properties(view.device).name
    return (f"{name}|driver {report.get('cuda_driver')}|cuda {report.get('cuda_runtime')}|dynkv {__version__}"
            f"|tile {g.tile_bytes}|run {view.c.run_bytes}|heads {view.num_heads}x{g.num_layers}"
            f"|margin {STAGED_MARGIN['h2d']}/{STAGED_MARGIN['d2h']}|loads: kernel whole, staged in groups in slot order")


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(entry, dict) or set(entry) != set(DIRECTIONS):
        return None
    if any(not isinstance(e, dict) or e.get("path") not in COPY_PATHS for e in entry.values()):
        return None
    return entry


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
            table = table if isinstance(table, dict) else {}
        except (OSError, ValueError):
            table = {}
        table[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: measure again next start
        log.warning("copy-path calibration not cached (%s): %s", path, e)


def measure(view: PagedView, *, nbytes: int = MEASURE_BYTES, repeats: int = REPEATS) -> dict[str, dict[str, float]]:
    """GB/s of ``memcpy``, ``kernel`` and ``staged`` per direction, on scratch memory shaped like ``view``.

    The scratch KV cache has ``view``'s geometry, heads and token stride (tile-
    or token-contiguous), the pages are pinned host memory and the ids are
    shuffled, as a hit's are; vLLM's own KV cache is never touched.
    """
    import torch

    g, device = view.geometry, view.device
    slice_bytes = view.num_heads * g.num_layers * g.tile_bytes
    n = max(8, min(4096, nbytes // slice_bytes))
    dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[g.elem_bytes]
    elems = g.token_bytes // g.elem_bytes
    contiguous = bool(view.c.tile_contiguous)
    shape = (n, view.num_heads, g.block_size, elems) if contiguous else (n, g.block_size, view.num_heads, elems)
    kv = [torch.empty(shape, dtype=dtype, device=device) for _ in range(g.num_layers)]
    scratch = PagedView.from_tensors(kv, dims="BHNC" if contiguous else "BNHC", num_heads_total=g.num_heads,
                                     head_start=view.head_start)
    host = torch.empty(n * g.page_bytes, dtype=torch.uint8, pin_memory=True)
    pages = PageBuffer.from_tensor(g, host)
    flat = torch.empty(n * slice_bytes, dtype=torch.uint8, device=device)
    gen = torch.Generator().manual_seed(0)
    ids, slots = torch.randperm(n, generator=gen).tolist(), torch.randperm(n, generator=gen).tolist()
    in_order = in_slot_order(slots, ids)
    rings = {"h2d": staging_for(scratch), "d2h": staging_for(scratch)}
    stream = torch.cuda.Stream(device)
    ops = {
        "h2d": {"memcpy": lambda: flat.copy_(host[: flat.numel()], non_blocking=True),
                # The kernel in one launch: per layer, this scratch load is launches of well under a MiB each
                # for a model of many layers and few heads per rank (0.8 MiB for llama3-70b at TP=8: 74% of
                # memcpy on an H100 where a 1 GiB load's per-layer launches reached 88%). The staged path in
                # its layer groups, pages in slot order as the worker sorts them (here every slot adjacent:
                # the best case; a long-used pool's are less so).
                "kernel": lambda: scatter(pages, scratch, slots, ids, stream=stream),
                "staged": lambda: staged_scatter(pages, scratch, in_order[0], in_order[1], rings["h2d"],
                                                 groups=layer_groups(g, "staged"), stream=stream)},
        "d2h": {"memcpy": lambda: host[: flat.numel()].copy_(flat, non_blocking=True),
                "kernel": lambda: gather(scratch, pages, ids, slots, stream=stream),
                "staged": lambda: staged_gather(scratch, pages, ids, slots, rings["d2h"], stream=stream)},
    }
    out: dict[str, dict[str, float]] = {}
    with torch.cuda.stream(stream):
        for direction, paths in ops.items():
            out[direction] = {}
            for name, op in paths.items():
                op()  # untimed: first-launch costs
                best = float("inf")
                for _ in range(repeats):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(stream)
                    op()
                    end.record(stream)
                    end.synchronize()
                    best = min(best, start.elapsed_time(end) / 1e3)
                out[direction][name] = round(n * slice_bytes / best / 1e9, 2)
    stream.synchronize()
    return out


def choose(view: PagedView, *, mode: str = "auto", use_cache: bool = True) -> dict[str, Calibration]:
    """The path of each direction on ``view``'s GPU: ``mode`` ``kernel`` or ``staged`` forces one; ``auto``
    reads the cache or measures (then caches)."""
    if mode in COPY_PATHS:
        return {d: Calibration(d, mode, {}, "config") for d in DIRECTIONS}
    if mode != "auto":
        raise ValueError(f"copy_path={mode!r}: expected auto, {' or '.join(COPY_PATHS)}")
    path, key = cache_dir() / CACHE_FILE, cache_key(view)
    entry = _read_cache(path, key) if use_cache else None
    if entry is not None:
        return {d: Calibration(d, entry[d]["path"], dict(entry[d].get("gbps", {})), "cached") for d in DIRECTIONS}
    t0 = time.perf_counter()
    gbps = measure(view)
    out = {}
    for d in DIRECTIONS:
        staged = gbps[d]["staged"] > STAGED_MARGIN[d] * gbps[d]["kernel"]
        out[d] = Calibration(d, "staged" if staged else "kernel", gbps[d], "measured")
    log.debug("copy-path calibration took %.3f s", time.perf_counter() - t0)
    if use_cache:
        _write_cache(path, key, {d: {"path": c.path, "gbps": c.gbps} for d, c in out.items()})
    return out


def describe(choice: dict[str, Calibration]) -> str:
    """One line for the log: each direction's path and what the paths measured."""
    parts = []
    for d, c in choice.items():
        what = "loads" if d == "h2d" else "stores"
        rates = ", ".join(f"{k} {v:.1f}" for k, v in c.gbps.items())
        parts.append(f"{what} {c.path}" + (f" ({rates} GB/s; {c.source})" if rates else f" ({c.source})"))
    return "; ".join(parts)


def as_dict(choice: dict[str, Calibration]) -> dict[str, dict[str, Any]]:
    return {d: asdict(c) for d, c in choice.items()}
