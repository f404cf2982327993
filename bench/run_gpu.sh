#!/usr/bin/env bash
# Build dynkv with CUDA, run the GPU tests and the kernel benchmarks, and leave
# logs, JSON and plots in one tarball under $OUT. Usage:
#   OUT=/tmp/out bench/run_gpu.sh [tests|bench|all]      (CASES="llama3-8b layers": only those bench cases)
# Modes that need vLLM (not part of `all`; `source /tmp/vllm-env.sh` first with the slim bundle):
#   load:   the two under-load workloads of `dynkv bench load`, plain vLLM, dynkv and OffloadingConnector,
#           the disk tier under $DISK (default /tmp/dynkv-load/disk);
#   e2e:    `dynkv bench e2e` at 8k tokens, REPEAT (default 7) runs per path, vLLM's compiled kernels
#           (E2E_ARGS: more options, e.g. `--variant staged:copy=staged`);
#   router: `python -m dynkv.benchmarks.router --device cuda`: two engines on the one GPU behind `dynkv proxy`,
#           `kv` against `round-robin` routing, REPEATS (default 2) runs of each;
#   router-shared: the same with dynkv in both engines (host tiers of HOST_PAGES, default 256) sharing pages
#           through a redis-server started for the run; without one on PATH, Debian's redis packages in
#           REDIS_DEBS (default .vllm-bundle/redis) are unpacked under /tmp/redis-root (dpkg -x, no install).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-bench/results/gpu}
RES=$(mktemp -d)
mkdir -p "$OUT"
# The image's default g++ (a wrapper under /opt/gcc) has no shared libstdc++;
# CMakeLists.txt refuses it, so build with the system one.
if [[ "$(${CXX:-g++} -print-file-name=libstdc++.so)" != /* && -x /usr/bin/g++ ]]; then
  export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi
export DYNKV_CUDA=ON DYNKV_CUDA_ARCHS=${DYNKV_CUDA_ARCHS:-90} PYTHONUNBUFFERED=1
python3 -m pip install --no-build-isolation --no-deps -q -e . || exit 1
echo "[${SECONDS}s] built" | tee "$RES/timings.txt"
python3 -m dynkv.cli env | tee "$RES/env.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
  # tests/connector, tests/e2e and test_metrics need vLLM, which this image lacks (the bundle's run covers them).
  python3 -m pytest tests -m gpu -q -p no:cacheprovider --ignore=tests/connector --ignore=tests/e2e \
    --ignore=tests/test_metrics.py --ignore=tests/test_identity.py --ignore=tests/disagg 2>&1 | tee "$RES/gpu-tests.log"
  rc=${PIPESTATUS[0]}
  echo "[${SECONDS}s] tests" | tee -a "$RES/timings.txt"
fi
if [[ $what == bench || $what == all ]]; then
  k() {
    local name=$1; shift
    # CASES (space-separated names): only those cases
    if [[ -n ${CASES:-} && " $CASES " != *" $name "* ]]; then return; fi
    python3 -m dynkv.cli bench kernels --device cuda --json "$RES/$name.json" --plot "$RES/$name.png" "$@" 2>&1 | tee "$RES/$name.log"
    echo "[${SECONDS}s] $name" | tee -a "$RES/timings.txt"
    tar -czf "$OUT/results-$what.tar.gz" -C "$RES" .  # keep what finished if a later step runs out of time
  }
  if [[ -z ${CASES:-} || " $CASES " == *" launch-probe "* ]]; then
    python3 bench/launch_probe.py --json "$RES/launch-probe.json" 2>&1 | tee "$RES/launch-probe.log"
    echo "[${SECONDS}s] launch-probe" | tee -a "$RES/timings.txt"
  fi
  if [[ -z ${CASES:-} || " $CASES " == *" forward-overlap "* ]]; then
    for shape in prefill decode; do
      python3 bench/forward_overlap.py --shape $shape --json "$RES/forward-overlap-$shape.json" 2>&1 \
        | tee "$RES/forward-overlap-$shape.log"
    done
    echo "[${SECONDS}s] forward-overlap" | tee -a "$RES/timings.txt"
  fi
  k llama3-8b --preset llama3-8b --ctas 4,8,16 --directions h2d,d2h,both --backends kernel,staged,torch
  k llama3-70b-tp8 --preset llama3-70b-tp8 --ctas 8 --directions h2d,d2h,both --backends kernel,staged,torch
  k llama3-8b-nhd --preset llama3-8b --layout LBNHC --ctas 8 --directions h2d,d2h,both --backends kernel,staged,torch
  k layers --preset llama3-8b --layout LBNHC --ctas 8 --directions h2d --backends kernel,layers,staged,staged_layers,staged_shuffled
  k layers-70b --preset llama3-70b-tp8 --ctas 8 --directions h2d --backends kernel,layers,staged,staged_layers,staged_shuffled
  k tiles --preset llama3-8b --tile-sweep --directions h2d,d2h --backends kernel,staged,dma --ctas 8
  k gemm --preset llama3-8b --gemm --directions h2d --backends kernel,staged --ctas 8 --launch-bytes 0,2M
  k deepseek-mla --preset deepseek-mla --ctas 8 --directions h2d,d2h --backends kernel,staged,torch
  python3 bench/calibration.py 2>&1 | tee "$RES/calibration.log"
fi
if [[ $what == load || $what == e2e || $what == router || $what == router-shared ]]; then
  python3 -c "import vllm" || { echo "dynkv bench $what needs vLLM in this python3"; exit 1; }
fi
if [[ $what == e2e ]]; then
  rm -rf /tmp/dynkv-load  # the disk space of an earlier load run
  # shellcheck disable=SC2086
  python3 -m dynkv.cli bench e2e --lengths 8192 --repeat "${REPEAT:-7}" --work-dir /tmp/e2e --out "$RES/e2e" \
    --engine-arg attention_backend=TRITON_ATTN --engine-arg distributed_executor_backend=uni ${E2E_ARGS:-} 2>&1 | tee "$RES/e2e.log"
  rc=${PIPESTATUS[0]}
fi
if [[ $what == router || $what == router-shared ]]; then
  shared=()
  if [[ $what == router-shared ]]; then
    if ! command -v redis-server > /dev/null; then
      for f in "${REDIS_DEBS:-.vllm-bundle/redis}"/*.deb; do dpkg -x "$f" /tmp/redis-root; done
      export PATH=/tmp/redis-root/usr/bin:$PATH
      export LD_LIBRARY_PATH=/tmp/redis-root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      redis-server --version || { echo "no redis-server for router-shared"; exit 1; }
    fi
    shared=(--redis --host-pages "${HOST_PAGES:-256}")
  fi
  # ROUTER_ARGS: more options of the router bench, e.g. "--concurrency 16 --cache-share 0.3".
  # shellcheck disable=SC2086
  python3 -m dynkv.benchmarks.router --device cuda --work /tmp/dynkv-router --repeats "${REPEATS:-2}" "${shared[@]}" ${ROUTER_ARGS:-} \
    --engine-arg attention_backend=TRITON_ATTN --engine-arg distributed_executor_backend=uni \
    --engine-arg enforce_eager=true --ready-timeout 240 --out "$RES/$what-gpu.json" 2>&1 | tee "$RES/$what.log"
  rc=${PIPESTATUS[0]}
  cp /tmp/dynkv-router/*.log "$RES/" 2>/dev/null
fi
if [[ $what == load ]]; then
  l() {
    local name=$1; shift
    python3 -m dynkv.cli bench load --device cuda --preset llama3-8b --work-dir /tmp/dynkv-load \
      --disk-path "${DISK:-/tmp/dynkv-load/disk}" --out "$RES/$name" --json "$RES/$name.json" --plot "$RES/$name.png" \
      --engines plain,dynkv,offloading "$@" 2>&1 | tee "$RES/$name.log"
    rc=$(( rc || PIPESTATUS[0] ))
    tar -czf "$OUT/results-$what.tar.gz" -C "$RES" --exclude logs .
  }
  l load-host --conversations 32 --turns 4 --prefix-tokens 4096 --concurrency 8 --device-share 0.4 --host-share 1.25
  l load-disk --conversations 48 --turns 3 --prefix-tokens 4096 --concurrency 16 --device-share 0.4 --host-share 0.45 \
    --disk-share 1.2 --dynkv-variant nocost='{"cost_model": false}'
fi
tar -czf "$OUT/results-$what.tar.gz" -C "$RES" .
grep -hE "^(run [0-9]|forward|kernel, |staged, |\||h2d|d2h|both|tile|gemm|calibration|engine|plain|dynkv|offloading|kv|round|ratio|TTFT|8192)| passed| failed|error|x " "$RES"/*.log | tail -150 > "$OUT/summary-$what.txt" || true
exit $rc
