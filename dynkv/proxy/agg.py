"""``dynkv proxy --engine URL ...``: one OpenAI-compatible endpoint over N aggregated engines.

Each ``/v1/completions`` or ``/v1/chat/completions`` request (streamed or
not) goes whole to one engine, picked by :class:`~dynkv.proxy.router.Router`.
For ``kv`` routing the proxy needs the prompt's tokens: a completion's
``prompt`` given as token ids is used as is; text and chat messages are
tokenized by an engine's ``/tokenize`` (chat: with its chat template and
``add_generation_prompt``, as the engine does for the request). Their
block hashes (:mod:`dynkv.proxy.block_hash`) are looked up in the prefix
index that the engines' KV events keep (:mod:`dynkv.proxy.events`).
Requests carrying a ``cache_salt`` are hashed with it; LoRA and multimodal
requests are routed without a prediction.

Failures: an engine that refuses a connection is taken out of rotation and
the request goes to another; one that fails its ``/health`` probe (every
``health_interval_s``) is taken out and its requests in flight end with
HTTP 502 (or, once streaming, a final ``error`` event) naming it. An engine
out of rotation is probed again after a backoff that doubles per failure;
when it answers, its KV events are replayed from the start.

An engine with KV events that accepted a request is taken to hold the
prompt's full blocks on its device at once (its events confirm them a step later, or remove them
on eviction), so a conversation's next turn sent the moment an answer ends
still finds its engine.

Each answer carries ``x-dynkv-engine`` (where it ran) and
``x-dynkv-predicted-cached-tokens``. The proxy asks engines for usage in
streams (``stream_options.include_usage``) to count the cached tokens they
report, and drops that last chunk when the client did not ask for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from dynkv.proxy.block_hash import block_hashes, normalize
from dynkv.proxy.events import EngineFeed, Subscriber
from dynkv.proxy.metrics import RouterMetrics
from dynkv.proxy.router import PARK_WEIGHT, SESSION_TTL_S, Decision, Router

__all__ = ["AggProxy"]

log = logging.getLogger("dynkv.proxy")

_ROUTES = ("/v1/completions", "/v1/chat/completions")
_PASS_HEADERS = ("authorization", "x-request-id")
_CHAT_TOKENIZE = ("add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs",
                  "tools", "add_special_tokens")


class EngineDown(Exception):
    """The engine serving a request was taken out of rotation while it ran."""


class AggProxy:
    """The aggregated proxy's state: router, event feeds, sessions, metrics.

    Parameters
    ----------
    engines
        Engine base URLs (``http://host:port``).
    policy
        ``round-robin``, ``least-loaded`` or ``kv``.
    events
        Engine -> ``(publisher endpoint, replay endpoint or None)`` of its KV
        events; engines without are routed by ``kv`` as if they held nothing.
    snapshots
        Engine -> the URL of its KV snapshot (dynkv's ``/kv/snapshot``), asked
        for when its replay buffer no longer reaches back.
    hash_algo, hash_seed
        The engines' ``--prefix-caching-hash-algo`` and ``PYTHONHASHSEED``.
    block_size
        The engines' block size; default: learned from their first events.
    load_weight, park_weight, session_ttl_s
        ``kv`` routing's weights (:class:`~dynkv.proxy.router.Router`).
    """

    def __init__(self, engines: Sequence[str], *, policy: str = "kv",
                 events: dict[str, tuple[str, str | None]] | None = None,
                 snapshots: dict[str, str] | None = None, hash_algo: str = "sha256",
                 hash_seed: str | None = None, block_size: int | None = None, load_weight: float = 1.0,
                 park_weight: float = PARK_WEIGHT, session_ttl_s: float = SESSION_TTL_S, timeout_s: float = 600.0,
                 health_interval_s: float = 2.0, backoff_s: float = 1.0,
                 backoff_max_s: float = 30.0, topic: str = "") -> None:
        for url in engines:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"engine URL {url!r}: expected http://host:port")
        engines = [u.rstrip("/") for u in engines]
        events = {k.rstrip("/"): v for k, v in (events or {}).items()}
        unknown = set(events) - set(engines)
        if unknown:
            raise ValueError(f"KV events given for {sorted(unknown)}, which are not among the engines {engines}")
        if policy == "kv" and not events:
            log.warning("routing policy kv without KV events (--kv-events): no engine is known to hold anything, "
                        "so requests go to the least loaded")
        from dynkv.proxy.block_hash import none_hash

        none_hash(hash_algo, hash_seed)  # bad algorithm or missing seed: fail now, naming the option
        self.router = Router(engines, policy, load_weight=load_weight, park_weight=park_weight,
                             session_ttl_s=session_ttl_s, backoff_s=backoff_s, backoff_max_s=backoff_max_s)
        self.hash_algo, self.hash_seed, self.block_size = hash_algo, hash_seed, block_size
        self.timeout_s, self.health_interval_s = timeout_s, health_interval_s
        self.feeds = {e: EngineFeed(e, self.router.index, hash_algo=hash_algo, hash_seed=hash_seed,
                                    block_size=block_size) for e in events}
        for feed in self.feeds.values():
            feed.on_mismatch = self._no_predictions
        snapshots = {k.rstrip("/"): v for k, v in (snapshots or {}).items()}
        self.subscriber = Subscriber(self.feeds, events, snapshots=snapshots, topic=topic) if events else None
        self.metrics = RouterMetrics(self._state)
        self._inflight: dict[str, set[asyncio.Task[Any]]] = {e: set() for e in engines}
        self._streams: dict[asyncio.Task[Any], Any] = {}  # requests whose answer is streaming
        self._session: Any = None
        self._health_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle --------------------------------------------------------------

    def app(self) -> Any:
        """The aiohttp application."""
        from aiohttp import web

        app = web.Application(client_max_size=1 << 28)
        for route in _ROUTES:
            app.router.add_post(route, self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/proxy/stats", self._stats)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: Any) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=10),
                                              connector=aiohttp.TCPConnector(limit=0), read_bufsize=1 << 24)
        if self.subscriber is not None:
            await asyncio.to_thread(self.subscriber.start)
        self._health_task = asyncio.create_task(self._health_loop())

    async def _stop(self, app: Any) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self.subscriber is not None:
            await asyncio.to_thread(self.subscriber.close)
        await self._session.close()

    def _no_predictions(self, engine: str) -> None:
        # Called from the subscriber's thread.
        self.router.engines[engine].predict = False

    def _state(self) -> tuple[dict[str, tuple[bool, int, int]], dict[str, dict[str, int]],
                              dict[str, dict[str, int]]]:
        engines = {u: (st.up, st.in_flight, st.parked_tokens) for u, st in self.router.engines.items()}
        return engines, self.router.index.counts(), {e: dict(f.counts) for e, f in self.feeds.items()}

    # -- health -----------------------------------------------------------------

    async def _probe(self, url: str) -> str | None:
        """None when ``url`` answers ``/health`` with 200, else what went wrong."""
        import aiohttp

        try:
            async with self._session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return None if r.status == 200 else f"/health answered HTTP {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return f"/health failed: {e or type(e).__name__}"

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            now = time.monotonic()
            urls = [*self.router.up(), *self.router.due_probes(now)]
            for url, err in zip(urls, await asyncio.gather(*(self._probe(u) for u in urls))):
                self._health_result(url, err)

    def _health_result(self, url: str, err: str | None) -> None:
        st = self.router.engines[url]
        if err is None:
            if not st.up:
                log.info("engine %s answers again: back in rotation", url)
                self.router.recovered(url)
                if self.subscriber is not None and url in self.feeds:
                    self.subscriber.resync(url)
            return
        self._engine_failed(url, err)

    def _engine_failed(self, url: str, err: str) -> None:
        st = self.router.engines[url]
        was_up = st.up
        self.router.failed(url, time.monotonic(), err)
        self.metrics.failures.labels(url).inc()
        if was_up:
            log.warning("engine %s out of rotation (%s); %d request(s) in flight on it fail; next try in %.1f s",
                        url, err, len(self._inflight[url]), st.retry_at - time.monotonic())
            for task in list(self._inflight[url]):
                task.cancel(msg=f"engine {url} is down: {err}")

    # -- requests ---------------------------------------------------------------

    async def _tokens(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> list[int] | None:
        """The prompt's token ids, as the engine will see them; None when unknown."""
        import aiohttp

        if path == "/v1/completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in prompt):
                return prompt
            if not isinstance(prompt, str):
                return None  # a batch of prompts: routed as one, without a prediction
            req: dict[str, Any] = {"prompt": prompt, "add_special_tokens": body.get("add_special_tokens", True)}
        else:
            if not isinstance(body.get("messages"), list):
                return None
            req = {"messages": body["messages"], **{k: body[k] for k in _CHAT_TOKENIZE if k in body}}
        if "model" in body:
            req["model"] = body["model"]
        for url in self.router.up():
            try:
                async with self._session.post(url + "/tokenize", json=req, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=30)) as r:
                    if r.status != 200:
                        log.debug("tokenize on %s: HTTP %d %s", url, r.status, (await r.text())[:200])
                        return None  # the engine will answer the request with the same complaint
                    tokens = (await r.json()).get("tokens")
                    return tokens if isinstance(tokens, list) else None
            except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
                continue
        return None

    def _block_size(self) -> int:
        if self.block_size:
            return self.block_size
        return next((f.block_size for f in self.feeds.values() if f.block_size), 0)

    async def _route(self, request: Any, body: dict[str, Any], headers: dict[str, str],
                     tried: set[str]) -> tuple[Decision | None, int, list[int] | None]:
        t0 = time.perf_counter()
        tokens = None
        predictable = not body.get("lora_request") and "multi_modal_data" not in body
        if predictable and (self.router.policy == "kv" or isinstance(body.get("prompt"), list)):
            tokens = await self._tokens(request.path, body, headers)
        bs = self._block_size()
        hashes = None
        if tokens and bs:
            salt = body.get("cache_salt")
            extra = (("cache_salt", salt),) if isinstance(salt, str) and salt else None
            try:
                hashes = [normalize(h) for h in block_hashes(tokens, bs, algo=self.hash_algo, seed=self.hash_seed,
                                                             first_extra=extra)]
            except (TypeError, ValueError):
                hashes = None  # odd token ids: the engine will say what is wrong
        decision = self.router.choose(hashes, block_size=bs, prompt_tokens=len(tokens or ()), exclude=tried,
                                      now=time.monotonic())
        self.metrics.route_seconds.observe(time.perf_counter() - t0)
        return decision, len(tokens or ()), hashes

    async def _generate(self, request: Any) -> Any:
        import aiohttp

        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_request_error")
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASS_HEADERS}
        tried: set[str] = set()
        while True:
            decision, n_tokens, hashes = await self._route(request, body, headers, tried)
            if decision is None:
                down = {u: st.last_error for u, st in self.router.engines.items() if not st.up}
                return _error(503, f"no engine in rotation (down: {down})", "engine_unavailable")
            url = decision.engine
            tried.add(url)
            self.router.begin(url, n_tokens, hashes=hashes, now=time.monotonic())
            task = asyncio.create_task(self._forward(request, url, body, headers, decision, hashes))
            self._inflight[url].add(task)
            try:
                return await asyncio.shield(task)
            except aiohttp.ClientConnectorError as e:
                self._engine_failed(url, f"connection failed: {e}")  # never reached it: another engine may
            except asyncio.CancelledError:
                if not task.cancelled():
                    task.cancel()
                    raise  # the client went away
                return await self._lost(request, url, task)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                self._engine_failed(url, f"{type(e).__name__}: {e}")
                return await self._lost(request, url, task)
            finally:
                self._inflight[url].discard(task)
                self.router.end(url, n_tokens, hashes=hashes, now=time.monotonic())
                self._streams.pop(task, None)

    async def _lost(self, request: Any, url: str, task: asyncio.Task[Any]) -> Any:
        """The answer of a request whose engine failed under it: 502, or an error event if streaming began."""
        why = self.router.engines[url].last_error or "it stopped answering"
        msg = f"engine {url} failed while serving this request ({why}); retry it"
        out = self._streams.get(task)
        if out is None:
            return _error(502, msg, "engine_failed")
        err = json.dumps({"error": {"message": msg, "type": "engine_failed", "code": 502}})
        try:
            await out.write(f"data: {err}\n\n".encode())
            await out.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return out

    async def _forward(self, request: Any, url: str, body: dict[str, Any], headers: dict[str, str],
                       decision: Decision, hashes: list[int] | None) -> Any:
        from aiohttp import web

        m = self.metrics
        m.requests.labels(url, self.router.policy).inc()
        m.predicted.labels(url).inc(decision.predicted_tokens)
        stream = bool(body.get("stream"))
        out_body = dict(body)
        strip_usage = False
        if stream:
            opts = dict(body.get("stream_options") or {})
            if not opts.get("include_usage"):
                strip_usage = True
                opts["include_usage"] = True
                out_body["stream_options"] = opts
        info = {"x-dynkv-engine": url, "x-dynkv-predicted-cached-tokens": str(decision.predicted_tokens)}
        async with self._session.post(url + request.path, json=out_body, headers=headers) as resp:
            if resp.status == 200 and hashes and url in self.feeds:
                # The engine computes the prompt now; its events say so only after the step that stored it, and a
                # client's next turn may come sooner. Its device blocks are taken as held until they say otherwise.
                self.router.index.stored(url, "GPU", hashes)
            if not stream or resp.status != 200:
                data = await resp.read()
                if resp.status == 200:
                    self._count_usage(url, data)
                return web.Response(body=data, status=resp.status, content_type=resp.content_type, headers=info)
            out = web.StreamResponse(status=resp.status, headers={
                "Content-Type": resp.headers.get("Content-Type", "text/event-stream"), "Cache-Control": "no-cache",
                **info})
            await out.prepare(request)
            self._streams[asyncio.current_task()] = out  # type: ignore[index]
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                keep = [ev for ev in events if not self._usage_event(url, ev, strip_usage)]
                if keep:
                    await out.write(b"".join(ev + b"\n\n" for ev in keep))
            if buf:
                await out.write(buf)
            await out.write_eof()
            return out

    def _usage_event(self, url: str, event: bytes, strip: bool) -> bool:
        """Counts the usage an SSE event carries; True when it is the usage-only chunk the client did not ask for."""
        if b'"usage"' not in event or not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
            return False
        try:
            chunk = json.loads(event[6:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        if not isinstance(chunk, dict) or not isinstance(chunk.get("usage"), dict):
            return False
        self._add_usage(url, chunk["usage"])
        return strip and not chunk.get("choices")

    def _count_usage(self, url: str, data: bytes) -> None:
        try:
            answer = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if isinstance(answer, dict) and isinstance(answer.get("usage"), dict):
            self._add_usage(url, answer["usage"])

    def _add_usage(self, url: str, usage: dict[str, Any]) -> None:
        prompt = usage.get("prompt_tokens")
        if isinstance(prompt, int):
            self.metrics.prompt_tokens.labels(url).inc(prompt)
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if isinstance(cached, int):
            self.metrics.actual.labels(url).inc(cached)

    # -- the rest -----------------------------------------------------------------

    async def _models(self, request: Any) -> Any:
        from aiohttp import web

        for url in self.router.up():
            try:
                async with self._session.get(url + "/v1/models") as resp:
                    return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)
            except Exception:  # noqa: BLE001 - any failure: ask the next engine
                continue
        return _error(503, "no engine in rotation", "engine_unavailable")

    async def _health(self, request: Any) -> Any:
        """200 while some engine is in rotation, else 503; the body says which are out and why."""
        from aiohttp import web

        down = {u: st.last_error for u, st in self.router.engines.items() if not st.up}
        return web.json_response({"up": self.router.up(), "down": down}, status=200 if self.router.up() else 503)

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _stats(self, request: Any) -> Any:
        from aiohttp import web

        engines = {u: {"up": st.up, "in_flight": st.in_flight, "parked_tokens": st.parked_tokens,
                       "failures": st.failures,
                       "predict": st.predict, "last_error": st.last_error}
                   for u, st in self.router.engines.items()}
        return web.json_response({"policy": self.router.policy, "engines": engines,
                                  "blocks": self.router.index.counts(),
                                  "events": {e: {**f.counts, "last_seq": f.last_seq, "block_size": f.block_size,
                                                 "hash_mismatch": f.hash_mismatch} for e, f in self.feeds.items()}})


def _error(status: int, message: str, kind: str) -> Any:
    from aiohttp import web

    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)
