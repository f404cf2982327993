"""End to end: real ``vllm serve`` on the tiny test model, no connector, multi-turn workload.

Starts vLLM once (tens of seconds on two CPU cores), runs a 2-conversation,
2-turn workload twice through :func:`dynkv.benchmarks.serve.run_workload` — the
second run finds the prefixes in vLLM's prefix cache — and checks that greedy
outputs are identical and every TTFT was recorded. Also checks that stopping
the server leaves none of its processes behind.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from dynkv.benchmarks.serve import Workload, run_workload
from dynkv.benchmarks.serve_results import compare
from dynkv.benchmarks.demo import plan_sizes, server_args
from dynkv.testing.model import FIRST_WORD_ID, PRESETS, write_model
from dynkv.testing.server import ServerError, VLLMServer, cuda_visible

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def _group_gone(pgid: int) -> bool:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) != pgid:
                    continue
                with open(f"/proc/{entry.name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                        return False
            except OSError:
                continue
    return True


def test_vllm_multiturn_deterministic(tmp_path: Path) -> None:
    spec = PRESETS["tiny"]
    model = write_model(tmp_path / "tiny", preset="tiny")
    w = Workload(conversations=2, turns=2, prefix_tokens=200, user_tokens=16, max_tokens=8, logprobs=1,
                 token_range=(FIRST_WORD_ID, spec.vocab_size), timeout_s=300)
    sizes = plan_sizes(w, spec.kv_bytes_per_token())
    server = VLLMServer(str(model), server_args(sizes, gpu=cuda_visible()), log_path=tmp_path / "vllm.log")
    with server:
        try:
            server.wait_ready(timeout_s=600)
        except ServerError as e:
            pytest.fail(str(e))
        pgid = server.pid
        first = run_workload({"a": server.url}, w, progress=False)["a"]
        second = run_workload({"b": server.url}, w, progress=False)["b"]
    assert _group_gone(pgid), "vLLM processes survived stop()"
    for res in (first, second):
        assert [r.error for r in res.requests] == [None] * w.num_requests, server.log_tail()
        for r in res.requests:
            assert r.ttft_s is not None and 0 < r.ttft_s <= r.latency_s
            assert len(r.token_ids) == r.output_tokens == w.max_tokens
            assert len(r.logprobs) == w.max_tokens
            assert all(0 <= t < spec.vocab_size for t in r.token_ids)
        # The server tokenized exactly the prompts sent: prefix + turns.
        turn2 = [r for r in res.requests if r.turn == 1]
        assert all(r.prompt_tokens == 200 + 16 + 8 + 16 for r in turn2)
    c = compare(first, second)
    assert c["identical"], c
    # Different conversations give different answers (the model is prompt-sensitive).
    assert len({tuple(r.token_ids) for r in first.requests}) == w.num_requests


def test_free_port_is_bindable_and_outside_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port handed to a server that binds it minutes later cannot be one any socket may get on its own."""
    import socket

    import dynkv.testing.server as vs

    lo, hi = vs._ephemeral_ports()
    ports = {vs.free_port() for _ in range(20)}
    for port in ports:
        assert not lo <= port <= hi and port >= vs._PORT_FLOOR, (port, lo, hi)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    monkeypatch.setattr(vs, "_ephemeral_ports", lambda: (vs._PORT_FLOOR + 10, 65000))
    assert vs.free_port() > 0, "no room below the range: the kernel picks"
