"""End to end: ``dynkv bench load --endpoint`` against a real ``vllm serve`` with dynkv (CPU build, tiny model).

The server's device cache holds 0.4 of the workload's working set and dynkv's
host tier all of it: later turns find their conversation on the host tier,
which the run reads from the server's ``/metrics`` (``vllm:dynkv_*``) and
from the cached tokens vLLM reports per request.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynkv.benchmarks.load.workload import Workload, plan_sizes
from dynkv.testing.model import FIRST_WORD_ID, PRESETS, write_model
from dynkv.testing.server import ServerError, VLLMServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def test_bench_load_against_a_dynkv_server(tmp_path: Path) -> None:
    spec = PRESETS["tiny"]
    model = write_model(tmp_path / "tiny", preset="tiny")
    w = Workload(conversations=6, turns=3, prefix_tokens=256, user_tokens=32, answer_tokens=4, concurrency=2,
                 token_range=(FIRST_WORD_ID, spec.vocab_size))
    page = spec.kv_bytes_per_token(4) * 32
    sizes = plan_sizes(w, 32, page, 0.4, 1.25, 0.0)
    connector = {"kv_connector": "DynKVConnector", "kv_role": "kv_both", "kv_connector_module_path": "dynkv.connector",
                 "kv_connector_extra_config": {"host_pages": sizes.host_pages}}
    args = ["--dtype", "float32", "--block-size", "32", "--max-model-len", str(sizes.max_model_len),
            "--num-gpu-blocks-override", str(sizes.device_blocks), "--kv-cache-memory-bytes",
            str((sizes.device_blocks + 1) * page), "--enforce-eager", "--seed", "0", "--enable-prompt-tokens-details",
            "--kv-transfer-config", json.dumps(connector)]
    out = tmp_path / "out"
    with VLLMServer(str(model), args, log_path=tmp_path / "vllm.log") as server:
        try:
            server.wait_ready(timeout_s=600)
        except ServerError as e:
            pytest.fail(str(e))
        run = subprocess.run([sys.executable, "-m", "dynkv.cli", "bench", "load", "--endpoint", f"dynkv={server.url}",
                              "--conversations", "6", "--turns", "3", "--prefix-tokens", "256", "--user-tokens", "32",
                              "--answer-tokens", "4", "--concurrency", "2", "--token-range",
                              f"{FIRST_WORD_ID}:{spec.vocab_size}", "--out", str(out), "--no-plot"],
                             capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    s = json.loads((out / "load.json").read_text())["summaries"]["dynkv"]
    assert s["requests"] == 18 and s["errors"] == 0
    assert s["cached_share_later_turns"] > 0.5, "later turns are served from a cache"
    assert s["hits_blocks"]["host"] > 0 and s["bytes"]["h2d"] > 0, "dynkv's counters come from the server's /metrics"
