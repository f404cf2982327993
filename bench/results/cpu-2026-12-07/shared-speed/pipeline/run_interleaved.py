"""`dynkv bench shared` on Mooncake, variants interleaved run by run, against one mooncake_master.

    PATH=.venv/bin:$PATH .venv/bin/python bench/results/cpu-2026-12-07/shared-speed/pipeline/run_interleaved.py \
        OUTDIR RUNS before=0,sub4=4,sub8=8,threads4=0:4 32,512

Each run: `dynkv bench shared --url URL --page-kib K --pages P --repeat 7` (P: 512 at 32 KiB, 64 at 512 KiB)
per variant and page size; the variants need experiment.diff applied (DYNKV_EXP_SUB: sub-batch size,
DYNKV_EXP_THREADS: the tier's I/O threads, DYNKV_EXP_AHEAD: checksums on a thread of their own; unset, the
tier is main's). OUTDIR/<variant>/shared-mooncake-<K>k-runN.json, OUTDIR/load.txt (load before each).
"""
import json, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[5]))  # the repository root (tests.support)
from tests.support.stores import MooncakeMaster
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
runs = int(sys.argv[2]); variants = dict(v.split("=", 1) for v in sys.argv[3].split(","))  # name=SUB
sizes = sys.argv[4].split(",") if len(sys.argv) > 4 else ["32", "512"]
import tempfile
wd = Path(tempfile.mkdtemp())
m = MooncakeMaster(wd).start()
load = open(out / "load.txt", "a")
try:
    for r in range(1, runs + 1):
        for name, sub in variants.items():
            for kib in sizes:
                pages = "512" if kib == "32" else "64"
                la = open("/proc/loadavg").read().split()[0]
                load.write(f"run {r} {name} {kib}k {time.strftime('%H:%M:%S')} load {la}\n"); load.flush()
                sub, _, thr = sub.partition(":"); ahead = "1" if sub == "ahead" else ""; sub = "0" if ahead else sub; env = dict(os.environ, DYNKV_EXP_AHEAD=ahead, DYNKV_EXP_SUB=sub, DYNKV_EXP_THREADS=thr or "2", PATH=str(Path(sys.executable).parent) + ":" + os.environ["PATH"])
                dst = out / name / f"shared-mooncake-{kib}k-run{r}.json"; dst.parent.mkdir(exist_ok=True)
                subprocess.run([str(Path(sys.executable).with_name("dynkv")), "bench", "shared", "--url", m.url, "--page-kib", kib,
                                "--pages", pages, "--repeat", "7", "--json", str(dst)], env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                rep = json.load(open(dst))
                print(r, name, kib, "put %.2f get %.2f" % (rep["ratio"]["put"], rep["ratio"]["get"]), flush=True)
finally:
    m.proc.kill()
