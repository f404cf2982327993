"""``dynkv proxy --engine ...`` against in-process fake engines: kv routing from the prefix index, tokenizing
text and chat, usage counted and the usage chunk the client did not ask for dropped, engines that refuse
connections or stop answering mid-request."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="dynkv proxy's dependencies: pip install 'dynkv[proxy]'")
pytest.importorskip("msgspec", reason="dynkv proxy's dependencies: pip install 'dynkv[proxy]'")
from aiohttp import web

from dynkv.proxy.agg import AggProxy
from dynkv.proxy.block_hash import block_hashes, normalize
from dynkv.testing.server import free_port

BS = 4


class FakeEngine:
    """An engine that records requests, tokenizes text as one token per character, and can be made to hang."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bodies: list[dict[str, Any]] = []
        self.tokenized: list[dict[str, Any]] = []
        self.hang = False
        self.cached = 0
        self.url = ""
        self.entered = asyncio.Event()

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        usage = {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": self.cached}}
        if not body.get("stream"):
            if self.hang:
                self.entered.set()
                await asyncio.sleep(3600)
            return web.json_response({"engine": self.name, "choices": [{"text": "ab"}], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for k in range(2):
            await resp.write(f"data: {json.dumps({'choices': [{'text': str(k)}], 'usage': None})}\n\n".encode())
            if self.hang:
                self.entered.set()
                await asyncio.sleep(3600)
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.tokenized.append(body)
        text = body["prompt"] if "prompt" in body else "".join(m["content"] for m in body["messages"]) + "|"
        return web.json_response({"tokens": [ord(c) for c in text], "count": len(text)})

    async def _health(self, request: web.Request) -> web.Response:
        if self.hang:
            await asyncio.sleep(3600)
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        for route in ("/v1/completions", "/v1/chat/completions"):
            app.router.add_post(route, self._generate)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/health", self._health)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"


async def serve(n: int, scenario: Any, *, events: bool = False, **kw: Any) -> Any:
    engines = [FakeEngine(f"e{i}") for i in range(n)]
    for e in engines:
        await e.start()
    # Event streams that stay silent (nothing listens there): the index is filled by hand.
    feeds = {e.url: (f"tcp://127.0.0.1:{free_port()}", None) for e in engines} if events else None
    proxy = AggProxy([e.url for e in engines], events=feeds, block_size=BS, health_interval_s=0.2, backoff_s=60.0,
                      backoff_max_s=60.0, **kw)
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            return await scenario(session, url, proxy, engines)
    finally:
        await runner.cleanup()
        for e in engines:
            await e.runner.cleanup()


def held_by(proxy: AggProxy, engine: FakeEngine, tokens: list[int], medium: str = "GPU") -> None:
    proxy.router.index.stored(engine.url, medium, [normalize(h) for h in block_hashes(tokens, BS)])


def metric(text: str, name: str, engine: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'engine="{engine}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_kv_routes_token_text_and_chat_prompts_to_their_prefix_and_counts_usage() -> None:
    async def scenario(session: aiohttp.ClientSession, url: str, proxy: AggProxy, engines: list) -> None:
        e0, e1 = engines
        e1.cached = 8
        tokens = list(range(1000, 1013))
        held_by(proxy, e1, tokens[:8])
        async with session.post(url + "/v1/completions", json={"prompt": tokens, "max_tokens": 2}) as r:
            assert r.status == 200 and (await r.json())["engine"] == "e1"
            assert r.headers["x-dynkv-engine"] == e1.url and r.headers["x-dynkv-predicted-cached-tokens"] == "8"
        assert e0.tokenized == e1.tokenized == []  # token ids need no tokenizing
        text = "hello world, again"
        held_by(proxy, e0, [ord(c) for c in text][:12], "CPU")
        async with session.post(url + "/v1/completions", json={"model": "m", "prompt": text}) as r:
            assert (await r.json())["engine"] == "e0" and r.headers["x-dynkv-predicted-cached-tokens"] == "12"
        assert [t["prompt"] for t in e0.tokenized + e1.tokenized] == [text]
        msgs = [{"role": "user", "content": "chat prefix here"}]
        held_by(proxy, e1, [ord(c) for c in "chat prefix here|"])
        async with session.post(url + "/v1/chat/completions", json={"messages": msgs, "stream": True,
                                                                     "add_generation_prompt": True}) as r:
            assert r.headers["x-dynkv-engine"] == e1.url
            events = [ln for ln in (await r.text()).split("\n\n") if ln]
        # The engine was asked for usage; the client, which did not ask, gets no usage chunk.
        assert e1.bodies[-1]["stream_options"] == {"include_usage": True}
        assert events == [f"data: {json.dumps({'choices': [{'text': '0'}], 'usage': None})}",
                          f"data: {json.dumps({'choices': [{'text': '1'}], 'usage': None})}", "data: [DONE]"]
        tok = [t for t in e0.tokenized + e1.tokenized if "messages" in t]
        assert tok == [{"messages": msgs, "add_generation_prompt": True}]
        # An engine that took a prompt is taken to hold its blocks before its events say so: the next turn follows.
        fresh = list(range(5000, 5010))
        async with session.post(url + "/v1/completions", json={"prompt": fresh}) as r:
            assert r.headers["x-dynkv-engine"] == e0.url  # held nowhere: e0 was sent fewer requests
        async with session.post(url + "/v1/completions", json={"prompt": fresh + [1, 2, 3]}) as r:
            assert r.headers["x-dynkv-engine"] == e0.url and r.headers["x-dynkv-predicted-cached-tokens"] == "8"
        async with session.get(url + "/metrics") as r:
            m = await r.text()
        assert metric(m, "dynkv_router_requests_total", e1.url) == 2
        assert metric(m, "dynkv_router_predicted_cached_tokens_total", e1.url) == 8 + 16
        assert metric(m, "dynkv_router_actual_cached_tokens_total", e1.url) == 16  # usage of both of e1's answers
        assert metric(m, "dynkv_router_predicted_cached_tokens_total", e0.url) == 12 + 8
        assert metric(m, "dynkv_router_prompt_tokens_total", e0.url) == 30
        assert "dynkv_router_route_seconds_count 5.0" in m
        # Parked on e0 between turns: the text prompt, and the fresh conversation at its latest prompt only.
        assert metric(m, "dynkv_router_parked_tokens", e0.url) == len(text) + len(fresh) + 3
        async with session.get(url + "/proxy/stats") as r:
            assert (await r.json())["engines"][e0.url]["parked_tokens"] == len(text) + len(fresh) + 3

    asyncio.run(serve(2, scenario, policy="kv", events=True))


def test_an_engine_refusing_connections_leaves_rotation_and_the_request_goes_elsewhere() -> None:
    async def scenario(session: aiohttp.ClientSession, url: str, proxy: AggProxy, engines: list) -> None:
        e0, e1 = engines
        await e0.runner.cleanup()
        got = []
        for _ in range(4):
            async with session.post(url + "/v1/completions", json={"prompt": [1, 2, 3]}) as r:
                assert r.status == 200
                got.append((await r.json())["engine"])
        assert got == ["e1"] * 4
        async with session.get(url + "/health") as r:
            h = await r.json()
        assert r.status == 200 and h["up"] == [e1.url] and "connection failed" in h["down"][e0.url]
        await e1.runner.cleanup()
        async with session.post(url + "/v1/completions", json={"prompt": [1, 2, 3]}) as r:
            assert r.status == 503 and "no engine in rotation" in (await r.json())["error"]["message"]

    asyncio.run(serve(2, scenario, policy="round-robin"))


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_on_an_engine_that_stops_answering_ends_with_an_error_naming_it(stream: bool) -> None:
    async def scenario(session: aiohttp.ClientSession, url: str, proxy: AggProxy, engines: list) -> None:
        e0, e1 = engines
        e0.hang = True
        async with session.post(url + "/v1/completions", json={"prompt": [1, 2], "stream": stream}) as r:
            if not stream:
                assert r.status == 502
                err = (await r.json())["error"]
            else:
                assert r.status == 200
                last = [ev for ev in (await r.text()).split("\n\n") if ev][-1]
                err = json.loads(last.removeprefix("data: "))["error"]
        assert err["type"] == "engine_failed" and e0.url in err["message"] and "/health failed" in err["message"]
        assert proxy.router.up() == [e1.url] and proxy.router.engines[e0.url].in_flight == 0
        async with session.post(url + "/v1/completions", json={"prompt": [1, 2]}) as r:
            assert (await r.json())["engine"] == "e1"

    asyncio.run(serve(2, scenario, policy="round-robin"))


def test_bad_proxy_settings_are_named() -> None:
    with pytest.raises(ValueError, match="expected http://host:port"):
        AggProxy(["127.0.0.1:8000"])
    with pytest.raises(ValueError, match="not among the engines"):
        AggProxy(["http://a:1"], events={"http://b:1": ("tcp://b:5557", None)})
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        AggProxy(["http://a:1"], hash_algo="xxhash_cbor") if _has_xxhash() else AggProxy(
            ["http://a:1"], hash_algo="xxhash", hash_seed=None)


def _has_xxhash() -> bool:
    import importlib.util

    return importlib.util.find_spec("xxhash") is not None
