"""The routing benchmark's pieces without vLLM: the driver against a fake proxy (turns carry the history),
and the summary (later-turn TTFT, share per engine, predicted and cached tokens)."""

from __future__ import annotations

import asyncio
import json
import random

from aiohttp import web

from dynkv.benchmarks.router import Conversation, Turn, drive_async, events_config, summarize


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
