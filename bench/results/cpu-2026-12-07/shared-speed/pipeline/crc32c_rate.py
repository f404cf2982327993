"""crc32c over 256 pages of 512 KiB: from memory (each page once), from cache (one page again and again), a
bytes() copy for scale; then two threads from memory with each gil_release_mode; the np copy lines write
into fresh memory (the first pays its page faults): not a measurement."""
import time, numpy as np, crc32c, threading
from crc32c import crc32c as c
try:
    c(b"x", gil_release_mode=1); print("gil_release_mode ok")
except TypeError as e: print(e)
N=512<<10
big = np.random.default_rng(0).integers(0,256,(256,N),dtype=np.uint8)  # 128 MiB: cold
mv=[memoryview(big[i]) for i in range(256)]
for rep in range(3):
    t=time.perf_counter()
    for m in mv: c(m)
    dt=time.perf_counter()-t; print("cold 512K: %.1f GB/s"%(256*N/dt/1e9))
    t=time.perf_counter()
    for _ in range(256): c(mv[0])
    dt=time.perf_counter()-t; print("hot 512K: %.1f GB/s"%(256*N/dt/1e9))
    t=time.perf_counter()
    for m in mv: bytes(m)
    dt=time.perf_counter()-t; print("cold copy 512K: %.1f GB/s"%(256*N/dt/1e9))
# two threads cold
def w(ms):
    for m in ms: c(m)
t=time.perf_counter()
th=[threading.Thread(target=w,args=(mv[i::2],)) for i in range(2)]
[x.start() for x in th];[x.join() for x in th]
print("2 threads cold: %.1f GB/s"%(256*N/(time.perf_counter()-t)/1e9))
for mode in (1,0,-1):
    def w(ms):
        for m in ms: c(m, gil_release_mode=mode)
    for _ in range(2):
        t=time.perf_counter()
        th=[threading.Thread(target=w,args=(mv[i::2],)) for i in range(2)]
        [x.start() for x in th];[x.join() for x in th]
        print("mode",mode,"2 threads cold: %.1f GB/s"%(256*N/(time.perf_counter()-t)/1e9))
dst=np.empty_like(big)
def cp(idx):
    for i in idx: dst[i]=big[i]
for k in (1,2):
    t=time.perf_counter()
    th=[threading.Thread(target=cp,args=(range(i,256,k),)) for i in range(k)]
    [x.start() for x in th];[x.join() for x in th]
    print(k,"threads np copy: %.1f GB/s"%(256*N/(time.perf_counter()-t)/1e9))
