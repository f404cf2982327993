#!/usr/bin/env bash
# Two prefill engines and two decode engines behind `dynkv proxy` (round robin), on one host (see
# worker/README.md). TP=2 per engine where 8 GPUs are visible, else TP=1 (CPU, or fewer GPUs).
set -euo pipefail
export NUM_PREFILL=2 NUM_DECODE=2
if [[ -z "${TP:-}" ]]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L | grep -c '^GPU')"
  fi
  export TP=$(( ${NUM_GPUS:-$gpus} >= 8 ? 2 : 1 ))
fi
exec "$(dirname "${BASH_SOURCE[0]}")/disagg.sh" "$@"
