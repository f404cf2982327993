#!/usr/bin/env bash
# One prefill engine and one decode engine behind `dynkv proxy`, on one host (see worker/README.md).
# PREFILL_TP and DECODE_TP may differ (e.g. 2 and 1): pages are TP-agnostic.
set -euo pipefail
export NUM_PREFILL=1 NUM_DECODE=1
exec "$(dirname "${BASH_SOURCE[0]}")/disagg.sh" "$@"
