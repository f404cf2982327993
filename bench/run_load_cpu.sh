#!/usr/bin/env bash
# dynkv bench load on vLLM's CPU build with the tiny random model: plain vLLM against dynkv with a host tier
# (workload "host"), and with a host tier and an over-committed disk tier, cost model on and off (workload
# "disk"). Each workload runs RUNS times, engine order reversed every other run. Usage:
#   OUT=bench/results/cpu-2026-12-07 RUNS=3 bench/run_load_cpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/cpu-$(date +%F)}
RUNS=${RUNS:-3}
WORK=${WORK:-/tmp/dynkv-load-work}
mkdir -p "$OUT"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} PYTHONUNBUFFERED=1
common=(--device cpu --conversations 16 --turns 3 --prefix-tokens 512 --user-tokens 32 --answer-tokens 8
        --concurrency 4 --device-share 0.4 --work-dir "$WORK" --no-plot)
for run in $(seq 1 "$RUNS"); do
  if (( run % 2 )); then order=plain,dynkv; else order=dynkv,plain; fi
  python -m dynkv.cli bench load "${common[@]}" --host-share 1.25 --engines "$order" \
    --out "$WORK/host-$run" --json "$OUT/load-host-run$run.json" 2>&1 | tee "$OUT/load-host-run$run.txt" | grep -v "it/s\|req/s"
  python -m dynkv.cli bench load "${common[@]}" --host-share 0.45 --disk-share 1.2 --engines "$order" \
    --dynkv-variant nocost='{"cost_model": false}' \
    --out "$WORK/disk-$run" --json "$OUT/load-disk-run$run.json" 2>&1 | tee "$OUT/load-disk-run$run.txt" | grep -v "it/s\|req/s"
done
