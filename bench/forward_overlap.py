"""A layer-wise load beside a forward that waits for each layer: how much of the copy does the forward hide?

Inside vLLM (H100, 8k-token llama3-8b hits, 2026-12-07) a staged layer-wise
load whose copy alone was 8% faster than the copy kernel's gave a forward about
as long as the device hit's forward plus the whole copy, where the kernel's
loads cost a few ms over it. This probe rebuilds that shape without vLLM: a
load of BLOCKS pages (adjacent host slots, as a fresh pool hands them out) on
the worker's load path, launched the way the worker launches it (the kernel:
one launch per layer from the calling thread; staged: the worker's layer groups,
queued by a launch thread that signals each group), then a "forward" on the
default stream: per layer, a wait for that layer's group, then bf16 matmuls
taking about LAYER_US of the GPU: ``--shape decode`` (16 rows against a
layer-sized weight: memory-bound, as a hit's few new tokens) or ``prefill``
(4096 rows: compute-bound, every SM busy). Each case reports the forward's end
after the load began, against the forward alone and the same load alone
(``hidden``: how much of the copy the forward covered); ``priority`` runs the
load on a stream of priority -1 (the staged chunks' scatter kernels then go
before the forward's). Prints one line per case and writes JSON.

    python3 bench/forward_overlap.py [--blocks 512] [--layer-us 750] [--shape decode|prefill] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import torch

import dynkv.ops
from dynkv.benchmarks.kernels_setup import PRESETS, build_setup
from dynkv.worker.staging import layer_groups


def _layer_work(shape: str, us: float, device: torch.device) -> Any:
    """A callable queueing about ``us`` microseconds of bf16 matmuls on the current stream."""
    rows, k = (16, 4096) if shape == "decode" else (4096, 4096)

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 100  # us per call

    while True:  # decode: widen the weight until one matmul takes `us` (memory-bound), up to 2 GiB
        a = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(k, k, device=device, dtype=torch.bfloat16)
        one = timed(lambda: a @ w)
        if shape == "prefill" or one >= us or k >= 32768:
            break
        k = min(32768, int(k * 1.25) // 64 * 64)
    reps = max(1, round(us / one))

    def work() -> None:
        for _ in range(reps):
            a @ w

    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--layer-us", type=float, default=750.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shape", choices=["decode", "prefill"], default="prefill")
    ap.add_argument("--json")
    args = ap.parse_args()
    s = build_setup(PRESETS[args.preset], device="cuda", blocks=args.blocks)
    g, dev = s.geometry, s.device
    slots, ids = s.slots("load"), s.ids[0]
    layer_work = _layer_work(args.shape, args.layer_us, dev)
    ring = s.staging("load")
    launcher_pool: list[threading.Thread] = []

    def forward(wait: Any) -> None:
        for layer in range(g.num_layers):
            wait(layer)
            layer_work()

    def run(path: str, priority: int, with_forward: bool = True) -> dict[str, float]:
        """One load on ``path`` (and the forward beside it unless not ``with_forward``); times in ms."""
        stream = torch.cuda.Stream(dev, priority=priority)
        groups = layer_groups(g, path)
        group_of = [i for i, (b, e) in enumerate(groups) for _ in range(b, e)]
        events = [torch.cuda.Event() for _ in groups]
        for ev in events:
            ev.record(stream)
        torch.cuda.synchronize()
        signal = dynkv.ops.GroupSignal(len(groups))
        waited: set[int] = set()
        failed: list[BaseException] = []
        t0 = time.perf_counter()
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        copied = torch.cuda.Event(enable_timing=True)
        start.record()
        stream.wait_event(start)
        if path == "kernel":
            dynkv.ops.scatter_layers(s.host, s.view, slots, ids, groups, events=events, stream=stream)
            signal.set_all()
            copied.record(stream)
        else:
            def launch() -> None:
                try:
                    dynkv.ops.staged_scatter(s.host, s.view, slots, ids, ring, groups=groups, events=events,
                                             after=signal, stream=stream)
                    copied.record(stream)
                except BaseException as e:  # reported below, in the main thread
                    failed.append(e)
                finally:
                    signal.set_all()

            th = threading.Thread(target=launch)
            launcher_pool.append(th)
            th.start()
        launched = (time.perf_counter() - t0) * 1e3

        def wait(layer: int) -> None:
            grp = group_of[layer]
            if grp not in waited:
                waited.add(grp)
                signal.wait(grp)
                torch.cuda.current_stream().wait_event(events[grp])

        if with_forward:
            forward(wait)
        done.record()
        done.synchronize()
        if launcher_pool:
            launcher_pool.pop().join()
        if failed:
            raise RuntimeError(f"the {path} load failed in its launch thread") from failed[0]
        torch.cuda.synchronize()
        return {"forward_end_ms": start.elapsed_time(done), "copy_ms": start.elapsed_time(copied),
                "launch_ms": launched}

    # the forward alone; each load alone, then beside the forward
    alone = []
    for _ in range(args.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward(lambda layer: None)
        end.record()
        end.synchronize()
        alone.append(start.elapsed_time(end))
    res: dict[str, Any] = {"preset": args.preset, "blocks": args.blocks, "shape": args.shape,
                           "layer_us": args.layer_us, "device": torch.cuda.get_device_name(),
                           "forward_alone_ms": statistics.median(alone), "cases": {}}
    print(f"forward alone: {res['forward_alone_ms']:.2f} ms ({g.num_layers} layers); "
          f"{args.blocks} pages of {s.slice_bytes >> 10} KiB")
    for path in ("kernel", "staged"):
        for priority in (0, -1):
            copy_alone = statistics.median(
                [run(path, priority, with_forward=False)["copy_ms"] for _ in range(args.repeats + 1)][1:])
            runs = [run(path, priority) for _ in range(args.repeats + 1)][1:]  # the first warms up
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            name = f"{path}, priority {priority}"
            hidden = res["forward_alone_ms"] + copy_alone - med["forward_end_ms"]
            res["cases"][name] = {"copy_alone_ms": copy_alone, "median": med, "hidden_ms": hidden, "runs": runs}
            lo, hi = min(r["forward_end_ms"] for r in runs), max(r["forward_end_ms"] for r in runs)
            print(f"{name}: forward ends {med['forward_end_ms']:.2f} ms after the load began ({lo:.2f}-{hi:.2f}); "
                  f"the load alone {copy_alone:.2f} ms, beside the forward {med['copy_ms']:.2f} ms; "
                  f"{hidden:.2f} ms of it hidden; launch {med['launch_ms']:.2f} ms on the calling thread")
    s.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
