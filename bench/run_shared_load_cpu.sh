#!/usr/bin/env bash
# dynkv bench load across two engines that share KV through a redis-server (dynkv's shared tier), on vLLM's CPU
# build with the tiny random model, against one engine alone:
#   (a) two API servers with dynkv and the same remote_url; the requests alternate between them (turn t of
#       conversation c to server (c + t) % 2, so every later turn lands on the other engine than its previous one);
#   (b) one fresh API server with the same config (the same store, a namespace of its own), the same workload.
# Prints the ratio of their cached shares (share of prompt tokens served from a cache; target >= 0.9) with the
# shared tier's counters. Each engine has one core (VLLM_CPU_OMP_THREADS_BIND), device cache DEVICE_BLOCKS, host
# tier HOST_PAGES; RUNS runs. Every process started here is stopped on exit, Ctrl-C or SIGTERM. Usage:
#   OUT=bench/results/cpu-2026-12-07/shared-load RUNS=3 bench/run_shared_load_cpu.sh
# Knobs: CONVERSATIONS, TURNS, PREFIX_TOKENS, USER_TOKENS, ANSWER_TOKENS, CONCURRENCY, DEVICE_BLOCKS, HOST_PAGES,
# DYNKV_CONFIG (JSON of extra kv_connector_extra_config keys for every engine), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/cpu-$(date +%F)/shared-load}
RUNS=${RUNS:-1}
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
CONVERSATIONS=${CONVERSATIONS:-8} TURNS=${TURNS:-3} PREFIX_TOKENS=${PREFIX_TOKENS:-512} USER_TOKENS=${USER_TOKENS:-32}
ANSWER_TOKENS=${ANSWER_TOKENS:-8} CONCURRENCY=${CONCURRENCY:-2}
# The working set is 8 conversations of 20 blocks (632 tokens): each device cache holds 0.4 of it, the host tier all.
DEVICE_BLOCKS=${DEVICE_BLOCKS:-64} HOST_PAGES=${HOST_PAGES:-200}
DYNKV_CONFIG=${DYNKV_CONFIG:-{\}}
BLOCK=32
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dynkv-shared-load.XXXXXX")
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} PYTHONUNBUFFERED=1

# Each process started here runs in a session of its own (an API server with its engine processes): its process
# group is stopped as a whole, SIGTERM then SIGKILL after 30 s.
servers=() redis_group=
stop() {  # stop PGID...
  local g alive
  for g in "$@"; do kill -TERM -- "-$g" 2>/dev/null; done
  for _ in $(seq 1 60); do
    alive=0
    for g in "$@"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.5
  done
  for g in "$@"; do kill -KILL -- "-$g" 2>/dev/null; done
}
stop_servers() { (( ${#servers[@]} )) && stop "${servers[@]}"; servers=(); }
trap 'stop_servers; [[ -n $redis_group ]] && stop "$redis_group"; rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port() { "$PYTHON" -c "from dynkv.testing.server import free_port; print(free_port())"; }
start() {  # start LOG CMD...: CMD in a new session, logging to LOG; its process group id in $started
  local log=$1; shift
  setsid "$@" >"$log" 2>&1 &
  started=$!
}
wait_ready() {  # wait_ready URL PID LOG: until URL/health answers; fails with the log's tail if the server died
  local url=$1 pid=$2 log=$3
  for _ in $(seq 1 900); do
    curl -sf "$url/health" >/dev/null 2>&1 && return 0
    if ! kill -0 "$pid" 2>/dev/null; then echo "server $url exited; its log:" >&2; tail -30 "$log" >&2; return 1; fi
    sleep 1
  done
  echo "server $url not healthy in 900 s" >&2; return 1
}

model="$WORK/model"
"$PYTHON" -c "import sys; from dynkv.testing.model import write_model; write_model(sys.argv[1], preset='tiny')" "$model"
read -r first vocab page_bytes < <("$PYTHON" -c "from dynkv.testing.model import FIRST_WORD_ID, PRESETS
s = PRESETS['tiny']; print(FIRST_WORD_ID, s.vocab_size, s.kv_bytes_per_token(4) * $BLOCK)")

rport=$(port)
mkdir -p "$WORK/redis"
start "$WORK/redis.log" redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK/redis" \
  --daemonize no --protected-mode no
redis_group=$started
for _ in $(seq 1 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$rport" ping >/dev/null || { echo "redis-server did not start" >&2; cat "$WORK/redis.log" >&2; exit 1; }
store="redis://127.0.0.1:$rport/0"

serve() {  # serve NAME CORE NAMESPACE: one API server with dynkv on core CORE; its URL in $url, its group in $started
  local name=$1 core=$2 ns=$3 p config
  p=$(port)
  config=$("$PYTHON" -c "import json, sys; print(json.dumps({'host_pages': $HOST_PAGES, 'remote_url': sys.argv[1],
'shared_namespace': sys.argv[2], **json.loads(sys.argv[3])}))" "$store" "$ns" "$DYNKV_CONFIG")
  start "$logs/$name.log" env VLLM_CPU_OMP_THREADS_BIND="$core" "$PYTHON" -m vllm.entrypoints.openai.api_server \
    --model "$model" --served-model-name tiny --host 127.0.0.1 --port "$p" --dtype float32 --block-size $BLOCK \
    --max-model-len 1024 --enforce-eager --seed 0 --num-gpu-blocks-override "$DEVICE_BLOCKS" \
    --kv-cache-memory-bytes $(( (DEVICE_BLOCKS + 1) * page_bytes )) --enable-prompt-tokens-details \
    --max-num-batched-tokens 2048 --shutdown-timeout 20 --kv-transfer-config "{\"kv_connector\": \"DynKVConnector\",
\"kv_role\": \"kv_both\", \"kv_connector_module_path\": \"dynkv.connector\", \"kv_connector_extra_config\": $config}"
  servers+=("$started")
  url="http://127.0.0.1:$p"
}

load() {  # load NAME ENDPOINT: one bench load run, JSON and table into $OUT
  "$PYTHON" -m dynkv.cli bench load --endpoint "$2" --conversations "$CONVERSATIONS" --turns "$TURNS" \
    --prefix-tokens "$PREFIX_TOKENS" --user-tokens "$USER_TOKENS" --answer-tokens "$ANSWER_TOKENS" \
    --concurrency "$CONCURRENCY" --token-range "$first:$vocab" --out "$WORK/out-$1" --no-plot \
    --json "$OUT/$1.json" 2>&1 | grep -v "it/s\|req/s" | tee "$OUT/$1.txt"
  return "${PIPESTATUS[0]}"
}

echo "host $(hostname), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); store $store; $(date -u +%FT%TZ)" \
  | tee "$OUT/host.txt"
status=0
for run in $(seq 1 "$RUNS"); do
  logs="$OUT/logs-run$run"
  mkdir -p "$logs"
  # (a) two engines, one store; the requests alternate between them.
  serve shared-a 0 "shared-run$run"; a=$url a_pid=$started
  serve shared-b 1 "shared-run$run"; b=$url b_pid=$started
  wait_ready "$a" "$a_pid" "$logs/shared-a.log" && wait_ready "$b" "$b_pid" "$logs/shared-b.log" || exit 1
  load "shared-run$run" "shared=$a,$b" || status=1
  stop_servers
  # (b) one fresh engine alone, same config, a namespace the pair never wrote.
  serve single 0 "single-run$run"
  wait_ready "$url" "$started" "$logs/single.log" || exit 1
  load "single-run$run" "single=$url" || status=1
  stop_servers
  "$PYTHON" - "$OUT/shared-run$run.json" "$OUT/single-run$run.json" <<'EOF' | tee "$OUT/ratio-run$run.txt"
import json, sys
shared, single = (json.load(open(p))["summaries"] for p in sys.argv[1:])
sh, si = shared["shared"], single["single"]
print(f"cached share: two engines alternating {sh['cached_share']:.3f}, one engine alone {si['cached_share']:.3f}, "
      f"ratio {sh['cached_share'] / si['cached_share']:.3f} (target >= 0.9)")
print(f"later turns: {sh['cached_share_later_turns']:.3f} vs {si['cached_share_later_turns']:.3f}; "
      f"TTFT later turns p50 {sh['ttft_later_turns_s']['p50'] * 1e3:.0f} vs {si['ttft_later_turns_s']['p50'] * 1e3:.0f} ms")
for name, s in (("two engines", sh), ("one engine", si)):
    print(f"{name}: hits {s.get('hits_blocks')}, misses {s.get('misses_blocks')}, shared {s.get('shared')}")
EOF
done
exit $status
