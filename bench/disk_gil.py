"""Disk-tier reads (page by page, and batched) with the process idle, next to a busy thread, or a busy process.

Inside vLLM the scheduler's thread stays busy while a disk-tier hit loads, and
the disk tier's I/O threads share its interpreter lock. This measures what
that costs: a thread that only spins (holding the lock between switches) next
to the readers, against a spinning separate process (the same CPU load, no
shared lock). Batched reads run once per ``--chunks`` value (how many pages
in a row one thread reads, :attr:`DiskTier.read_chunk`; 0: one contiguous
share per thread), and ``dd iflag=direct`` reads the same records for scale.

    python bench/disk_gil.py [--dir DIR] [--pages 192] [--threads 4] [--chunks 0,4] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import multiprocessing as mp
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

from dynkv.tiers.disk import DiskTier

PAGE = 2 << 20  # a Llama-3-8B page (16-token blocks, bf16)


def _spin(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="directory of the disk tier (default: a temporary one under the working directory)")
    p.add_argument("--pages", type=int, default=192)
    p.add_argument("--threads", type=int, default=4, help="disk I/O threads")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dest", choices=["anon", "pool"], default="anon",
                   help="read into anonymous memory, or into a named host pool (shared memory, pinned on a GPU host)")
    p.add_argument("--chunks", default="0", help="read_chunk values of the batched reads, comma-separated")
    p.add_argument("--modes", default="idle,busy thread,busy process", help="what runs beside the readers")
    p.add_argument("--json")
    a = p.parse_args()
    root = a.dir or tempfile.mkdtemp(prefix="dynkv-disk-gil-", dir=".")
    n = a.pages
    if a.dest == "pool":
        from dynkv.memory import HostPool

        pool = HostPool.create(PAGE * n, name=f"dynkv-disk-gil-{os.getpid()}")
        view = memoryview(pool.as_tensor().numpy())
        print(f"destination: host pool {pool.name} (pinned={pool.pinned})", flush=True)
    else:
        view = memoryview(mmap.mmap(-1, PAGE * n))
    for i in range(n):
        view[i * PAGE : (i + 1) * PAGE] = os.urandom(16) * (PAGE // 16)
    keys = [hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(n)]
    tier = DiskTier([root], n, PAGE, fingerprint=b"disk-gil", direct_io=True, io_threads=a.threads)
    results: dict[str, list[float]] = {}
    try:
        for f in [tier.write(i, keys[i], view[i * PAGE : (i + 1) * PAGE]) for i in range(n)]:
            f.result()

        def read_all(api: str) -> float:
            t0 = time.perf_counter()
            if api == "dd":
                path, off = tier.location(0)
                subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=64M", f"skip={off}",
                                f"count={n * tier.record_bytes}", "iflag=direct,skip_bytes,count_bytes",
                                "status=none"], check=True)
                return time.perf_counter() - t0
            if api.startswith("read_many"):
                tier.read_chunk = int(api.split("=")[1])
                futs = tier.read_many([(i, keys[i], view[i * PAGE : (i + 1) * PAGE]) for i in range(n)])
            else:
                futs = [tier.read(i, keys[i], view[i * PAGE : (i + 1) * PAGE]) for i in range(n)]
            for f in futs:
                f.result()
            return time.perf_counter() - t0

        apis = ["dd", "read"] + [f"read_many chunk={c}" for c in a.chunks.split(",")]
        for mode in a.modes.split(",") * 2:
            stop: Any = threading.Event() if mode != "busy process" else mp.Event()
            other: Any = None
            if mode == "busy thread":
                other = threading.Thread(target=_spin, args=(stop,))
            elif mode == "busy process":
                other = mp.Process(target=_spin, args=(stop,))
            if other is not None:
                other.start()
            for api in apis:
                best = min(read_all(api) for _ in range(a.repeat))
                results.setdefault(f"{mode}, {api}", []).append(n * PAGE / best / 1e9)
                print(f"{mode:>13}, {api:>20}: {n * PAGE / best / 1e9:.2f} GB/s ({best * 1e3:.0f} ms for {n} pages "
                      f"of 2 MiB, {a.threads} I/O threads)", flush=True)
            stop.set()
            if other is not None:
                other.join()
    finally:
        tier.close()
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"pages": n, "page_bytes": PAGE, "threads": a.threads, "dest": a.dest, "gbps": results,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}, f, indent=1)


if __name__ == "__main__":
    main()
