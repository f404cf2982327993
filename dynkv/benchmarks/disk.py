"""Disk tier bandwidth bench (``dynkv bench disk``).

Writes then reads ``--pages`` pages of ``--page-mb`` MiB through
:class:`~dynkv.tiers.disk.DiskTier` at each ``--threads`` count, and in the same run
the baseline: ``dd`` with ``oflag=direct`` / ``iflag=direct`` moving the same
bytes in 64 MiB blocks on the same file system (where ``dd`` is missing or
fails, a plain sequential ``O_DIRECT`` ``os.pwrite``/``os.preadv`` loop).
Every figure is also a ratio to that baseline.

GB/s is decimal (1e9 bytes/s) over payload bytes (a page's 4 KiB header is not
counted), the median of ``--repeat`` passes. A write pass ends with an
``fdatasync`` (``dd``: ``conv=fdatasync``). With ``--no-direct`` the page cache
is dropped for the files (``POSIX_FADV_DONTNEED``) before each read pass, so
reads come from the device. One untimed write pass runs first, on each side,
so no timing pays the first write into freshly allocated extents. The same
run reports ``zlib.crc32`` on one core: the disk tier checksums every page on
both paths.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any

from dynkv.benchmarks.output import print_or_write
from dynkv.tiers.disk import DiskTier
from dynkv.tiers.diskfile import ALIGN, record_size

__all__ = ["DESCRIPTION", "Config", "add_arguments", "aligned_pages", "baseline", "crc32_gbps", "format_report",
           "fs_type", "main", "run", "run_from_args", "tier_passes", "timed_pass"]

DESCRIPTION = ("GB/s of the disk tier writing then reading pages at several I/O thread counts, next to dd "
               "(O_DIRECT, 64 MiB blocks) of the same bytes measured in the same run")
MiB = 1 << 20
BLOCK = 64 * MiB
_FP = hashlib.blake2b(b"dynkv bench disk", digest_size=16).digest()


@dataclass(frozen=True)
class Config:
    path: str
    page_bytes: int
    pages: int
    threads: tuple[int, ...]
    direct: bool
    repeat: int
    baseline: str  # "auto", "dd" or "python"

    @property
    def nbytes(self) -> int:
        return self.pages * self.page_bytes


def fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (``/proc/self/mountinfo``), or ``"unknown"``."""
    real, best, kind = os.path.realpath(path), "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mount = left.split()[4].replace("\\040", " ")
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, kind = mount, right.split()[0]
    except OSError:
        pass
    return kind


def crc32_gbps(page_bytes: int, seconds: float = 0.2) -> float:
    """``zlib.crc32`` GB/s over one page on one thread."""
    buf = os.urandom(page_bytes)
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        zlib.crc32(buf)
        n += 1
    return n * page_bytes / dt / 1e9


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _dd(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True, capture_output=True)
    return time.perf_counter() - t0


def _python_pass(path: str, nbytes: int, block: int, write: bool) -> tuple[float, bool]:
    """Seconds for one sequential pass with ``O_DIRECT`` (buffered where refused), and whether it was direct."""
    flags = os.O_RDWR | os.O_CREAT
    try:
        fd, direct = os.open(path, flags | os.O_DIRECT, 0o600), True
    except OSError:
        fd, direct = os.open(path, flags, 0o600), False
    buf = memoryview(mmap.mmap(-1, block))
    buf[:] = os.urandom(64) * (block // 64)
    try:
        if not write and not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for off in range(0, nbytes, block):
            n = min(block, nbytes - off)
            if write:
                os.pwrite(fd, buf[:n], off)
            else:
                os.preadv(fd, [buf[:n]], off)
        if write:
            os.fdatasync(fd)
        return time.perf_counter() - t0, direct
    finally:
        os.close(fd)


def baseline(work: str, nbytes: int, repeat: int, tool: str = "auto") -> dict[str, Any]:
    """Sequential write then read GB/s of ``nbytes`` (rounded up to 4 KiB) in a scratch file under ``work``.

    ``tool``: ``dd`` (O_DIRECT, 64 MiB blocks), ``python`` (the same with
    ``os.pwrite``/``os.preadv``), or ``auto`` (``dd`` if it is there and works).
    """
    block = min(BLOCK, -(-nbytes // ALIGN) * ALIGN)
    count = -(-nbytes // block)
    total = block * count
    path = os.path.join(work, "baseline.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, total)
    finally:
        os.close(fd)
    use_dd = tool == "dd" or (tool == "auto" and shutil.which("dd") is not None)
    out: dict[str, Any] = {"bytes": total, "block_bytes": block}
    if use_dd:
        wargs = ["if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", "oflag=direct",
                 "conv=notrunc,fdatasync"]
        rargs = [f"if={path}", "of=/dev/null", f"bs={block}", f"count={count}", "iflag=direct"]
        try:
            _dd(wargs)  # warm-up: the first write converts the preallocated extents
            w = [_dd(wargs) for _ in range(repeat)]
            r = [_dd(rargs) for _ in range(repeat)]
            out.update(tool="dd", direct=True)
        except (OSError, subprocess.CalledProcessError) as e:
            if tool == "dd":
                raise
            print(f"dd failed ({e}); the baseline is a Python O_DIRECT loop", file=sys.stderr)
            use_dd = False
    if not use_dd:
        _python_pass(path, total, block, write=True)
        w = [_python_pass(path, total, block, write=True)[0] for _ in range(repeat)]
        passes = [_python_pass(path, total, block, write=False) for _ in range(repeat)]
        r = [t for t, _ in passes]
        out.update(tool="python", direct=passes[0][1])
    os.unlink(path)
    out.update(write_s=w, read_s=r, write_gbps=total / statistics.median(w) / 1e9,
               read_gbps=total / statistics.median(r) / 1e9)
    return out


def aligned_pages(count: int, page_bytes: int) -> list[memoryview]:
    """``count`` page-aligned pages of random bytes (the tier writes them in place)."""
    stride = -(-page_bytes // ALIGN) * ALIGN
    m = memoryview(mmap.mmap(-1, count * stride))
    pages = [m[i * stride : i * stride + page_bytes] for i in range(count)]
    for p in pages:
        p[:] = os.urandom(64) * (page_bytes // 64) + os.urandom(page_bytes % 64)
    return pages


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def timed_pass(tier: DiskTier, bufs: list[memoryview], write: bool, window: int) -> float:
    """Seconds to move every page once, at most ``window`` in flight (so no two share a buffer)."""
    inflight: deque[Future[None]] = deque()
    t0 = time.perf_counter()
    for i in range(tier.num_pages):
        if len(inflight) >= window:
            inflight.popleft().result()
        op = tier.write if write else tier.read
        inflight.append(op(i, _key(i), bufs[i % len(bufs)]))
    for f in inflight:
        f.result()
    if write:
        tier.flush()
    return time.perf_counter() - t0


def tier_passes(tier: DiskTier, src: list[memoryview], dst: list[memoryview],
                repeat: int) -> tuple[list[float], list[float]]:
    """Timed write passes from ``src``, then timed read passes into ``dst``, of every slot of ``tier``.

    Returns (write seconds, read seconds). ``len(dst)`` pages are in flight at
    most, so no two reads share a buffer.
    """
    w = [timed_pass(tier, src, True, len(dst)) for _ in range(repeat)]
    r = []
    for _ in range(repeat):
        if not tier.direct_io_active:
            for f in tier.files:
                _drop_cache(f)
        r.append(timed_pass(tier, dst, False, len(dst)))
    return w, r


def run(cfg: Config) -> dict[str, Any]:
    """Run the bench of ``cfg``; returns the report that goes to JSON."""
    from dynkv.env import env_report

    os.makedirs(cfg.path, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dynkv-bench-disk-", dir=cfg.path)
    try:
        base = baseline(work, cfg.nbytes, cfg.repeat, cfg.baseline)
        crc = crc32_gbps(cfg.page_bytes)
        window = 2 * max(cfg.threads)
        src, dst = aligned_pages(window, cfg.page_bytes), aligned_pages(window, cfg.page_bytes)
        rows, direct_active, warm = [], None, False
        for threads in cfg.threads:
            with DiskTier([work], cfg.pages, cfg.page_bytes, fingerprint=_FP, direct_io=cfg.direct,
                          io_threads=threads) as tier:
                direct_active = tier.direct_io_active
                if not warm:
                    timed_pass(tier, src, True, window)
                    warm = True
                w, r = tier_passes(tier, src, dst, cfg.repeat)
            wg, rg = cfg.nbytes / statistics.median(w) / 1e9, cfg.nbytes / statistics.median(r) / 1e9
            rows.append({"threads": threads, "write_s": w, "read_s": r, "write_gbps": wg, "read_gbps": rg,
                         "write_pct_of_baseline": 100 * wg / base["write_gbps"],
                         "read_pct_of_baseline": 100 * rg / base["read_gbps"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"env": env_report(), "config": {**asdict(cfg), "nbytes": cfg.nbytes},
            "fs": {"path": os.path.realpath(cfg.path), "type": fs_type(cfg.path), "direct_io_active": direct_active,
                   "record_bytes": record_size(cfg.page_bytes)},
            "baseline": base, "crc32_gbps": crc, "zlib": zlib.ZLIB_RUNTIME_VERSION, "results": rows}


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"


def format_report(report: dict[str, Any]) -> str:
    """The report as a table of GB/s per thread count and % of the baseline."""
    cfg, fs, base = report["config"], report["fs"], report["baseline"]
    io = "O_DIRECT" if fs["direct_io_active"] else "buffered (page cache dropped before reads)"
    lines = [
        f"{cfg['pages']} pages of {_size(cfg['page_bytes'])} ({_size(cfg['nbytes'])}) in {fs['path']} "
        f"({fs['type']}, {io}), median of {cfg['repeat']}",
        f"baseline {base['tool']} ({_size(base['block_bytes'])} blocks, "
        f"{'O_DIRECT' if base['direct'] else 'buffered'}): "
        f"write {base['write_gbps']:.2f} GB/s, read {base['read_gbps']:.2f} GB/s",
        f"zlib.crc32 on one thread: {report['crc32_gbps']:.2f} GB/s (zlib {report['zlib']})",
        f"{'threads':>8}{'write GB/s':>12}{'% base':>8}{'read GB/s':>12}{'% base':>8}",
    ]
    for r in report["results"]:
        lines.append(f"{r['threads']:>8}{r['write_gbps']:>12.2f}{r['write_pct_of_baseline']:>8.1f}"
                     f"{r['read_gbps']:>12.2f}{r['read_pct_of_baseline']:>8.1f}")
    return "\n".join(lines)


def _threads(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected a comma list of positive integers")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dynkv bench disk``; with none, 512 MiB of 2 MiB pages in ./dynkv-bench."""
    p.add_argument("--path", default="dynkv-bench", help="directory on the file system to measure (a scratch "
                   "directory is made in it and removed after; default: ./dynkv-bench)")
    p.add_argument("--page-mb", type=float, default=2.0, help="MiB per page (default 2: a llama3-8b bf16 page of "
                   "16 tokens)")
    p.add_argument("--pages", type=int, default=256, help="pages per pass (default 256)")
    p.add_argument("--threads", type=_threads, default=(1, 2, 4, 8), help="I/O thread counts (default 1,2,4,8)")
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=True,
                   help="O_DIRECT for the tier's files (default on)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per direction (median reported; default 3)")
    p.add_argument("--baseline", choices=["auto", "dd", "python"], default="auto",
                   help="dd with O_DIRECT, or the Python O_DIRECT loop (auto: dd when present)")
    p.add_argument("--json", help="write the JSON report to this path ('-': print it instead of the table)")


def config_from_args(args: argparse.Namespace) -> Config:
    page_bytes = int(args.page_mb * MiB)
    if page_bytes < 1 or args.pages < 1 or args.repeat < 1:
        raise SystemExit(f"--page-mb {args.page_mb}, --pages {args.pages}, --repeat {args.repeat}: expected a page "
                         "of at least one byte, and pages and repeat >= 1")
    return Config(path=args.path, page_bytes=page_bytes, pages=args.pages, threads=tuple(args.threads),
                  direct=args.direct, repeat=args.repeat, baseline=args.baseline)


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dynkv bench disk``: run, print the table, write JSON."""
    report = run(config_from_args(args))
    print_or_write(report, args.json, format_report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dynkv.benchmarks.disk [options]``: the same as ``dynkv bench disk``."""
    p = argparse.ArgumentParser(prog="dynkv bench disk", description=DESCRIPTION)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
