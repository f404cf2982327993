"""The routing benchmark's pieces without vLLM: the driver against a fake proxy (turns carry the history),
the summary (later-turn TTFT, share per engine, predicted and cached tokens), the shared-tier run's store
(a real redis-server) and engine config, the engines' command lines on a GPU and on CPU (``--dry-run``), and
an engine that never gets ready (stopped with its log's tail shown, the next one never started)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shlex
import shutil
import socket
import sys
import uuid
from pathlib import Path

import pytest
from aiohttp import web

from dynkv.benchmarks.router import (Conversation, RedisProcess, Turn, drive_async, events_config, main,
                                     shared_transfer_config, summarize)
from dynkv.config import DynKVConfig
from dynkv.testing.model import PRESETS


def dry_run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str
            ) -> tuple[list[tuple[dict[str, str], list[str]]], dict[str, list[str]], str]:
    """``main(--dry-run ...)``: per engine (its added environment, its command), per policy the proxy's command."""
    assert main(["--out", str(tmp_path / "r.json"), "--work", str(tmp_path / "w"), "--dry-run", *argv]) == 0
    text = capsys.readouterr().out
    engines, proxies = [], {}
    for line in text.splitlines():
        name, _, rest = line.partition(": ")
        if name.startswith("engine"):
            words = shlex.split(rest)
            env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-") and "/" not in w)
            engines.append((env, words[len(env):]))
        elif name.startswith("proxy "):
            proxies[name[6:]] = shlex.split(rest)
    return engines, proxies, text


def flag(cmd: list[str], name: str) -> str | None:
    """Value of the last ``name`` in ``cmd`` (as argparse reads it), None if absent."""
    at = [i for i, w in enumerate(cmd) if w == name]
    return cmd[at[-1] + 1] if at else None


def test_driver_sends_each_conversations_history_and_reads_engine_prediction_and_usage() -> None:
    seen: list[list[int]] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body["prompt"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-dynkv-engine": "http://e:1",
                                           "x-dynkv-predicted-cached-tokens": "32"})
        await resp.prepare(request)
        out = [len(body["prompt"]) % 97, 5]
        await resp.write(f"data: {json.dumps({'choices': [{'token_ids': out}]})}\n\n".encode())
        usage = {"prompt_tokens": len(body["prompt"]), "prompt_tokens_details": {"cached_tokens": 40}}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def scenario() -> tuple[list[Turn], list[Conversation]]:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            convs = [Conversation.make(random.Random(c), 8, 3, 2, 100) for c in range(3)]
            turns = await drive_async(f"http://127.0.0.1:{runner.addresses[0][1]}", convs, max_tokens=2,
                                      concurrency=2)
            return turns, convs
        finally:
            await runner.cleanup()

    turns, convs = asyncio.run(scenario())
    assert len(turns) == 6 and all(t.error is None for t in turns)
    for t in turns:
        conv = convs[t.conversation]
        want = conv.prefix + conv.users[0]
        if t.turn == 1:
            want = want + [len(want) % 97, 5] + conv.users[1]
        assert t.prompt_tokens == len(want) and want in seen
        assert (t.engine, t.predicted, t.cached, t.token_ids) == ("http://e:1", 32, 40, [len(want) % 97, 5])
        assert t.ttft_s is not None and t.ttft_s <= t.latency_s


def test_summary_counts_later_turns_shares_and_tokens() -> None:
    turns = [Turn(0, 0, 100, "a", 0, 0, 1.0), Turn(0, 1, 150, "a", 96, 96, 0.1), Turn(1, 0, 100, "b", 0, 0, 2.0),
             Turn(1, 1, 150, "b", 96, 64, 0.3), Turn(2, 0, 100, "a", 0, None, None, error="boom")]
    s = summarize(turns, ["a", "b"])
    assert s["share"] == {"a": 3, "b": 2} and s["errors"] == 1
    assert s["ttft_later_p50_s"] == 0.2 and s["ttft_first_p50_s"] == 1.5
    assert (s["predicted_tokens"], s["cached_tokens"], s["prompt_tokens"]) == (192, 160, 600)
    assert abs(s["max_share_over_mean"] - 3 / 2.5) < 1e-12
    assert json.loads(events_config(5557, 5558))["endpoint"] == "tcp://*:5557"


def test_shared_run_starts_a_redis_server_and_gives_engines_the_shared_tier_on_it(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    with RedisProcess(tmp_path / "redis") as store:
        with socket.create_connection(("127.0.0.1", store.port), timeout=10) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(16) == b"+PONG\r\n"
        cfg = shared_transfer_config(store.url, 24)
        assert cfg["kv_connector"] == "DynKVConnector"
        dyn = DynKVConfig.from_dict(cfg["kv_connector_extra_config"], env={})
        assert (dyn.remote_url, dyn.host_pages, dyn.disk_gb) == (store.url, 24, 0)
    with pytest.raises(OSError):  # stopped with the run
        socket.create_connection(("127.0.0.1", store.port), timeout=2).close()


def test_shared_run_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, why in ((["--redis", "--remote-url", "redis://h:1/0"], "not both"),
                      (["--redis", "--host-pages", "0"], "--host-pages 0: expected a page count >= 1")):
        with pytest.raises(SystemExit):
            main(["--out", "/dev/null", *argv])
        assert why in capsys.readouterr().err


def test_gpu_engines_run_bf16_on_a_share_of_the_gpu_with_the_device_cache_capped_and_the_engine_args(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    engines, proxies, text = dry_run(
        capsys, tmp_path, "--device", "cuda", "--gpu-share", "0.35", "--cache-share", "0.5",
        "--engine-arg", "attention_backend=TRITON_ATTN", "--engine-arg", "enforce_eager=true",
        "--engine-arg", "async_scheduling=false", "--engine-arg", 'compilation_config={"cudagraph_mode": "NONE"}')
    spec = PRESETS["llama3-8b"]
    # bench load's GPU workload: 32 conversations of a 4096-token prefix and 4 turns of 256 + 64 tokens.
    per_conv = math.ceil((4096 + 4 * (256 + 64)) / 16)
    assert len(engines) == 2 and not (tmp_path / "w").exists()  # nothing written, nothing started
    ports = set()
    for env, cmd in engines:
        assert env == {}  # no CPU-build settings
        assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        assert flag(cmd, "--model") == str(tmp_path / "w" / "llama3-8b")
        assert (flag(cmd, "--dtype"), flag(cmd, "--gpu-memory-utilization"), flag(cmd, "--block-size")) == (
            "bfloat16", "0.35", "16")
        assert flag(cmd, "--num-gpu-blocks-override") == str(math.ceil(0.5 * 32 * per_conv))
        assert flag(cmd, "--max-model-len") == str((per_conv + 1) * 16) and (per_conv + 1) * 16 <= \
            spec.max_position_embeddings
        assert "--kv-cache-memory-bytes" not in cmd and "VLLM_CPU_KVCACHE_SPACE" not in text
        assert flag(cmd, "--attention-backend") == "TRITON_ATTN"
        assert "--enforce-eager" in cmd and "--no-async-scheduling" in cmd
        assert json.loads(flag(cmd, "--compilation-config")) == {"cudagraph_mode": "NONE"}
        assert "--enable-prompt-tokens-details" in cmd
        events = json.loads(flag(cmd, "--kv-events-config"))
        ports.add((f"http://127.0.0.1:{flag(cmd, '--port')}", events["endpoint"].rsplit(":", 1)[1],
                   events["replay_endpoint"].rsplit(":", 1)[1]))
    assert len(ports) == 2 and "one after the other" in text
    assert set(proxies) == {"round-robin", "kv"}
    for policy, cmd in proxies.items():
        assert flag(cmd, "--policy") == policy
        got = {(cmd[i + 1], cmd[i + 3].rsplit(":", 1)[1], cmd[i + 5].rsplit(":", 1)[1])
               for i, w in enumerate(cmd) if w == "--engine"}
        assert got == ports


def test_cpu_engines_keep_float32_a_cache_of_fixed_bytes_and_the_cpu_settings(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    engines, _, text = dry_run(capsys, tmp_path, "--threads", "2", "--engine-arg", "max_num_seqs=8")
    per_conv = math.ceil((768 + 4 * (32 + 8)) / 32)
    blocks = math.ceil(0.6 * 12 * per_conv)
    for env, cmd in engines:
        assert env == {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
        assert (flag(cmd, "--dtype"), flag(cmd, "--block-size"), flag(cmd, "--num-gpu-blocks-override")) == (
            "float32", "32", str(blocks))
        assert flag(cmd, "--kv-cache-memory-bytes") == str(blocks * PRESETS["tiny"].kv_bytes_per_token(4) * 32)
        assert "--enforce-eager" in cmd and "--gpu-memory-utilization" not in cmd
        assert flag(cmd, "--max-num-seqs") == "8"
    assert "start together" in text


def test_three_engines_share_the_gpu_and_every_proxy_routes_over_all_three(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    engines, proxies, _ = dry_run(capsys, tmp_path, "--device", "cuda", "--engines", "3")
    assert len(engines) == 3
    assert {flag(cmd, "--gpu-memory-utilization") for _, cmd in engines} == {"0.267"}  # 0.8 of the GPU in all
    urls = {f"http://127.0.0.1:{flag(cmd, '--port')}" for _, cmd in engines}
    assert len(urls) == 3
    for cmd in proxies.values():
        assert {cmd[i + 1] for i, w in enumerate(cmd) if w == "--engine"} == urls


@pytest.mark.parametrize("argv, why", [
    (["--device", "cuda", "--gpu-share", "0.6"], "--gpu-share 0.6: expected 0 < share <= 0.5"),
    (["--device", "cuda", "--engines", "3", "--gpu-share", "0.4"], "--gpu-share 0.4: expected 0 < share <= 0.333"),
    (["--engines", "1"], "--engines 1: expected 2 or more"),
    (["--engine-arg", "enforce_eager"], "--engine-arg 'enforce_eager': expected KEY=VALUE"),
    (["--device", "cuda", "--cache-share", "0.1"], "--device-share=0.1 gives 1076 device blocks"),
    (["--block-size", "16"], "--block-size 16: expected a positive block size (a multiple of 32 on cpu)"),
    (["--max-tokens", "0"], "--max-tokens 0: expected an integer >= 1"),
])
def test_bad_options_are_refused_naming_the_option(argv: list[str], why: str,
                                                   capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "r.json"), "--dry-run", *argv])
    assert why in capsys.readouterr().err


def _alive(marker: str) -> list[int]:
    """Pids of running processes whose command line holds ``marker``."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
                state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in cmdline and state not in ("Z", "X"):
                out.append(int(entry.name))
    return out


def test_an_engine_that_never_gets_ready_is_stopped_with_its_log_and_the_next_is_never_started(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc to find leftover processes")
    marker = f"never-ready-{uuid.uuid4().hex}"
    # A stand-in engine: writes a line to its log, forks a child as vLLM's engine core does, never listens.
    script = (f"import os, sys, time; print('{marker} loading weights', flush=True); "
              "os.fork() or time.sleep(600); time.sleep(600)")
    monkeypatch.setattr("dynkv.testing.server.vllm_command", lambda model: [sys.executable, "-c", script, marker])
    work = tmp_path / "w"
    rc = main(["--out", str(tmp_path / "r.json"), "--work", str(work), "--device", "cuda", "--preset", "tiny",
               "--conversations", "2", "--concurrency", "1", "--prefix-tokens", "32", "--ready-timeout", "3"])
    err = capsys.readouterr().err
    assert rc == 1 and not (tmp_path / "r.json").exists()
    assert "engine0: vLLM not healthy after 3 s" in err and f"{marker} loading weights" in err
    assert not (work / "engine1.log").exists()  # one after the other: the second never started
    assert _alive(marker) == []  # the engine and its child were stopped
