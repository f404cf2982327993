#!/usr/bin/env bash
# Aggregated serving over N engines with KV-aware routing: NUM_ENGINES `vllm serve` (each with dynkv through
# agg.sh, publishing KV events and serving KV snapshots on dynkv's metrics port) and `dynkv proxy --engine ...`
# in front, routing by ROUTER_POLICY.
# Engines on other hosts join with REMOTE_ENGINES. Every knob is an environment variable; see worker/README.md.
# Arguments are passed to every local engine's vllm serve. Ctrl-C (or SIGTERM) stops everything.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VLLM_ARGS=("$@")
NUM_ENGINES="${NUM_ENGINES:-2}"
TP="${TP:-1}"
PROXY_HOST="${PROXY_HOST:-0.0.0.0}"
PROXY_PORT="${PROXY_PORT:-8000}"
ENGINE_HOST="${ENGINE_HOST:-127.0.0.1}"
ENGINE_PORT="${ENGINE_PORT:-8100}"    # local engine i listens on ENGINE_PORT + i
EVENTS_PORT="${EVENTS_PORT:-5700}"    # its KV events on EVENTS_PORT + 2i, their replay socket on EVENTS_PORT + 2i + 1
# Local engine i serves dynkv's metrics and its KV snapshot (/kv/snapshot, on loopback) at METRICS_PORT + i: a
# proxy started after its engines, or one whose replay buffer no longer reaches back, rebuilds its view from it.
METRICS_PORT="${METRICS_PORT:-9100}"
ROUTER_POLICY="${ROUTER_POLICY:-kv}"  # kv, round-robin or least-loaded
LOAD_WEIGHT="${LOAD_WEIGHT:-1.0}"
PARK_WEIGHT="${PARK_WEIGHT:-0.5}"     # kv: share of a parked conversation's tokens counted as its engine's load
SESSION_TTL="${SESSION_TTL:-300}"     # kv: seconds a conversation stays parked without a next turn
# The engines' --prefix-caching-hash-algo and PYTHONHASHSEED: the proxy hashes prompts the same way.
HASH_ALGO="${HASH_ALGO:-sha256}"
HASH_SEED="${HASH_SEED:-${PYTHONHASHSEED:-}}"
# Engines started elsewhere, space-separated, each URL=EVENTS=REPLAY[=SNAPSHOT], e.g.
# "http://10.0.0.7:8100=tcp://10.0.0.7:5700=tcp://10.0.0.7:5701"; their --kv-events-config must bind
# (tcp://*:PORT) and their hash settings match. dynkv's metrics port listens on loopback only, so a SNAPSHOT
# URL (http://HOST:PORT/kv/snapshot) works where that port is forwarded to this host; without one the proxy
# rebuilds that engine's view from its replay buffer alone.
REMOTE_ENGINES="${REMOTE_ENGINES:-}"
LOG_DIR="${LOG_DIR:-${TMPDIR:-/tmp}/dynkv-agg-router-${PROXY_PORT}}"
READY_TIMEOUT="${READY_TIMEOUT:-900}"
STOP_TIMEOUT="${STOP_TIMEOUT:-40}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
ENGINE_ENV="${ENGINE_ENV:-}"  # extra VAR=value assignments for every local engine

NUM_GPUS="${NUM_GPUS:-}"
if [[ -z "$NUM_GPUS" ]]; then
  NUM_GPUS=0
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS="$(nvidia-smi -L | grep -c '^GPU')"
  fi
fi
if (( NUM_GPUS > 0 && NUM_ENGINES * TP > NUM_GPUS )); then
  echo "dynkv agg_router: $NUM_ENGINES engines of TP=$TP need $((NUM_ENGINES * TP)) GPUs but $NUM_GPUS are" \
       "visible; lower NUM_ENGINES or TP" >&2
  exit 2
fi
if (( NUM_ENGINES == 0 )) && [[ -z "$REMOTE_ENGINES" ]]; then
  echo "dynkv agg_router: no engines: set NUM_ENGINES > 0 or REMOTE_ENGINES" >&2
  exit 2
fi

pids=()
names=()
logs=()
stopping=0

group_alive() {
  local p
  for p in $(pgrep -g "$1" 2>/dev/null); do
    [[ "$(ps -o stat= -p "$p" 2>/dev/null)" == Z* ]] || return 0
  done
  return 1
}

stop_all() {
  (( stopping )) && return
  stopping=1
  (( ${#pids[@]} )) || return 0
  echo "dynkv agg_router: stopping ${names[*]}" >&2
  # SIGINT to each API server first (vLLM's clean shutdown lets dynkv flush its disk tier), then the groups.
  for sig in INT TERM KILL; do
    local alive=()
    for pid in "${pids[@]}"; do
      group_alive "$pid" && alive+=("$pid")
    done
    (( ${#alive[@]} )) || return 0
    for pid in "${alive[@]}"; do
      if [[ $sig == INT ]]; then kill -INT "$pid" 2>/dev/null || true; else kill -"$sig" -- "-$pid" 2>/dev/null || true; fi
    done
    for _ in $(seq $((STOP_TIMEOUT * 5))); do
      local left=0
      for pid in "${alive[@]}"; do group_alive "$pid" && left=1; done
      (( left )) || break
      sleep 0.2
    done
  done
}
trap 'stop_all' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {
  local name="$1" log="$2"
  shift 2
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s:' "$name"; printf ' %q' "$@"; printf '\n'
    return
  fi
  setsid "$@" >"$log" 2>&1 </dev/null &
  pids+=("$!")
  names+=("$name")
  logs+=("$log")
}

[[ "$DRY_RUN" == 1 ]] || mkdir -p "$LOG_DIR"
proxy=("$PYTHON" -m dynkv.proxy --policy "$ROUTER_POLICY" --load-weight "$LOAD_WEIGHT" --park-weight "$PARK_WEIGHT"
       --session-ttl "$SESSION_TTL" --hash-algo "$HASH_ALGO" --host "$PROXY_HOST" --port "$PROXY_PORT")
[[ -n "$HASH_SEED" ]] && proxy+=(--hash-seed "$HASH_SEED")
local_urls=()
for ((i = 0; i < NUM_ENGINES; i++)); do
  port=$((ENGINE_PORT + i)) pub=$((EVENTS_PORT + 2 * i)) replay=$((EVENTS_PORT + 2 * i + 1))
  # vLLM binds its publisher only for a wildcard address; the replay socket is always bound.
  events="{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:$pub\",\"replay_endpoint\":\"tcp://$ENGINE_HOST:$replay\"}"
  metrics=$((METRICS_PORT + i))
  env=(HOST="$ENGINE_HOST" PORT="$port" TP="$TP" PYTHON="$PYTHON" DYNKV_METRICS_PORT="$metrics")
  [[ -n "$HASH_SEED" ]] && env+=(PYTHONHASHSEED="$HASH_SEED")
  read -r -a extra <<<"$ENGINE_ENV"
  env+=(${extra[@]+"${extra[@]}"})
  (( NUM_GPUS > 0 )) && env+=(CUDA_VISIBLE_DEVICES="$(seq -s, $((i * TP)) $((i * TP + TP - 1)))")
  start "engine$i" "$LOG_DIR/engine$i.log" env "${env[@]}" "$HERE/agg.sh" --kv-events-config "$events" \
    --prefix-caching-hash-algo "$HASH_ALGO" --enable-prompt-tokens-details ${VLLM_ARGS[@]+"${VLLM_ARGS[@]}"}
  local_urls+=("http://$ENGINE_HOST:$port")
  proxy+=(--engine "http://$ENGINE_HOST:$port" --kv-events "tcp://$ENGINE_HOST:$pub"
          --kv-replay "tcp://$ENGINE_HOST:$replay" --kv-snapshot "http://127.0.0.1:$metrics/kv/snapshot")
done
for spec in $REMOTE_ENGINES; do
  IFS='=' read -r url pub replay snap <<<"$spec"
  if [[ -z "$pub" || -z "$replay" ]]; then
    echo "dynkv agg_router: REMOTE_ENGINES entry '$spec': expected" \
         "URL=tcp://HOST:EVENTS=tcp://HOST:REPLAY[=http://HOST:PORT/kv/snapshot]" >&2
    exit 2
  fi
  # An empty --kv-snapshot: that engine has none (the proxy wants one per engine, in order).
  proxy+=(--engine "$url" --kv-events "$pub" --kv-replay "$replay" --kv-snapshot "$snap")
done
if [[ "$DRY_RUN" == 1 ]]; then
  start proxy "" "${proxy[@]}"
  exit 0
fi

echo "dynkv agg_router: ${names[*]} starting; logs in $LOG_DIR" >&2
"$PYTHON" - "$READY_TIMEOUT" ${local_urls[@]+"${local_urls[@]}"} <<'EOF' &
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[1])
urls = sys.argv[2:]
while urls:
    if time.monotonic() > deadline:
        sys.exit(f"not healthy after {sys.argv[1]} s: {' '.join(urls)}")
    for u in list(urls):
        try:
            with urllib.request.urlopen(u + "/health", timeout=2) as r:
                if r.status == 200:
                    urls.remove(u)
        except OSError:
            pass
    time.sleep(1)
EOF
waiter=$!
while kill -0 "$waiter" 2>/dev/null; do
  for k in "${!pids[@]}"; do
    if ! kill -0 "${pids[$k]}" 2>/dev/null; then
      echo "dynkv agg_router: ${names[$k]} exited while starting; last lines of ${logs[$k]}:" >&2
      tail -n 30 "${logs[$k]}" >&2
      kill "$waiter" 2>/dev/null || true
      exit 1
    fi
  done
  sleep 1
done
wait "$waiter" || { echo "dynkv agg_router: engines did not become healthy (logs in $LOG_DIR)" >&2; exit 1; }

start proxy "$LOG_DIR/proxy.log" "${proxy[@]}"
echo "dynkv agg_router: serving on http://$PROXY_HOST:$PROXY_PORT ($ROUTER_POLICY; proxy log $LOG_DIR/proxy.log)" >&2
# Serve until a signal arrives or the proxy exits. An engine that exits is reported; the proxy takes it out
# of rotation and keeps serving with the others.
reported=()
while true; do
  alive=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
  (( ${#alive[@]} )) || exit 1
  wait -n "${alive[@]}" || true
  for k in "${!pids[@]}"; do
    if ! kill -0 "${pids[$k]}" 2>/dev/null && [[ -z "${reported[$k]:-}" ]]; then
      reported[$k]=1
      echo "dynkv agg_router: ${names[$k]} exited; last lines of ${logs[$k]}:" >&2
      tail -n 10 "${logs[$k]}" >&2
      [[ ${names[$k]} == proxy ]] && exit 1
    fi
  done
done
