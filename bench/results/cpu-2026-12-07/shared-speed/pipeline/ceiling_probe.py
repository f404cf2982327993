"""The store's own calls with and without the page checksum, no tier (2026-12-07 pipeline runs).

    PATH=.venv/bin:$PATH SUB=8 .venv/bin/python bench/results/cpu-2026-12-07/shared-speed/pipeline/ceiling_probe.py KIB PAGES PASSES

A fresh mooncake_master; this client mounts the segment (TCP, loopback). Batches of 16 on two threads,
each variant's pass after the other's; median pass, ratio to `store`:
store (batch_put_from/batch_get_into, one buffer per value), multi (*_multi_buffers: header + page),
multi+crc (the same, crc32c of each page before the put / after the get, on the same thread),
pipe+crc (each batch in sub-batches of SUB pages, sub-batch k+1's checksums on a second pool while k is
in the store call; the mirror for gets), ahead+crc (puts: one thread checksums batch after batch while the
two I/O threads put them; its get column reads keys already removed: not a measurement),
multi+hotcrc (multi, plus crc32c of one cached page-sized buffer per page: the checksum's instructions
without its memory reads), crc-only (the checksums alone on the two threads).
cpu-busy-put: this process's CPU seconds per wall second during the puts (2 cores).
"""
import sys, time, statistics, resource, os
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[5]))  # the repository root (tests.support)
import numpy as np
from concurrent.futures import ThreadPoolExecutor
from crc32c import crc32c
from mooncake.store import MooncakeDistributedStore
from tests.support.stores import MooncakeMaster

KIB = int(sys.argv[1]) if len(sys.argv) > 1 else 512
NP = int(sys.argv[2]) if len(sys.argv) > 2 else 64
REP = int(sys.argv[3]) if len(sys.argv) > 3 else 9
N = KIB << 10; B = 16; H = 64
import tempfile
wd = Path(tempfile.mkdtemp())
m = MooncakeMaster(wd).start()
st = MooncakeDistributedStore()
assert st.setup("127.0.0.1", "P2PHANDSHAKE", 512 << 20, 64 << 20, "tcp", "", f"127.0.0.1:{m.port}") == 0
rng = np.random.default_rng(0)
src = rng.integers(0, 256, (NP, H + N), dtype=np.uint8)
dst = np.empty_like(src)
pool_ = rng.integers(0, 256, (NP, N), dtype=np.uint8); pin = np.empty_like(pool_)
heads = np.zeros((NP, H), dtype=np.uint8); hin = np.zeros_like(heads)
for a in (src, dst, pool_, pin, heads, hin):
    st.register_buffer(int(a.ctypes.data), a.nbytes)
batches = [range(i, min(i + B, NP)) for i in range(0, NP, B)]
io = ThreadPoolExecutor(2); crcpool = ThreadPoolExecutor(2)
ctr = [0]
def keys(tag, r): return [f"{tag}:{ctr[0]}:{i}" for i in r]

def base_put(r):
    return st.batch_put_from(keys("b", r), [int(src[i].ctypes.data) for i in r], [H + N] * len(r))
def base_get(r):
    return st.batch_get_into(keys("b", r), [int(dst[i].ctypes.data) for i in r], [H + N] * len(r))
def mb(r, which_pool, which_heads):
    return [[int(which_heads[i].ctypes.data), int(which_pool[i].ctypes.data)] for i in r], [[H, N]] * len(r)
def ser_put(r, crc=True):
    if crc:
        cs = [crc32c(memoryview(pool_[i])) for i in r]
    p, s = mb(r, pool_, heads)
    return st.batch_put_from_multi_buffers(keys("m", r), p, s)
def ser_get(r, crc=True):
    p, s = mb(r, pin, hin)
    out = st.batch_get_into_multi_buffers(keys("m", r), p, s)
    if crc:
        cs = [crc32c(memoryview(pin[i])) for i in r]
    return out
SUB = int(os.environ.get("SUB", 4))
def pipe_put(r):
    subs = [range(j, min(j + SUB, r.stop)) for j in range(r.start, r.stop, SUB)]
    f = crcpool.submit(lambda s: [crc32c(memoryview(pool_[i])) for i in s], subs[0])
    for k, s in enumerate(subs):
        f.result()
        if k + 1 < len(subs):
            f = crcpool.submit(lambda s: [crc32c(memoryview(pool_[i])) for i in s], subs[k + 1])
        p, sz = mb(s, pool_, heads)
        st.batch_put_from_multi_buffers(keys("p", s), p, sz)
def pipe_get(r):
    subs = [range(j, min(j + SUB, r.stop)) for j in range(r.start, r.stop, SUB)]
    f = None
    for s in subs:
        p, sz = mb(s, pin, hin)
        st.batch_get_into_multi_buffers(keys("p", s), p, sz)
        if f: f.result()
        f = crcpool.submit(lambda s: [crc32c(memoryview(pin[i])) for i in s], s)
    f.result()
ahead = ThreadPoolExecutor(1)
def ahead_run(put_fn, r_list):
    # one thread checksums batch after batch while the two I/O threads put them (full batches)
    fs = [ahead.submit(lambda r: [crc32c(memoryview(pool_[i])) for i in r], r) for r in r_list]
    def one(k):
        fs[k].result(); r = r_list[k]; p, sz = mb(r, pool_, heads)
        return st.batch_put_from_multi_buffers(keys("a", r), p, sz)
    list(io.map(one, range(len(r_list))))
hot = np.ones(N, dtype=np.uint8)
def hot_put(r):
    cs = [crc32c(memoryview(hot)) for i in r]
    p, s_ = mb(r, pool_, heads)
    return st.batch_put_from_multi_buffers(keys("h", r), p, s_)
def hot_get(r):
    p, s_ = mb(r, pin, hin)
    out = st.batch_get_into_multi_buffers(keys("h", r), p, s_)
    cs = [crc32c(memoryview(hot)) for i in r]
    return out
def crc_only(r):
    return [crc32c(memoryview(pool_[i])) for i in r]
variants = {
    "store": (base_put, base_get, "b"),
    "multi": (lambda r: ser_put(r, False), lambda r: ser_get(r, False), "m"),
    "multi+crc": (ser_put, ser_get, "m"),
    "pipe+crc": (pipe_put, pipe_get, "p"),
    "ahead+crc": (None, ser_get, "a"),
    "multi+hotcrc": (hot_put, hot_get, "h"),
    "crc-only": (crc_only, lambda r: [crc32c(memoryview(pin[i])) for i in r], "x"),
}
res = {k: {"put": [], "get": []} for k in variants}
def cpu(): 
    with open("/proc/stat") as f: v = list(map(int, f.readline().split()[1:]))
    return sum(v) - v[3] - v[4], sum(v)
busy = {k: [] for k in variants}
for rep in range(REP):
    for name, (put, get, tag) in variants.items():
        ctr[0] += 1
        ru0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
        if put is None: ahead_run(None, batches)
        else: list(io.map(put, batches))
        t1 = time.perf_counter(); ru1 = resource.getrusage(resource.RUSAGE_SELF)
        list(io.map(get, batches)); t2 = time.perf_counter()
        res[name]["put"].append(t1 - t0); res[name]["get"].append(t2 - t1)
        busy[name].append((ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / (t1 - t0))
        st.batch_remove(keys(tag, range(NP)), True)
        if tag == "a": st.batch_remove(keys("m", range(NP)), True)
gb = lambda s: NP * N / statistics.median(s) / 1e9
for name in variants:
    print(f"{name:10} put {gb(res[name]['put']):5.2f} GB/s ({gb(res[name]['put'])/gb(res['store']['put']):.2f})  "
          f"get {gb(res[name]['get']):5.2f} GB/s ({gb(res[name]['get'])/gb(res['store']['get']):.2f})  cpu-busy-put {statistics.median(busy[name]):.2f}")
st.close(); m.proc.kill()
