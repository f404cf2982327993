"""Does a queue-bound copy launch hold up other threads' kernel launches?

A layer-wise staged load with host pages in shuffled slots is one copy-engine
operation per page and layer group; past a few thousand the driver's queue is
full and the thread that enqueues them waits for the GPU (2026-12-07 H100 note).
Moving that enqueue to a thread of its own helps the forward only if the
forward's launches on another stream do not wait too. This probe measures it:

- ``inline``: how long one thread takes to enqueue the load (``staged_scatter``
  of BLOCKS shuffled pages in the worker's layer groups), against the copy's time;
- ``alone``: a second stream's launch latency (LAUNCHES tiny kernels, each launch
  timed on the host) with nothing else running;
- ``beside``: the same launches from the main thread while another thread
  enqueues the load.

If ``beside`` stays near ``alone`` while the load's enqueue lasts about as long
as its copy, a launch thread frees the forward. Prints one line per case and
writes JSON.

    python3 bench/launch_probe.py [--preset llama3-8b] [--blocks 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

import dynkv.ops
from dynkv.benchmarks.kernels_setup import PRESETS, build_setup, layer_wise_slots
from dynkv.worker.staging import layer_groups


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def launches(n: int, x: torch.Tensor, stream: torch.cuda.Stream) -> list[float]:
    """``n`` tiny kernel launches on ``stream``; each launch's host time in microseconds."""
    out = []
    with torch.cuda.stream(stream):
        for _ in range(n):
            t = time.perf_counter()
            x.add_(1.0)
            out.append((time.perf_counter() - t) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--blocks", type=int, default=2000)
    ap.add_argument("--launches", type=int, default=2000)
    ap.add_argument("--json")
    args = ap.parse_args()
    s = build_setup(PRESETS[args.preset], device="cuda", blocks=args.blocks)
    groups = layer_groups(s.geometry, "staged")
    slots = layer_wise_slots(s.slots("load"), "staged_shuffled")
    ring = s.staging("load")
    copies = len(dynkv.ops.staged_copy_plan(s.host, s.view, slots, ring, groups=groups))
    load_stream, other = torch.cuda.Stream(), torch.cuda.Stream()
    x = torch.zeros(256, device="cuda")

    def load() -> float:
        """Enqueue the load on its stream; the enqueue's host time in ms."""
        t = time.perf_counter()
        with torch.cuda.stream(load_stream):
            dynkv.ops.staged_scatter(s.host, s.view, slots, s.ids[0], ring, groups=groups, stream=load_stream)
        return (time.perf_counter() - t) * 1e3

    load()  # warm-up: the ring, the batch API's first call
    torch.cuda.synchronize()
    res: dict = {"preset": args.preset, "blocks": args.blocks, "groups": len(groups), "copies": copies,
                 "device": torch.cuda.get_device_name(), "runs": []}
    for run in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        enq = load()
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) * 1e3
        alone = launches(args.launches, x, other)
        torch.cuda.synchronize()
        side: dict[str, float] = {}
        th = threading.Thread(target=lambda: side.__setitem__("enqueue_ms", load()))
        t1 = time.perf_counter()
        th.start()
        time.sleep(0.002)  # let the load's thread fill the queue first
        beside = launches(args.launches, x, other)
        beside_ms = (time.perf_counter() - t1) * 1e3
        th.join()
        torch.cuda.synchronize()
        r = {"inline_enqueue_ms": enq, "inline_total_ms": total, "side_enqueue_ms": side.get("enqueue_ms"),
             "beside_window_ms": beside_ms,
             "alone_us": {"p50": statistics.median(alone), "p99": _pct(alone, 0.99), "max": max(alone)},
             "beside_us": {"p50": statistics.median(beside), "p99": _pct(beside, 0.99), "max": max(beside)}}
        res["runs"].append(r)
        print(f"run {run}: {copies} copies in {len(groups)} groups; inline enqueue {enq:.1f} ms of {total:.1f} ms; "
              f"side thread's enqueue {r['side_enqueue_ms']:.1f} ms; other stream's launches alone "
              f"p50/p99/max {r['alone_us']['p50']:.1f}/{r['alone_us']['p99']:.1f}/{r['alone_us']['max']:.0f} us, "
              f"beside p50/p99/max {r['beside_us']['p50']:.1f}/{r['beside_us']['p99']:.1f}/"
              f"{r['beside_us']['max']:.0f} us ({args.launches} launches in {beside_ms:.1f} ms)")
    s.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
