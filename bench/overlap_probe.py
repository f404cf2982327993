"""Do a load and a store on the copy engines overlap? It depends on the pieces, it seems.

``dynkv bench kernels --directions both`` finds llama3-70b-tp8's staged loads and stores
serialised (their time at once is the sum of their times alone) where llama3-8b's overlap.
70b copies a rank's eighth of each host page (0.625 MiB every 5 MiB); 8b whole 2 MiB pages.
This probe separates the candidates with plain driver copies, no dynkv code: the piece size,
the host address span the pieces are spread over, and the host pages (4 KiB pinned pages vs
transparent huge pages). Each case moves about 1 GiB per direction as one ``cuMemcpy*Async``
per piece, H2D on one stream and D2H on another, alone and at once (both streams held behind
a GPU sleep until every copy is queued). Prints one line per case and writes JSON.

    python3 bench/overlap_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics

import torch

MIB = 1 << 20
CU = ctypes.CDLL("libcuda.so.1")
for _name in ("cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2"):
    getattr(CU, _name).restype = ctypes.c_int
CU.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
CU.cuMemcpyDtoHAsync_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]


def _check(rc: int) -> None:
    if rc:
        raise RuntimeError(f"CUDA driver error {rc}")


class HostRegion:
    """Pinned host memory: cudaHostAlloc (torch) or an mmap with MADV_HUGEPAGE, then cudaHostRegister."""

    def __init__(self, nbytes: int, huge: bool | str):
        self.huge = huge
        if huge:
            if huge == "memfd":  # shared memory, as dynkv's host pool; huge only if shmem_enabled allows
                fd = os.memfd_create("overlap-probe")
                os.ftruncate(fd, nbytes)
                self.mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
                os.close(fd)
            else:
                self.mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.mm.madvise(mmap.MADV_HUGEPAGE)
            buf = (ctypes.c_char * nbytes).from_buffer(self.mm)
            self.ptr = ctypes.addressof(buf)
            ctypes.memset(self.ptr, 1, nbytes)
            del buf
            _check(int(torch.cuda.cudart().cudaHostRegister(self.ptr, nbytes, 0)))
        else:
            self.t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.t.fill_(1)
            self.ptr = self.t.data_ptr()


def run_case(src: HostRegion, dst: HostRegion, dev_in, dev_out, piece: int, stride: int, total: int,
             iters: int) -> dict:
    n = min(total // piece, 4096)  # small pieces: fewer copies, so that they all queue before the gate opens
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    h1, h2 = ctypes.c_void_p(s1.cuda_stream), ctypes.c_void_p(s2.cuda_stream)
    din, dout = dev_in.data_ptr(), dev_out.data_ptr()

    def once(which: str) -> float:
        gate, start = torch.cuda.Event(), torch.cuda.Event(enable_timing=True)
        ends = []
        with torch.cuda.stream(s1):
            torch.cuda._sleep(max(60_000_000, 40_000 * n))  # >= 30 ms: every copy is queued before any starts
            gate.record(s1)
            start.record(s1)
        s2.wait_event(gate)
        for i in range(n):
            if which in ("h2d", "both"):
                _check(CU.cuMemcpyHtoDAsync_v2(din + i * piece, src.ptr + i * stride, piece, h1))
            if which in ("d2h", "both"):
                _check(CU.cuMemcpyDtoHAsync_v2(dst.ptr + i * stride, dout + i * piece, piece, h2))
        for s in (s1, s2):
            e = torch.cuda.Event(enable_timing=True)
            e.record(s)
            ends.append(e)
        torch.cuda.synchronize()
        return max(start.elapsed_time(e) for e in ends) / 1e3

    out = {"piece_mib": piece / MIB, "stride_mib": stride / MIB, "span_gib": n * stride / (1 << 30),
           "huge": src.huge, "copies": n}
    for which in ("h2d", "d2h", "both"):
        once(which)
        ts = [once(which) for _ in range(iters)]
        t = statistics.median(ts)
        moved = n * piece * (2 if which == "both" else 1)
        out[which + "_ms"] = round(t * 1e3, 2)
        out[which + "_gbs"] = round(moved / t / 1e9, 2)
    out["overlap"] = round((out["h2d_ms"] + out["d2h_ms"]) / out["both_ms"], 2)  # 1.0: serial; 2.0: full
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    total = 1 << 30
    span = 8 * (1 << 30) + 64 * MIB
    dev_in = torch.empty(total, dtype=torch.uint8, device="cuda")
    dev_out = torch.ones(total, dtype=torch.uint8, device="cuda")
    regions = {False: (HostRegion(span, False), HostRegion(span, False))}
    cases = [(1 << 30, 1 << 30, False), (2 * MIB, 2 * MIB, False), (640 << 10, 640 << 10, False),
             (640 << 10, 5 * MIB, False), (2 * MIB, 16 * MIB, False), (64 << 10, 64 << 10, False),
             (64 << 10, 512 << 10, False), (640 << 10, 5 * MIB, True), (2 * MIB, 2 * MIB, True),
             (640 << 10, 5 * MIB, "memfd")]
    results = []
    for knob in ("enabled", "shmem_enabled"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{knob}") as f:
                print(f"transparent_hugepage/{knob}: {f.read().strip()}")
        except OSError as e:
            print(f"transparent_hugepage/{knob}: {e}")
    print(f"{torch.cuda.get_device_name()}; 1 GiB a direction; overlap = (h2d + d2h) / both: 1 serial, 2 full")
    for piece, stride, huge in cases:
        if huge not in regions:
            regions[huge] = (HostRegion(span, huge), HostRegion(span, huge))
            with open("/proc/meminfo") as f:
                print(" ".join(line.strip() for line in f if line.startswith(("AnonHugePages", "ShmemHugePages"))).strip())
        src, dst = regions[huge]
        r = run_case(src, dst, dev_in, dev_out, piece, stride, total, args.iters)
        results.append(r)
        print(f"piece {r['piece_mib']:7.3f} MiB stride {r['stride_mib']:7.3f} MiB span {r['span_gib']:5.2f} GiB "
              f"huge={huge!s:5} copies {r['copies']:5d}: h2d {r['h2d_gbs']:6.2f} d2h {r['d2h_gbs']:6.2f} "
              f"both {r['both_gbs']:6.2f} GB/s  overlap {r['overlap']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
