"""Kernel bandwidth bench (``dynkv bench kernels``).

Moves this TP rank's slice of random blocks of a model-shaped paged KV cache
to and from pages, and reports GB/s next to the plain contiguous memcpy of the
same bytes measured in the same run: every claim is a ratio to that baseline.

Directions: ``h2d`` (scatter pinned host pages into the cache), ``d2h``
(gather), ``d2d`` (gather into pages in GPU memory), ``both`` (a load and a
store at once on two streams, against two concurrent contiguous memcpys). On a
CPU every buffer is host memory: ``h2d``/``d2h`` are scatter/gather between two
host buffers and ``kernel`` is the thread-pool path.

Backends: ``kernel`` (swept over ``--ctas``, CTAs per op), ``dma``
(``cudaMemcpyBatchAsync``), ``dma_loop`` (one ``cudaMemcpyAsync`` per run), and
``torch``: a plain PyTorch reference (per layer ``index_select`` /
``index_copy_``, contiguous staging copies across PCIe). Bytes are this rank's
slices only; GB/s is decimal (1e9 bytes/s) over the median of ``--iters``
timings, each op (or pair, for ``both``) on its own CUDA stream.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dynkv
from dynkv.benchmarks.kernels_setup import (
    BACKENDS,
    DIRECTIONS,
    LAYER_WISE,
    PRESETS,
    Preset,
    Setup,
    baseline_fns,
    build_setup,
    dynkv_op,
    staged_copies,
    time_fns,
    torch_op,
)
from dynkv.layout import LAYOUTS
from dynkv.memory import HostPool
from dynkv.ops import get_tuning, set_tuning

__all__ = ["Config", "add_arguments", "main", "run", "run_from_args"]

DESCRIPTION = ("GB/s of dynkv's gather/scatter of random KV blocks of a model-shaped cache, next to a "
               "contiguous memcpy of the same bytes measured in the same run")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
@dataclass(frozen=True)
class Config:
    """One ``dynkv bench kernels`` run, built once from the command line."""

    preset: str
    layout: str
    device: str
    directions: tuple[str, ...]
    backends: tuple[str, ...]
    ctas: tuple[int, ...]
    blocks: int
    iters: int
    warmup: int
    threads: int
    cta_threads: int | None
    json_path: Path
    plot_path: Path | None
    tile_sweep: bool = False
    gemm: bool = False
    host_pool_gib: float = 0.0
    launch_bytes: tuple[int, ...] = (0,)


def _ops_for(s: Setup, cfg: Config, direction: str, backend: str, ctas: int | None) -> list[Callable[[], None]]:
    kinds = {"h2d": [("load", False)], "d2h": [("store", False)], "d2d": [("store", True)],
             "both": [("load", False), ("store", False)]}[direction]
    if backend == "torch":
        return [torch_op(s, k, on_device=d) for k, d in kinds]
    threads = cfg.threads if cfg.device == "cpu" else cfg.cta_threads
    if backend == "hybrid":
        return [dynkv_op(s, k, on_device=d, backend="kernel" if k == "load" else "dma", ctas=ctas, threads=threads)
                for k, d in kinds]
    return [dynkv_op(s, k, on_device=d, backend=backend, ctas=ctas, threads=threads) for k, d in kinds]


def _row(direction: str, backend: str, ctas: int | None, nbytes: int, times: list[float],
         base: float, enqueue: list[float], queue_bound: list[bool] | None = None) -> dict[str, Any]:
    med = statistics.median(times)
    gbps = nbytes / med / 1e9
    return {"direction": direction, "backend": backend, "ctas": ctas, "bytes": nbytes, "times_s": times,
            "median_s": med, "gbps": gbps, "pct_of_memcpy": 100.0 * gbps / base if base else None,
            "enqueue_ms": 1e3 * statistics.median(enqueue) if enqueue else None,
            "queue_bound": bool(queue_bound)}


def run_cases(s: Setup, cfg: Config) -> list[dict[str, Any]]:
    """Every (direction, backend, ctas) case, each after its direction's memcpy baseline."""
    from tqdm import tqdm

    cases = [(d, b, c) for d in cfg.directions for b in cfg.backends
             if (b != "hybrid" or d == "both") and (b not in LAYER_WISE or d == "h2d")
             and (b != "staged" or d != "d2d")
             for c in (cfg.ctas if b in ("kernel", "hybrid", "layers") and cfg.device == "cuda" else (None,))]
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(cases) + len(cfg.directions), desc="bench", unit="case", leave=False, disable=None) as bar:
        for d in cfg.directions:
            nbytes = s.nbytes * (2 if d == "both" else 1)
            enq: list[float] = []
            times = time_fns(baseline_fns(s, d, cfg.threads), s.device, iters=cfg.iters, warmup=cfg.warmup,
                             enqueue=enq)
            base = _row(d, "memcpy", None, nbytes, times, 0.0, enq)
            base["pct_of_memcpy"] = 100.0
            rows.append(base)
            bar.update()
            for _, b, c in (x for x in cases if x[0] == d):
                bar.set_postfix_str(f"{d} {b}{'' if c is None else f' ctas={c}'}")
                enq, bound = [], []
                times = time_fns(_ops_for(s, cfg, d, b, c), s.device, iters=cfg.iters, warmup=cfg.warmup,
                                 enqueue=enq, queue_bound=bound)
                rows.append(_row(d, b, c, nbytes, times, base["gbps"], enq, bound))
                rows[-1]["copies"] = staged_copies(s, d, b)
                bar.update()
    return rows


def tile_sweep(preset: Preset, cfg: Config) -> list[dict[str, Any]]:
    """Kernel (default CTAs) vs DMA batch at 2..64 KiB tiles, set by the block size."""
    import torch

    rows = []
    token = preset.geometry().token_bytes
    dirs = [d for d in cfg.directions if d != "both"] or ["h2d"]
    for kib in (2, 4, 8, 16, 32, 64):
        if (kib * KiB) % token:
            continue
        bs = kib * KiB // token
        blocks = max(1, cfg.blocks * preset.block_size // bs)  # the same bytes per op at every tile size
        s = build_setup(preset, device=cfg.device, blocks=blocks, layout=cfg.layout, block_size=bs,
                        device_pages="d2d" in dirs)
        try:
            for d in dirs:
                gb = {}
                base = time_fns(baseline_fns(s, d, cfg.threads), s.device, iters=cfg.iters, warmup=cfg.warmup)
                gb["memcpy"] = s.nbytes / statistics.median(base) / 1e9
                for b in ("kernel", "staged", "dma"):
                    if b == "staged" and d == "d2d":
                        continue
                    ctas = get_tuning().for_direction(d)[0] if b == "kernel" else None
                    t = time_fns(_ops_for(s, cfg, d, b, ctas), s.device, iters=cfg.iters, warmup=cfg.warmup)
                    gb[b] = s.nbytes / statistics.median(t) / 1e9
                rows.append({"tile_kib": kib, "block_size": bs, "direction": d, "blocks": blocks,
                             **{f"{b}_gbps": v for b, v in gb.items()},
                             **{f"{b}_pct": 100.0 * v / gb["memcpy"] for b, v in gb.items() if b != "memcpy"},
                             "kernel_over_dma": gb["kernel"] / gb["dma"]})
        finally:
            s.close()
            del s
            torch.cuda.empty_cache()
    return rows


def gemm_slowdown(s: Setup, cfg: Config, n: int = 8192, k: int = 10) -> dict[str, Any]:
    """A bf16 n^3 GEMM alone vs while a scatter and a gather loop on two other streams."""
    import torch

    dev = s.device
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)

    def gemms() -> None:
        for _ in range(k):
            torch.matmul(a, b, out=c)

    alone = statistics.median(time_fns([gemms], dev, iters=5, warmup=2)) / k
    out: dict[str, Any] = {"n": n, "gemm_alone_ms": alone * 1e3, "tflops_alone": 2 * n**3 / alone / 1e12, "runs": []}
    copy_cfgs = [("kernel", c_, lb) for c_ in cfg.ctas for lb in cfg.launch_bytes]
    copy_cfgs += [(x, None, 0) for x in ("dma", "staged") if x in cfg.backends]
    main = torch.cuda.current_stream(dev)
    side = [torch.cuda.Stream(dev), torch.cuda.Stream(dev)]
    saved = get_tuning()
    for backend, ctas, launch_bytes in copy_cfgs:
        set_tuning(launch_bytes=launch_bytes)
        load, store = (dynkv_op(s, kd, backend=backend, ctas=ctas, threads=cfg.cta_threads)
                       for kd in ("load", "store"))
        per_round = statistics.median(time_fns([load, store], dev, iters=3, warmup=1))
        # Enough copy rounds to outlast the GEMMs several times over.
        reps = max(2, math.ceil(3 * alone * k / per_round))
        times, overlapped = [], True
        for _ in range(3):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            for st in side:
                st.wait_stream(main)
            for _ in range(reps):
                for st, fn in zip(side, (load, store)):
                    with torch.cuda.stream(st):
                        fn()
            ev[0].record(main)
            gemms()
            ev[1].record(main)
            ev[2].record(side[0])
            ev[3].record(side[1])
            torch.cuda.synchronize(dev)
            times.append(ev[0].elapsed_time(ev[1]) / 1e3 / k)
            overlapped &= ev[1].elapsed_time(ev[2]) > 0 and ev[1].elapsed_time(ev[3]) > 0
        during = statistics.median(times)
        out["runs"].append({"backend": backend, "ctas": ctas, "launch_bytes": launch_bytes,
                            "gemm_ms": during * 1e3, "slowdown_pct": 100.0 * (during / alone - 1),
                            "copy_gbps_alone": 2 * s.nbytes / per_round / 1e9,
                            "copies_outlasted_gemms": overlapped})
    set_tuning(launch_bytes=saved.launch_bytes)
    return out


def host_pool_speed(size_gib: float) -> dict[str, Any]:
    """Seconds to pin ``size_gib`` with :meth:`HostPool.create` vs ``torch.empty(pin_memory=True)``."""
    import torch

    nbytes = int(size_gib * GiB)
    t0 = time.perf_counter()
    HostPool.create(nbytes, pin=True).close()
    t_dynkv = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    t_torch = time.perf_counter() - t0
    del x
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    return {"gib": size_gib, "dynkv_s": t_dynkv, "torch_s": t_torch, "speedup": t_torch / t_dynkv}


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    # enqueue ms: the host's time to enqueue the op(s) (GPU); near the copy's own time, a load and a
    # store enqueued from one thread cannot run at once.
    # copies: copy-engine operations of one staged load (pages in adjacent host slots join one).
    lines = [f"{'direction':<10}{'backend':<10}{'ctas':>6}{'GB/s':>10}{'% memcpy':>10}{'enqueue ms':>12}{'copies':>8}"]
    for r in rows:
        ctas = "-" if r["ctas"] is None else str(r["ctas"])
        enq = "-" if r.get("enqueue_ms") is None else f"{r['enqueue_ms']:.2f}" + ("!" if r.get("queue_bound") else "")
        copies = "-" if r.get("copies") is None else str(r["copies"])
        lines.append(f"{r['direction']:<10}{r['backend']:<10}{ctas:>6}{r['gbps']:>10.2f}{r['pct_of_memcpy']:>10.1f}"
                     f"{enq:>12}{copies:>8}")
    if any(r.get("queue_bound") for r in rows):
        lines.append("! the host's enqueue waited for the GPU (more pending copies than the driver queues): "
                     "timed without the gate; the calling thread is held for about the copy's time")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Bars of % of memcpy per direction and backend (kernel: its best CTA count), the CTA sweep, the tile sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["backend"] != "memcpy"]
    dirs = list(dict.fromkeys(r["direction"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    sweep = [r for r in rows if r["ctas"] is not None]
    panels = 1 + bool(sweep) + bool(report.get("tile_sweep"))
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        vals = [max((r["pct_of_memcpy"] for r in rows if r["direction"] == d and r["backend"] == b), default=0.0)
                for d in dirs]
        label = b + (" (best CTAs)" if b == "kernel" and sweep else "")
        ax.bar([j + i * width for j in range(len(dirs))], vals, width, label=label)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(dirs))], dirs)
    ax.set_ylabel("% of contiguous memcpy (same run)")
    ax.set_title(f"{report['config']['preset']} on {report['config']['device']}")
    ax.legend()
    curves = []
    if sweep:
        curves.append(("CTA sweep", "CTAs per op", "kernel, % of memcpy", 100.0, {
            f"{d} (memcpy {report['baselines'][d]:.0f} GB/s)":
                sorted((r["ctas"], r["pct_of_memcpy"]) for r in sweep if r["direction"] == d) for d in dirs}))
    if report.get("tile_sweep"):
        tiles = report["tile_sweep"]
        curves.append(("tile sweep", "tile KiB", "kernel / DMA batch GB/s", 1.0, {
            d: [(r["tile_kib"], r["kernel_over_dma"]) for r in tiles if r["direction"] == d]
            for d in dict.fromkeys(r["direction"] for r in tiles)}))
    for ax, (title, xlabel, ylabel, ref, series) in zip(axes[0][1:], curves):
        for label, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(ref, color="k", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Config) -> dict[str, Any]:
    """Run the bench of ``cfg``; returns the report that goes to JSON."""
    import torch

    from dynkv.env import env_report

    preset = PRESETS[cfg.preset]
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)  # the torch reference gets the same cores as dynkv
    s = build_setup(preset, device=cfg.device, blocks=cfg.blocks, layout=cfg.layout,
                    concurrent="both" in cfg.directions, device_pages="d2d" in cfg.directions)
    g = s.geometry
    print(f"dynkv bench kernels: {cfg.preset} (L={g.num_layers} H={g.num_heads} N={g.block_size} "
          f"C={g.token_bytes} B, tile {g.tile_bytes / KiB:g} KiB, heads [{s.heads[0]}, {s.heads[1]})), "
          f"layout {cfg.layout}, {cfg.device}, {s.blocks} random blocks (of {s.view.num_blocks}) x "
          f"{s.slice_bytes / MiB:.3g} MiB = {s.nbytes / MiB:.0f} MiB per op"
          + (f", {cfg.threads} threads" if cfg.device == "cpu" else ""), flush=True)
    report: dict[str, Any] = {
        "env": env_report(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
        "geometry": {**g.__dict__, "tile_bytes": g.tile_bytes, "page_bytes": g.page_bytes, "heads": list(s.heads),
                     "slice_bytes": s.slice_bytes, "cache_blocks": s.view.num_blocks, "bytes_per_op": s.nbytes},
    }
    try:
        report["results"] = run_cases(s, cfg)
        report["baselines"] = {r["direction"]: r["gbps"] for r in report["results"] if r["backend"] == "memcpy"}
        print(_fmt_table(report["results"]))
        if cfg.gemm:
            report["gemm"] = gemm_slowdown(s, cfg)
            for r in report["gemm"]["runs"]:
                ctas = "" if r["ctas"] is None else f" ctas={r['ctas']} launch={r['launch_bytes'] >> 10}KiB"
                print(f"gemm {report['gemm']['n']}^3 bf16 alone {report['gemm']['gemm_alone_ms']:.3f} ms; with "
                      f"{r['backend']}{ctas} copies "
                      f"{r['gemm_ms']:.3f} ms: {r['slowdown_pct']:+.1f}% (copies alone {r['copy_gbps_alone']:.1f} GB/s)"
                      + ("" if r["copies_outlasted_gemms"] else " (copies ended before the GEMMs did)"))
    finally:
        s.close()
    if cfg.tile_sweep:
        report["tile_sweep"] = tile_sweep(preset, cfg)
        for r in report["tile_sweep"]:
            paths = ", ".join(f"{b} {r[f'{b}_gbps']:.1f} ({r[f'{b}_pct']:.1f}%)" for b in ("kernel", "staged", "dma")
                              if f"{b}_gbps" in r)
            print(f"tile {r['tile_kib']:>2} KiB {r['direction']}: memcpy {r['memcpy_gbps']:.1f} GB/s; {paths}")
    if cfg.host_pool_gib:
        report["host_pool"] = hp = host_pool_speed(cfg.host_pool_gib)
        print(f"pin {hp['gib']:g} GiB: HostPool.create {hp['dynkv_s']:.2f} s, torch pin_memory "
              f"{hp['torch_s']:.2f} s: {hp['speedup']:.1f}x")
    return report


def _parse_size(text: str) -> int:
    units = {"": 1, "k": KiB, "m": MiB, "g": GiB}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in "kmg" else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not valid: expected bytes, e.g. 256M or 1G") from None


def _csv(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected a comma list of {', '.join(choices)}")
        return items
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dynkv bench kernels``; with none, a CPU run that fits a laptop in about a minute."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    p.add_argument("--layout", choices=list(LAYOUTS), default="LBHNC",
                   help="physical KV layout (vLLM's default: LBHNC); the *NHC ones make DMA runs one token long")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU and the CUDA ops are there")
    p.add_argument("--directions", type=_csv(DIRECTIONS), help="default: h2d,d2h,d2d,both (cuda), h2d,d2h (cpu)")
    p.add_argument("--backends", type=_csv(BACKENDS), help="default: all (cuda), kernel,torch (cpu)")
    p.add_argument("--ctas", default="1,2,4,8,16,32,64", help="kernel CTA counts to sweep, per op (cuda)")
    p.add_argument("--bytes", type=_parse_size, help="bytes per op (default 1G cuda, 256M cpu)")
    p.add_argument("--blocks", type=int, help="random blocks per op (default: from --bytes; >= 1000 on cuda)")
    p.add_argument("--iters", type=int, help="timed repetitions (median reported; default 20 cuda, 10 cpu)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="CPU copy threads (default: dynkv's pool size)")
    p.add_argument("--cta-threads", type=int, help="threads per CTA of the GPU kernel (default: dynkv's tuning)")
    p.add_argument("--out", type=Path, default=Path("dynkv-bench"), help="directory for the default JSON and PNG")
    p.add_argument("--json", type=Path, help="JSON report path (default: OUT/kernels-PRESET-DEVICE.json)")
    p.add_argument("--plot", type=Path, help="PNG path (default: OUT/kernels-PRESET-DEVICE.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--tile-sweep", action="store_true", help="kernel vs DMA batch at 2..64 KiB tiles (cuda)")
    p.add_argument("--gemm", action="store_true", help="GEMM slowdown while copies stream (cuda)")
    p.add_argument("--launch-bytes", default="0", help="with --gemm: kernel launch sizes to try, e.g. 0,1M,4M "
                   "(0: one launch per op)")
    p.add_argument("--host-pool", type=float, default=0.0, metavar="SIZE_GIB", help="pinning speed vs torch (cuda)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve defaults (which depend on the device) and check the combination."""
    import torch

    gpu_ok = dynkv.cuda_compiled() and torch.cuda.is_available()
    device = args.device or ("cuda" if gpu_ok else "cpu")
    if device == "cuda" and not gpu_ok:
        raise SystemExit("--device cuda needs a visible GPU and a dynkv build with the CUDA ops "
                         f"(GPU visible: {torch.cuda.is_available()}, CUDA ops: {dynkv.cuda_compiled()})")
    cpu = device == "cpu"
    dirs = args.directions or (("h2d", "d2h") if cpu else DIRECTIONS)
    backends = args.backends or (("kernel", "torch") if cpu else BACKENDS)
    if cpu:
        backends = tuple(b for b in backends if b != "hybrid" and b not in LAYER_WISE)
    if cpu:
        skipped = [d for d in dirs if d in ("d2d", "both")] + [b for b in backends if b in ("dma", "dma_loop")]
        if skipped:
            print(f"on cpu, skipping {', '.join(skipped)}: every buffer is host memory and there are no copy engines",
                  file=sys.stderr)
        dirs = tuple(d for d in dirs if d not in ("d2d", "both"))
        backends = tuple(b for b in backends if b not in ("dma", "dma_loop"))
        if not dirs or not backends:
            raise SystemExit("nothing to run on cpu: use --directions h2d,d2h and --backends kernel,torch")
    try:
        ctas = tuple(int(x) for x in args.ctas.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"--ctas {args.ctas!r} is not valid: expected a comma list of integers") from None
    if not ctas or min(ctas) < 1:
        raise SystemExit(f"--ctas {args.ctas!r} is not valid: expected positive integers")
    from dynkv.env import env_report

    pool = int(env_report()["cpu_copy_threads"])  # type: ignore[call-overload]
    threads = args.threads or pool
    if threads > pool:
        # dynkv's CPU pool is sized on its first copy; this process has not copied yet.
        os.environ["DYNKV_CPU_THREADS"] = str(threads)
    preset = PRESETS[args.preset]
    slice_bytes = preset.geometry().head_slice(*preset.heads())[1]
    nbytes = args.bytes or (256 * MiB if cpu else GiB)
    blocks = args.blocks or max(1 if cpu else 1000, nbytes // slice_bytes)
    if blocks < 1 or (args.iters is not None and args.iters < 1) or args.warmup < 0:
        raise SystemExit(f"--blocks {blocks}, --iters {args.iters}, --warmup {args.warmup}: expected blocks and "
                         "iters >= 1, warmup >= 0")
    stem = f"kernels-{args.preset}-{device}"
    return Config(
        preset=args.preset, layout=args.layout, device=device, directions=tuple(dirs), backends=tuple(backends),
        ctas=ctas, blocks=blocks, iters=args.iters or (10 if cpu else 20), warmup=args.warmup, threads=threads,
        cta_threads=args.cta_threads,
        json_path=args.json or args.out / f"{stem}.json",
        plot_path=None if args.no_plot else (args.plot or args.out / f"{stem}.png"),
        tile_sweep=args.tile_sweep and not cpu, gemm=args.gemm and not cpu,
        host_pool_gib=0.0 if cpu else args.host_pool,
        launch_bytes=tuple(_parse_size(x) for x in args.launch_bytes.split(",") if x.strip()),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dynkv bench kernels``: run, print the table, write JSON and PNG."""
    cfg = config_from_args(args)
    if cfg.device == "cpu" and (args.tile_sweep or args.gemm or args.host_pool):
        print("--tile-sweep, --gemm and --host-pool measure GPU paths: skipped on cpu", file=sys.stderr)
    report = run(cfg)
    cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.json_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {cfg.json_path}")
    if cfg.plot_path is not None:
        plot(report, cfg.plot_path)
        print(f"wrote {cfg.plot_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dynkv.benchmarks.kernels [options]``: the same as ``dynkv bench kernels``."""
    p = argparse.ArgumentParser(prog="dynkv bench kernels", description=DESCRIPTION)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
