"""``dynkv proxy`` against in-process fake engines: what each engine is sent, round robin, streaming, failures."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dynkv.proxy import Proxy, prefill_body


class FakeEngine:
    """A prefill or decode engine that records what it is sent."""

    def __init__(self, name: str, *, fail: bool = False) -> None:
        self.name, self.fail = name, fail
        self.bodies: list[dict[str, Any]] = []
        self.url = ""

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.fail:
            return web.json_response({"error": "down"}, status=500)
        if not body.get("stream"):
            return web.json_response({"engine": self.name, "kv_transfer_params": {"from": self.name},
                                      "choices": [{"text": "x"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for k in range(3):
            await resp.write(f"data: {json.dumps({'engine': self.name, 'k': k})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": self.name}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=500 if self.fail else 200)

    async def start(self) -> None:
        app = web.Application()
        for route in ("/v1/completions", "/v1/chat/completions"):
            app.router.add_post(route, self._generate)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"


async def serve(proxy_args: tuple[list[FakeEngine], list[FakeEngine]], scenario: Any) -> Any:
    prefill, decode = proxy_args
    for e in (*prefill, *decode):
        await e.start()
    proxy = Proxy([e.url for e in prefill], [e.url for e in decode])
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            return await scenario(session, url, proxy)
    finally:
        await runner.cleanup()
        for e in (*prefill, *decode):
            await e.runner.cleanup()


def test_prefill_body_asks_for_one_token_and_a_remote_decode() -> None:
    body = {"prompt": [1, 2], "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True},
            "min_tokens": 5, "n": 2, "max_completion_tokens": 50, "temperature": 0}
    out = prefill_body(body)
    assert out == {"prompt": [1, 2], "max_tokens": 1, "n": 1, "max_completion_tokens": 1, "temperature": 0,
                   "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
    assert body["max_tokens"] == 50  # the client's request is left alone


def test_round_robin_params_and_streaming() -> None:
    prefill = [FakeEngine("p0"), FakeEngine("p1")]
    decode = [FakeEngine("d0"), FakeEngine("d1")]

    async def scenario(session: aiohttp.ClientSession, url: str, proxy: Proxy) -> None:
        for i in range(4):
            async with session.post(url + "/v1/completions", json={"prompt": [i], "max_tokens": 8}) as r:
                assert r.status == 200
                assert (await r.json())["engine"] == f"d{i % 2}"
        async with session.post(url + "/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            text = (await r.read()).decode()
        assert [json.loads(line[6:])["k"] for line in text.splitlines() if line.startswith("data: {")] == [0, 1, 2]
        assert text.rstrip().endswith("data: [DONE]")
        async with session.get(url + "/health") as r:
            assert r.status == 200
        async with session.get(url + "/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "d0"

    asyncio.run(serve((prefill, decode), scenario))
    sent = prefill[0].bodies + prefill[1].bodies
    assert len(prefill[0].bodies) == 3 and len(prefill[1].bodies) == 2
    assert all(b["max_tokens"] == 1 and b["kv_transfer_params"]["do_remote_decode"] for b in sent)
    # Each decode request carries the params of the prefill engine that served it, and the client's max_tokens.
    got = [(b["kv_transfer_params"]["from"], b.get("max_tokens")) for b in decode[0].bodies + decode[1].bodies]
    assert got == [("p0", 8), ("p0", 8), ("p0", None), ("p1", 8), ("p1", 8)]
    assert decode[0].bodies[-1]["stream"] is True and "messages" in decode[0].bodies[-1]


def test_failed_prefill_falls_back_to_decode_alone() -> None:
    prefill, decode = [FakeEngine("p", fail=True)], [FakeEngine("d")]

    async def scenario(session: aiohttp.ClientSession, url: str, proxy: Proxy) -> None:
        body = {"prompt": "x", "max_tokens": 4, "kv_transfer_params": {"stale": True}}
        async with session.post(url + "/v1/completions", json=body) as r:
            assert r.status == 200
        async with session.post(url + "/v1/completions", data=b"{not json") as r:
            assert r.status == 400
        async with session.get(url + "/health") as r:
            assert r.status == 503 and (await r.json())["down"] == [prefill[0].url]
        async with session.get(url + "/proxy/stats") as r:
            assert await r.json() == {"requests": 1, "prefill_failed": 1, "no_kv_transfer_params": 0}

    asyncio.run(serve((prefill, decode), scenario))
    assert "kv_transfer_params" not in decode[0].bodies[0]


def test_needs_engines_of_both_kinds() -> None:
    with pytest.raises(ValueError, match="at least one prefill and one decode"):
        Proxy([], ["http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="expected http://host:port"):
        Proxy(["127.0.0.1:1"], ["http://127.0.0.1:2"])
