"""``dynkv proxy``: one OpenAI-compatible endpoint in front of prefill and decode engines.

(With ``--engine URL`` instead, it fronts N aggregated engines and routes
each request whole to one of them: :mod:`dynkv.proxy.agg`.)

Each ``/v1/completions`` or ``/v1/chat/completions`` request goes first to a
prefill engine (``kv_role`` ``kv_producer``) as a one-token, non-streaming
request that asks for a remote decode; the ``kv_transfer_params`` in its
answer go with the original request to a decode engine (``kv_consumer``),
whose answer — streamed or not — is the client's. Engines of each kind are
taken in turn (round robin). When the prefill engine fails, the decode engine
gets the request without ``kv_transfer_params`` and computes the prompt
itself: a slower answer, never a lost one.

The proxy knows nothing of dynkv's params beyond passing them on, so it also
fronts engines running vLLM's own NixlConnector.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from dynkv.proxy.block_hash import HASH_ALGOS
from dynkv.proxy.router import PARK_WEIGHT, POLICIES, SESSION_TTL_S

__all__ = ["DESCRIPTION", "Proxy", "prefill_body"]

log = logging.getLogger("dynkv.proxy")

DESCRIPTION = (
    "OpenAI-compatible proxy. Disaggregated (--prefill/--decode): each request is prefilled on a prefill engine "
    "(max_tokens=1), then decoded on a decode engine with the returned kv_transfer_params; round robin over "
    "several of each. Aggregated (--engine, repeated): each request goes to one engine by --policy (kv: the "
    "longest cached prefix, from the engines' KV events, against load)."
)
_ROUTES = ("/v1/completions", "/v1/chat/completions")
# Request headers passed on to the engines (the rest describe the client's connection, not the request).
_PASS_HEADERS = ("authorization", "x-request-id")


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request sent to a prefill engine: one output token, no streaming, a remote decode asked for."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "min_tokens")}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["n"] = 1
    out["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
    return out


class Proxy:
    """The proxy's state: backends, their rotation, and counters.

    Parameters
    ----------
    prefill, decode
        Base URLs (``http://host:port``) of the prefill and decode engines.
    timeout_s
        Bound on one request to one engine.
    """

    def __init__(self, prefill: Sequence[str], decode: Sequence[str], *, timeout_s: float = 600.0) -> None:
        if not prefill or not decode:
            raise ValueError(f"proxy needs at least one prefill and one decode engine (got {len(prefill)} prefill, "
                             f"{len(decode)} decode): pass --prefill URL and --decode URL, or --engine URL for "
                             "aggregated engines")
        for url in (*prefill, *decode):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"engine URL {url!r}: expected http://host:port")
        self.prefill = [u.rstrip("/") for u in prefill]
        self.decode = [u.rstrip("/") for u in decode]
        self.timeout_s = timeout_s
        self._next_prefill = itertools.cycle(self.prefill)
        self._next_decode = itertools.cycle(self.decode)
        self.counts = {"requests": 0, "prefill_failed": 0, "no_kv_transfer_params": 0}
        self._session: Any = None

    def app(self) -> Any:
        """The aiohttp application."""
        from aiohttp import web

        app = web.Application(client_max_size=1 << 28)
        for route in _ROUTES:
            app.router.add_post(route, self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/proxy/stats", self._stats)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: Any) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                              connector=aiohttp.TCPConnector(limit=0), read_bufsize=1 << 24)

    async def _stop(self, app: Any) -> None:
        await self._session.close()

    async def _generate(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "request body is not JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "request body must be a JSON object"}, status=400)
        self.counts["requests"] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASS_HEADERS}
        params = await self._prefill(request.path, body, headers)
        decode = dict(body)
        if params is not None:
            decode["kv_transfer_params"] = params
        else:
            decode.pop("kv_transfer_params", None)
        url = next(self._next_decode) + request.path
        try:
            async with self._session.post(url, json=decode, headers=headers) as resp:
                if not body.get("stream"):
                    return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)
                out = web.StreamResponse(status=resp.status, headers={"Content-Type": resp.headers.get(
                    "Content-Type", "text/event-stream"), "Cache-Control": "no-cache"})
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.warning("decode on %s failed: %s", url, e or type(e).__name__)
            return web.json_response({"error": f"decode engine {url} failed: {e or type(e).__name__}"}, status=502)

    async def _prefill(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any] | None:
        import aiohttp

        url = next(self._next_prefill) + path
        try:
            async with self._session.post(url, json=prefill_body(body), headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
                answer = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, json.JSONDecodeError) as e:
            self.counts["prefill_failed"] += 1
            log.warning("prefill on %s failed (%s); the decode engine computes the prompt", url, e or type(e).__name__)
            return None
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not isinstance(params, dict):
            self.counts["no_kv_transfer_params"] += 1
            log.warning("prefill engine %s returned no kv_transfer_params: is it a kv_producer?", url)
            return None
        return params

    async def _models(self, request: Any) -> Any:
        from aiohttp import web

        async with self._session.get(self.decode[0] + "/v1/models") as resp:
            return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)

    async def _health(self, request: Any) -> Any:
        """200 when every engine answers its ``/health``, else 503 naming those that do not."""
        import aiohttp
        from aiohttp import web

        async def ok(url: str) -> bool:
            try:
                async with self._session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    return r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False

        urls = [*self.prefill, *self.decode]
        down = [u for u, up in zip(urls, await asyncio.gather(*(ok(u) for u in urls))) if not up]
        return web.json_response({"down": down}, status=503 if down else 200)

    async def _stats(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.counts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dynkv proxy``."""
    p.add_argument("--prefill", action="append", metavar="URL",
                   help="prefill engine (kv_producer), e.g. http://127.0.0.1:8100; repeat for several")
    p.add_argument("--decode", action="append", metavar="URL",
                   help="decode engine (kv_consumer), e.g. http://127.0.0.1:8200; repeat for several")
    p.add_argument("--engine", action="append", metavar="URL",
                   help="aggregated engine, e.g. http://127.0.0.1:8100; repeat for several (instead of "
                        "--prefill/--decode): each request goes whole to one engine, picked by --policy")
    p.add_argument("--policy", default="kv", choices=POLICIES,
                   help="aggregated routing: kv (longest cached prefix by tier, against load), round-robin, "
                        "least-loaded")
    p.add_argument("--kv-events", action="append", metavar="ENDPOINT",
                   help="KV events publisher of each --engine, in the same order (vLLM's kv-events-config "
                        "endpoint as seen from here, e.g. tcp://127.0.0.1:5557)")
    p.add_argument("--kv-replay", action="append", metavar="ENDPOINT",
                   help="replay socket of each --engine's KV events, in the same order (its replay_endpoint, "
                        "e.g. tcp://127.0.0.1:5558); lets the proxy start late and recover lost batches")
    p.add_argument("--kv-snapshot", action="append", metavar="URL",
                   help="snapshot of each --engine's blocks, in the same order (dynkv's metrics_port: "
                        "http://HOST:PORT/kv/snapshot; an empty URL for an engine without one); rebuilds the "
                        "proxy's view of an engine when its replay buffer no longer reaches back")
    p.add_argument("--kv-topic", default="", help="the engines' KV events topic")
    p.add_argument("--hash-algo", default="sha256", choices=HASH_ALGOS,
                   help="the engines' --prefix-caching-hash-algo")
    p.add_argument("--hash-seed", default=None,
                   help="the engines' PYTHONHASHSEED, if set (required with the xxhash algorithms)")
    p.add_argument("--block-size", type=int, default=None,
                   help="the engines' block size (default: learned from their KV events)")
    p.add_argument("--load-weight", type=float, default=1.0,
                   help="kv routing: cost of one prompt token of an engine's load (in flight, or parked at "
                        "--park-weight) against one to compute")
    p.add_argument("--park-weight", type=float, default=PARK_WEIGHT,
                   help="kv routing: share of a parked conversation's prompt tokens (its latest request ended, "
                        "its next turn expected) counted in its engine's load, 0 to 1 (default %(default)s; "
                        "0: only requests in flight count)")
    p.add_argument("--session-ttl", type=float, default=SESSION_TTL_S,
                   help="kv routing: seconds a conversation stays parked without a next turn (default %(default)s)")
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between engine health probes")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request to one engine")


def _events(args: argparse.Namespace) -> dict[str, tuple[str, str | None]]:
    pubs, replays, engines = args.kv_events or [], args.kv_replay or [], args.engine
    if pubs and len(pubs) != len(engines) or replays and len(replays) != len(pubs):
        raise ValueError(f"{len(engines)} --engine, {len(pubs)} --kv-events, {len(replays)} --kv-replay: give "
                         "one --kv-events (and one --kv-replay, if any) per --engine, in the same order")
    return {e: (pub, replays[i] if replays else None) for i, (e, pub) in enumerate(zip(engines, pubs))}


def _snapshots(args: argparse.Namespace) -> dict[str, str]:
    urls, pubs = args.kv_snapshot or [], args.kv_events or []
    if urls and len(urls) != len(pubs):
        raise ValueError(f"{len(pubs)} --kv-events, {len(urls)} --kv-snapshot: give one --kv-snapshot per engine "
                         "with --kv-events, in the same order")
    return {e: url for e, url in zip(args.engine, urls) if url}


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dynkv proxy``: serve until interrupted."""
    from aiohttp import web

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.engine and (args.prefill or args.decode):
        raise ValueError("--engine (aggregated) and --prefill/--decode (disaggregated) do not mix: use one kind")
    if args.engine:
        from dynkv.proxy.agg import AggProxy

        agg = AggProxy(args.engine, policy=args.policy, events=_events(args), snapshots=_snapshots(args),
                       hash_algo=args.hash_algo,
                       hash_seed=args.hash_seed, block_size=args.block_size, load_weight=args.load_weight,
                       park_weight=args.park_weight, session_ttl_s=args.session_ttl,
                       timeout_s=args.timeout, health_interval_s=args.health_interval, topic=args.kv_topic)
        log.info("dynkv proxy on %s:%d: %s over %s", args.host, args.port, args.policy,
                 ", ".join(agg.router.engines))
        web.run_app(agg.app(), host=args.host, port=args.port, print=None)
        return 0
    proxy = Proxy(args.prefill or [], args.decode or [], timeout_s=args.timeout)
    log.info("dynkv proxy on %s:%d: prefill %s; decode %s", args.host, args.port, ", ".join(proxy.prefill),
             ", ".join(proxy.decode))
    web.run_app(proxy.app(), host=args.host, port=args.port, print=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dynkv.proxy [options]``: the same as ``dynkv proxy``."""
    p = argparse.ArgumentParser(prog="dynkv proxy", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
