#!/usr/bin/env bash
# Disaggregated serving on one host: NUM_PREFILL prefill engines (kv_producer), NUM_DECODE decode engines
# (kv_consumer), each a `vllm serve` with dynkv started through agg.sh, and `dynkv proxy` in front.
# Every knob is an environment variable; see worker/README.md. Ctrl-C (or SIGTERM) stops everything.
# worker/disagg_1p1d.sh and worker/disagg_2p2d.sh set the counts and TP sizes.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VLLM_ARGS=("$@")  # passed to every engine's vllm serve
NUM_PREFILL="${NUM_PREFILL:-1}"
NUM_DECODE="${NUM_DECODE:-1}"
PREFILL_TP="${PREFILL_TP:-${TP:-1}}"
DECODE_TP="${DECODE_TP:-${TP:-1}}"
PROXY_HOST="${PROXY_HOST:-127.0.0.1}"
PROXY_PORT="${PROXY_PORT:-8000}"
ENGINE_HOST="${ENGINE_HOST:-127.0.0.1}"
PREFILL_PORT="${PREFILL_PORT:-8100}"   # prefill engine i listens on PREFILL_PORT + i
DECODE_PORT="${DECODE_PORT:-8200}"     # decode engine i on DECODE_PORT + i
SIDE_CHANNEL_HOST="${SIDE_CHANNEL_HOST:-127.0.0.1}"
SIDE_CHANNEL_PORT="${SIDE_CHANNEL_PORT:-5600}"  # prefill engine i's side channel on SIDE_CHANNEL_PORT + i; 0: any free one
LOG_DIR="${LOG_DIR:-${TMPDIR:-/tmp}/dynkv-disagg-${PROXY_PORT}}"
READY_TIMEOUT="${READY_TIMEOUT:-900}"
STOP_TIMEOUT="${STOP_TIMEOUT:-40}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
# Extra VAR=value assignments (space-separated) for prefill or decode engines only,
# e.g. PREFILL_ENV='VLLM_CPU_OMP_THREADS_BIND=0|1' for a TP=2 prefill engine on vLLM's CPU build.
PREFILL_ENV="${PREFILL_ENV:-}"
DECODE_ENV="${DECODE_ENV:-}"
# DynKVConnector, or NixlConnector to run vLLM's own connector the same way (for comparisons);
# NixlConnector stages KV in KV_BUFFER_DEVICE memory ("cuda" on GPUs, "cpu" on vLLM's CPU build).
KV_CONNECTOR="${KV_CONNECTOR:-DynKVConnector}"
KV_BUFFER_DEVICE="${KV_BUFFER_DEVICE:-}"
# The engines' shared secret for signing kv_transfer_params: one per launch unless given (engines on other
# hosts need the same one). Exported, so it never appears on a command line; the proxy does not get it.
if [[ -z "${DYNKV_TRANSFER_SECRET:-}" && "$KV_CONNECTOR" == DynKVConnector ]]; then
  DYNKV_TRANSFER_SECRET="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')"
fi
export DYNKV_TRANSFER_SECRET="${DYNKV_TRANSFER_SECRET:-}"
# Host tier only unless disk paths are given (agg.sh would default to a 64 GiB disk tier per engine).
export DYNKV_DISK_PATHS="${DYNKV_DISK_PATHS-}"
DYNKV_EXTRA_CONFIG="${DYNKV_EXTRA_CONFIG:-{\}}"

# One GPU set per engine, in order: prefill engines first, then decode engines.
NUM_GPUS="${NUM_GPUS:-}"
if [[ -z "$NUM_GPUS" ]]; then
  NUM_GPUS=0
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS="$(nvidia-smi -L | grep -c '^GPU')"
  fi
fi
need=$((NUM_PREFILL * PREFILL_TP + NUM_DECODE * DECODE_TP))
if (( NUM_GPUS > 0 && need > NUM_GPUS )); then
  echo "dynkv disagg: $NUM_PREFILL prefill engines of TP=$PREFILL_TP and $NUM_DECODE decode engines of" \
       "TP=$DECODE_TP need $need GPUs but $NUM_GPUS are visible; lower the counts or the TP sizes" >&2
  exit 2
fi

pids=()
names=()
logs=()
reported=()
stopping=0

# group_alive PGID: a process of the group is still running (zombies do not count).
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
  echo "dynkv disagg: stopping ${names[*]}" >&2
  # SIGINT to each engine's API server is vLLM's clean shutdown: it stops its engine core, whose
  # connector then releases dynkv's host pool. Then the whole process group (each engine and the
  # proxy lead their own): SIGTERM, and SIGKILL for what is left.
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

# start NAME LOG COMMAND...: run COMMAND in a process group of its own, logging to LOG.
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

# engine ROLE INDEX PORT TP FIRST_GPU: one vllm serve through agg.sh.
engine() {
  local role="$1" i="$2" port="$3" tp="$4" gpu0="$5" name
  name="$([[ $role == kv_producer ]] && echo prefill || echo decode)$i"
  local cfg="{\"kv_connector\":\"DynKVConnector\",\"kv_role\":\"$role\",\"kv_connector_module_path\":\"dynkv.connector\",\"kv_connector_extra_config\":${DYNKV_EXTRA_CONFIG}}"
  # Side channels: prefill engine i at SIDE_CHANNEL_PORT + i; NixlConnector's decode engines listen too, after them.
  local side=$((SIDE_CHANNEL_PORT ? SIDE_CHANNEL_PORT + i : 0))
  if [[ $KV_CONNECTOR == NixlConnector ]]; then
    cfg="{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"$role\",\"kv_buffer_device\":\"${KV_BUFFER_DEVICE:-cuda}\"}"
    (( SIDE_CHANNEL_PORT )) || { echo "dynkv disagg: NixlConnector needs SIDE_CHANNEL_PORT > 0" >&2; exit 2; }
    [[ $role == kv_producer ]] || side=$((SIDE_CHANNEL_PORT + NUM_PREFILL + i))
  elif [[ $KV_CONNECTOR != DynKVConnector ]]; then
    echo "dynkv disagg: KV_CONNECTOR=$KV_CONNECTOR: expected DynKVConnector or NixlConnector" >&2
    exit 2
  fi
  local env=(HOST="$ENGINE_HOST" PORT="$port" TP="$tp" KV_TRANSFER_CONFIG="$cfg" PYTHON="$PYTHON"
             DYNKV_SIDE_CHANNEL_HOST="$SIDE_CHANNEL_HOST" DYNKV_SIDE_CHANNEL_PORT="$side"
             VLLM_NIXL_SIDE_CHANNEL_HOST="$SIDE_CHANNEL_HOST" VLLM_NIXL_SIDE_CHANNEL_PORT="$side")
  local extra
  if [[ $role == kv_producer ]]; then
    read -r -a extra <<<"$PREFILL_ENV"
  else
    read -r -a extra <<<"$DECODE_ENV"
  fi
  env+=(${extra[@]+"${extra[@]}"})
  if (( NUM_GPUS > 0 )); then
    env+=(CUDA_VISIBLE_DEVICES="$(seq -s, "$gpu0" $((gpu0 + tp - 1)))")
  fi
  start "$name" "$LOG_DIR/$name.log" env "${env[@]}" "$HERE/agg.sh" ${VLLM_ARGS[@]+"${VLLM_ARGS[@]}"}
}

[[ "$DRY_RUN" == 1 ]] || mkdir -p "$LOG_DIR"
gpu=0
prefill_urls=()
decode_urls=()
for ((i = 0; i < NUM_PREFILL; i++)); do
  engine kv_producer "$i" $((PREFILL_PORT + i)) "$PREFILL_TP" "$gpu"
  prefill_urls+=(--prefill "http://$ENGINE_HOST:$((PREFILL_PORT + i))")
  gpu=$((gpu + PREFILL_TP))
done
for ((i = 0; i < NUM_DECODE; i++)); do
  engine kv_consumer "$i" $((DECODE_PORT + i)) "$DECODE_TP" "$gpu"
  decode_urls+=(--decode "http://$ENGINE_HOST:$((DECODE_PORT + i))")
  gpu=$((gpu + DECODE_TP))
done
proxy=(env -u DYNKV_TRANSFER_SECRET "$PYTHON" -m dynkv.proxy "${prefill_urls[@]}" "${decode_urls[@]}"
       --host "$PROXY_HOST" --port "$PROXY_PORT")
if [[ "$DRY_RUN" == 1 ]]; then
  start proxy "" "${proxy[@]}"
  exit 0
fi

echo "dynkv disagg: ${names[*]} starting; logs in $LOG_DIR" >&2
# Wait for every engine's /health; an engine that exits first fails the start with its log's tail.
"$PYTHON" - "$READY_TIMEOUT" "${prefill_urls[@]}" "${decode_urls[@]}" <<'EOF' &
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[1])
urls = sys.argv[3::2]
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
      echo "dynkv disagg: ${names[$k]} exited while starting; last lines of ${logs[$k]}:" >&2
      tail -n 30 "${logs[$k]}" >&2
      kill "$waiter" 2>/dev/null || true
      exit 1
    fi
  done
  sleep 1
done
wait "$waiter" || { echo "dynkv disagg: engines did not become healthy (logs in $LOG_DIR)" >&2; exit 1; }

start proxy "$LOG_DIR/proxy.log" "${proxy[@]}"
echo "dynkv disagg: serving on http://$PROXY_HOST:$PROXY_PORT (proxy log $LOG_DIR/proxy.log)" >&2
# Serve until a signal arrives, the proxy exits, or no decode engine is left. Without prefill
# engines the proxy still answers: the decode engines then compute the prompts themselves.
while true; do
  alive=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
  wait -n "${alive[@]}" || true
  decoders=0
  for k in "${!pids[@]}"; do
    if kill -0 "${pids[$k]}" 2>/dev/null; then
      [[ ${names[$k]} == decode* ]] && decoders=$((decoders + 1))
    elif [[ -z "${reported[$k]:-}" ]]; then
      reported[$k]=1
      echo "dynkv disagg: ${names[$k]} exited; last lines of ${logs[$k]}:" >&2
      tail -n 10 "${logs[$k]}" >&2
      [[ ${names[$k]} == proxy ]] && exit 1
    fi
  done
  (( decoders )) || { echo "dynkv disagg: no decode engine left" >&2; exit 1; }
done
