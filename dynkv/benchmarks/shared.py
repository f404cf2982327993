"""``dynkv bench shared``: the shared tier's page put/get GB/s against the store's own batched calls.

One run, one store, the same pages: dynkv's :class:`~dynkv.tiers.shared.tier.SharedTier`
writes them from a host-pool-like buffer (header and CRC-32C, batched put; as
the leader writes the pages it computed, without asking the store first) and
reads them back into a second one (batched get, checks), both registered with
the tier as the leader's host pool is and reused pass after pass, on its I/O
threads; the baseline moves values of the same size with the store's own
client, in the same batches on as many threads: pipelined ``SET``/``GET`` on
Redis, ``batch_put_from``/``batch_get_into`` from registered memory on
Mooncake. Each pass uses fresh keys and deletes them after; the median pass is
reported as GB/s and as dynkv's ratio to the baseline (target >= 0.8).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dynkv.benchmarks.output import print_or_write
from dynkv.tiers.shared.base import redact, scheme_of
from dynkv.tiers.shared.tier import HEADER_BYTES, SharedTier, store_key

__all__ = ["DESCRIPTION", "Config", "add_arguments", "format_report", "run", "run_from_args"]

DESCRIPTION = ("GB/s of the shared tier putting then getting pages, next to the store's own batched put/get of "
               "values of the same size (pipelined SET/GET on Redis, batch_put_from/batch_get_into on Mooncake)")
TARGET = 0.8
KiB = 1 << 10


@dataclass(frozen=True)
class Config:
    url: str
    page_bytes: int = 512 * KiB
    pages: int = 128
    batch_pages: int = 16
    threads: int = 2
    repeat: int = 3


def _median_gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


def _dynkv_pass(tier: SharedTier, keys: list[bytes], pool: np.ndarray, pool_in: np.ndarray) -> tuple[float, float]:
    t0 = time.perf_counter()
    # As the leader writes pages it computed: without asking the store first.
    futs = tier.write_many([(k, memoryview(pool[i])) for i, k in enumerate(keys)], check=False)
    ok = [f.result(timeout=600) for f in futs]
    t1 = time.perf_counter()
    if not all(ok):
        raise RuntimeError(f"the store refused {ok.count(False)} of {len(ok)} pages: give it more memory")
    pool_in.fill(0xFF)  # poison; also maps every page before the clock starts, as the baseline's dst is
    t2 = time.perf_counter()
    errs = [f.exception(timeout=600) for f in tier.read_many([(k, memoryview(pool_in[i])) for i, k in enumerate(keys)])]
    t3 = time.perf_counter()
    bad = [e for e in errs if e is not None]
    if bad or not np.array_equal(pool_in, pool):
        raise RuntimeError(f"pages did not come back whole: {bad[:3]}")
    return t1 - t0, t3 - t2


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _baseline_redis(client: Any, keys: list[str], values: list[bytes], cfg: Config,
                    pool: ThreadPoolExecutor) -> tuple[float, float]:
    def put(r: range) -> None:
        pipe = client.pipeline(transaction=False)
        for i in r:
            pipe.set(keys[i], values[i])
        pipe.execute()

    def get(r: range) -> list[bytes]:
        pipe = client.pipeline(transaction=False)
        for i in r:
            pipe.get(keys[i])
        return pipe.execute()

    return _timed(put, get, len(keys), cfg, pool, lambda got: all(len(v) == len(values[0]) for v in got))


def _baseline_mooncake(client: Any, keys: list[str], src: np.ndarray, dst: np.ndarray, cfg: Config,
                       pool: ThreadPoolExecutor) -> tuple[float, float]:
    n = src.shape[1]

    def put(r: range) -> list[int]:
        return client.batch_put_from([keys[i] for i in r], [int(src[i].ctypes.data) for i in r], [n] * len(r))

    def get(r: range) -> list[int]:
        return client.batch_get_into([keys[i] for i in r], [int(dst[i].ctypes.data) for i in r], [n] * len(r))

    return _timed(put, get, len(keys), cfg, pool, lambda got: all(x == n for x in got))


def _timed(put: Callable[[range], Any], get: Callable[[range], Any], n: int, cfg: Config, pool: ThreadPoolExecutor,
           good: Callable[[Any], bool]) -> tuple[float, float]:
    batches = _batches(n, cfg.batch_pages)
    t0 = time.perf_counter()
    list(pool.map(put, batches))
    t1 = time.perf_counter()
    got = list(pool.map(get, batches))
    t2 = time.perf_counter()
    if not all(good(g) for g in got):
        raise RuntimeError("the store's own get did not return every value whole")
    return t1 - t0, t2 - t1


def run(cfg: Config) -> dict[str, Any]:
    """Run the bench; a JSON-able report (env, config, per-pass seconds, GB/s, ratios)."""
    from dynkv.env import env_report

    scheme = scheme_of(cfg.url)
    rng = np.random.default_rng(0)
    host = rng.integers(0, 256, (cfg.pages, cfg.page_bytes), dtype=np.uint8)
    fp = bytes(rng.integers(0, 256, 16, dtype=np.uint8))
    namespace = f"dynkv-bench-{uuid.uuid4().hex[:8]}"
    tier = SharedTier(cfg.url, fingerprint=fp, page_bytes=cfg.page_bytes, namespace=namespace,
                      batch_pages=cfg.batch_pages, timeout_s=30.0, lookup_timeout_s=30.0, io_threads=cfg.threads)
    if tier.backend is None:
        tier.close()
        raise SystemExit(f"dynkv bench shared: cannot reach {redact(cfg.url)}")
    # Pages come back into other host pages, registered with the tier as the leader's host pool is.
    host_in = np.empty_like(host)
    tier.register(memoryview(host).cast("B"))
    tier.register(memoryview(host_in).cast("B"))
    backend: Any = tier.backend
    value_bytes = HEADER_BYTES + cfg.page_bytes
    passes: dict[str, list[float]] = {"dynkv_put": [], "dynkv_get": [], "store_put": [], "store_get": []}
    lookups: list[float] = []
    pool = ThreadPoolExecutor(cfg.threads)
    try:
        if scheme == "mooncake":
            src = np.zeros((cfg.pages, value_bytes), dtype=np.uint8)
            src[:, HEADER_BYTES:] = host
            dst = np.empty_like(src)
            backend.register(memoryview(src).cast("B"))
            backend.register(memoryview(dst).cast("B"))
        else:
            values = [bytes(HEADER_BYTES) + host[i].tobytes() for i in range(cfg.pages)]
        for p in range(cfg.repeat):
            keys = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(cfg.pages)]
            put_s, get_s = _dynkv_pass(tier, keys, host, host_in)
            t0 = time.perf_counter()
            found = tier.count_stored(keys)
            lookups.append(time.perf_counter() - t0)
            if found != cfg.pages:
                raise RuntimeError(f"lookup found {found} of {cfg.pages} pages just written")
            backend.remove([store_key(namespace, fp, k) for k in keys])
            raw = [f"{namespace}:raw:{p}:{i}" for i in range(cfg.pages)]
            if scheme == "mooncake":
                b_put, b_get = _baseline_mooncake(backend.client, raw, src, dst, cfg, pool)
            else:
                b_put, b_get = _baseline_redis(backend.client, raw, values, cfg, pool)
            backend.remove(raw)
            for name, s in zip(passes, (put_s, get_s, b_put, b_get)):
                passes[name].append(s)
    finally:
        pool.shutdown()
        tier.close()
    nbytes = cfg.pages * cfg.page_bytes
    gbps = {name: _median_gbps(nbytes, s) for name, s in passes.items()}
    ratios = {"put": gbps["dynkv_put"] / gbps["store_put"], "get": gbps["dynkv_get"] / gbps["store_get"]}
    return {"env": env_report(), "config": {**asdict(cfg), "url": redact(cfg.url), "store": scheme,
                                            "value_bytes": value_bytes},
            "seconds": passes, "gbps": gbps, "ratio": ratios, "target": TARGET,
            "meets_target": {k: v >= TARGET for k, v in ratios.items()},
            "lookup_ms_median": statistics.median(lookups) * 1e3}


def format_report(report: dict[str, Any]) -> str:
    """The report as a small table."""
    c, g, r = report["config"], report["gbps"], report["ratio"]
    lines = [f"dynkv bench shared: {c['store']} {c['url']}, {c['pages']} pages of {c['page_bytes'] / KiB:g} KiB, "
             f"batches of {c['batch_pages']}, {c['threads']} threads, median of {c['repeat']}",
             f"{'':6} {'dynkv GB/s':>11} {'store GB/s':>11} {'ratio':>7}"]
    for d in ("put", "get"):
        ok = "ok" if report["meets_target"][d] else f"below {report['target']:g}"
        lines.append(f"{d:6} {g[f'dynkv_{d}']:11.3f} {g[f'store_{d}']:11.3f} {r[d]:7.2f}  {ok}")
    lines.append(f"lookup of {c['pages']} pages: {report['lookup_ms_median']:.2f} ms (median)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dynkv bench shared``."""
    p.add_argument("--url", required=True, help="the store: redis://HOST:PORT[/DB], redis+cluster://..., "
                   "mooncake://MASTER:PORT[?segment_mb=...] (its segment must hold the pages twice)")
    p.add_argument("--page-kib", type=int, default=512, help="KiB per page (default 512)")
    p.add_argument("--pages", type=int, default=128, help="pages per pass (default 128)")
    p.add_argument("--batch-pages", type=int, default=16, help="pages per store call (default 16)")
    p.add_argument("--threads", type=int, default=2, help="I/O threads, dynkv's and the baseline's (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="passes (median reported; default 3)")
    p.add_argument("--json", help="write the JSON report to this path ('-': print it instead of the table)")


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dynkv bench shared``: run, print the table, write JSON."""
    if min(args.page_kib, args.pages, args.batch_pages, args.threads, args.repeat) < 1:
        raise SystemExit("--page-kib, --pages, --batch-pages, --threads and --repeat take integers >= 1")
    report = run(Config(args.url, args.page_kib * KiB, args.pages, args.batch_pages, args.threads, args.repeat))
    print_or_write(report, args.json, format_report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dynkv.benchmarks.shared [options]``: the same as ``dynkv bench shared``."""
    p = argparse.ArgumentParser(prog="dynkv bench shared", description=DESCRIPTION)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
