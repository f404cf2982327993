"""The routing benchmark's pieces without vLLM: the driver against a fake proxy (turns carry the history),
the summary (later-turn TTFT, share per engine, predicted and cached tokens), and the shared-tier run's store
(a real redis-server) and engine config."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
from pathlib import Path

import pytest
from aiohttp import web

from dynkv.benchmarks.router import (Conversation, RedisProcess, Turn, drive_async, events_config, main,
                                     shared_transfer_config, summarize)
from dynkv.config import DynKVConfig


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
