#!/usr/bin/env bash
# 1P1D disaggregated serving on vLLM's CPU build: dynkv (DynKVConnector + dynkv proxy) against vLLM's
# NixlConnector (kv_buffer_device cpu, same proxy), both up at once, measured in one `dynkv bench serve` run.
# Usage: OUT=bench/results/disagg-cpu bench/run_disagg_cpu.sh [extra `dynkv bench serve` options]
# Knobs: PRESET (test model, default small), CONVERSATIONS, TURNS, PREFIX_TOKENS, USER_TOKENS, MAX_TOKENS,
# CONCURRENCY, ENDPOINTS (deployments to start and measure, in order: default "dynkv nixl"; "agg" is one
# aggregated engine with dynkv, for reference).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/disagg-cpu}"
PYTHON="${PYTHON:-$PWD/.venv/bin/python}"
PRESET="${PRESET:-small}"
ENDPOINTS="${ENDPOINTS:-dynkv nixl}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
model="$WORK/model"
"$PYTHON" -c "import sys; from dynkv.testing.model import write_model; write_model(sys.argv[1], preset=sys.argv[2])" \
  "$model" "$PRESET"
vocab="$("$PYTHON" -c "import sys; from dynkv.testing.model import PRESETS; print(PRESETS[sys.argv[1]].vocab_size)" "$PRESET")"
first="$("$PYTHON" -c "from dynkv.testing.model import FIRST_WORD_ID; print(FIRST_WORD_ID)")"
port() { "$PYTHON" -c "from dynkv.testing.server import free_port; print(free_port())"; }

common=(MODEL="$model" PYTHON="$PYTHON" DTYPE=float32 BLOCK_SIZE=32 MAX_MODEL_LEN=4096 SHUTDOWN_TIMEOUT=20
        STOP_TIMEOUT=20 PROXY_HOST=127.0.0.1 DYNKV_HOST_GB=1
        EXTRA_ARGS="--enforce-eager --seed 0 --served-model-name bench --kv-cache-memory-bytes $((1 << 30))")
pids=()
cleanup() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait || true; rm -rf "$WORK"; }
trap cleanup EXIT
declare -A url decode
for name in $ENDPOINTS; do
  p=$(port)
  url[$name]="http://127.0.0.1:$p"
  if [[ $name == agg ]]; then  # the reference: one engine with dynkv, prefill and decode in one place
    decode[$name]=$p
    env "${common[@]}" HOST=127.0.0.1 PORT="$p" DYNKV_DISK_PATHS= worker/agg.sh >"$OUT/agg.log" 2>&1 &
    pids+=("$!")
    continue
  fi
  decode[$name]=$(port)
  extra=()
  [[ $name == nixl ]] && extra=(KV_CONNECTOR=NixlConnector KV_BUFFER_DEVICE=cpu)
  env "${common[@]}" "${extra[@]}" PROXY_PORT="$p" PREFILL_PORT="$(port)" DECODE_PORT="${decode[$name]}" \
    SIDE_CHANNEL_PORT="$(port)" LOG_DIR="$OUT/logs-$name" worker/disagg_1p1d.sh 2>"$OUT/$name.log" &
  pids+=("$!")
done
for name in $ENDPOINTS; do
  "$PYTHON" - "${url[$name]}" <<'EOF'
import sys, time, urllib.request
deadline = time.monotonic() + 900
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(sys.argv[1] + "/health", timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(2)
sys.exit(f"{sys.argv[1]} not healthy")
EOF
done
endpoints=()
for name in $ENDPOINTS; do endpoints+=(--endpoint "$name=${url[$name]}"); done
"$PYTHON" -m dynkv.cli bench serve "${endpoints[@]}" --conversations "${CONVERSATIONS:-8}" --turns "${TURNS:-3}" \
  --prefix-tokens "${PREFIX_TOKENS:-1024}" --user-tokens "${USER_TOKENS:-64}" --max-tokens "${MAX_TOKENS:-32}" \
  --concurrency "${CONCURRENCY:-1}" --token-range "$first:$vocab" --json "$OUT/serve.json" --plot "$OUT/serve.png" \
  "$@" | tee "$OUT/serve.txt"
# What each decode engine saw: prompt tokens by source (computed here, prefix cache, transferred) and dynkv's pulls.
for name in $ENDPOINTS; do
  "$PYTHON" -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())" \
    "http://127.0.0.1:${decode[$name]}/metrics" | grep -E "^vllm:(prompt_tokens|dynkv_)" >"$OUT/decode-metrics-$name.txt" || true
done
