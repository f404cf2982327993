#!/usr/bin/env bash
# The slim vLLM 0.26 bundle (see ../shared/tools/vllm-gpu-bundle) on a GPU host that takes at
# most 64 MiB per transfer, dynkv's tree included: part-a is cut in two, so it takes three
# transfers (a1, a2, part-b), back to back so that the host's /tmp survives in between.
#
#   here:        bench/vllm_bundle.sh split .vllm-bundle      # part-a -> a1/ + a2/ (about 31 + 28 MiB)
#   on the host: bench/vllm_bundle.sh add .vllm-bundle/a1     # one call per transfer, any order;
#                bench/vllm_bundle.sh add .vllm-bundle/a2     # it installs once every piece is in
#                bench/vllm_bundle.sh add .vllm-bundle/part-b && source /tmp/vllm-env.sh
set -euo pipefail
cmd=${1:?usage: vllm_bundle.sh split BUNDLE_DIR | add PART_DIR}
dir=${2:?usage: vllm_bundle.sh split BUNDLE_DIR | add PART_DIR}
STASH=/tmp/vllm-parts
case $cmd in
  split)
    tarball="$dir/part-a/vllm-0.26.0-slim.tar.xz"
    [[ -f $tarball ]] || { echo "no $tarball: run make-bundle.sh first" >&2; exit 1; }
    mkdir -p "$dir/a1" "$dir/a2"
    rm -f "$dir"/a1/a-chunk.* "$dir"/a2/a-chunk.*
    split -b 31M "$tarball" "$dir/a1/a-chunk."
    mv "$dir"/a1/a-chunk.ab "$dir/a2/"
    (cd "$dir/part-a" && sha256sum vllm-0.26.0-slim.tar.xz) | tee "$dir/a1/a.sha256" > "$dir/a2/a.sha256"
    du -sh "$dir/a1" "$dir/a2" "$dir/part-b"
    ;;
  add)
    mkdir -p "$STASH"
    cp "$dir"/* "$STASH/"
    if ls "$STASH"/*.whl > /dev/null 2>&1 && [[ ! -d /tmp/vllm-deps ]]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/vllm-deps "$STASH"/*.whl
      rm -f "$STASH"/*.whl
      echo "dependencies installed to /tmp/vllm-deps"
    fi
    if [[ -f $STASH/a-chunk.aa && -f $STASH/a-chunk.ab && ! -d /tmp/vllm-site/vllm ]]; then
      cat "$STASH"/a-chunk.aa "$STASH"/a-chunk.ab > "$STASH/vllm-0.26.0-slim.tar.xz"
      (cd "$STASH" && sha256sum -c a.sha256)
      mkdir -p /tmp/vllm-site && xz -dc "$STASH/vllm-0.26.0-slim.tar.xz" | tar xf - -C /tmp/vllm-site
      rm -f "$STASH"/a-chunk.* "$STASH/vllm-0.26.0-slim.tar.xz"
      echo "vllm unpacked to /tmp/vllm-site"
    fi
    cat > /tmp/vllm-env.sh <<'ENV'
export PYTHONPATH=/tmp/vllm-site:/tmp/vllm-deps${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
export VLLM_HOST_IP=127.0.0.1 MASTER_ADDR=127.0.0.1 GLOO_SOCKET_IFNAME=lo NCCL_SOCKET_IFNAME=lo
ENV
    if [[ -d /tmp/vllm-site/vllm && -d /tmp/vllm-deps ]]; then echo "vLLM ready: source /tmp/vllm-env.sh"
    else echo "vLLM bundle: waiting for more parts"; fi
    ;;
  *) echo "unknown command $cmd (split | add)" >&2; exit 2 ;;
esac
