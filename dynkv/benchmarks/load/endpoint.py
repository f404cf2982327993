"""``dynkv bench load --endpoint``: the closed loop against running OpenAI-compatible servers.

An endpoint is one server, or several (``NAME=URL1,URL2,...``) that the
requests of its run alternate between: turn ``t`` of conversation ``c`` goes
to server ``(c + t) % n``, so with two servers every later turn lands on the
other server than its previous turn, and its prefix is cached there only if
the servers share their KV (dynkv's shared tier).

Each request is a streamed ``/v1/completions`` of the turn's token ids at
temperature 0 with ``max_tokens`` the answer length and ``ignore_eos`` (vLLM's
field); TTFT is from sending it to its first streamed token. The cached
tokens come from ``usage.prompt_tokens_details.cached_tokens`` where the
server reports them (vLLM with ``--enable-prompt-tokens-details``), and
dynkv's counters from the server's ``/metrics`` (``vllm:dynkv_*``, summed over
engines and servers), read before and after the run. Each server first gets
one short request the workload never sends (not recorded).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

from dynkv.benchmarks.load.workload import ClosedLoop, Workload

__all__ = ["parse_endpoint", "parse_metrics", "run_endpoints", "server_of"]

# Labels kept when a server's dynkv samples are summed over its engines.
_LABELS = ("tier", "direction", "choice", "state", "reason")


def parse_endpoint(text: str) -> tuple[str, tuple[str, ...]]:
    """``--endpoint NAME=URL[,URL...]``: the run's name and its servers' roots.

    Raises ``ValueError`` naming what is wrong: no ``=``, an empty name or
    URL, a URL that is not ``http://`` or ``https://``, a server given twice.
    """
    name, sep, rest = text.partition("=")
    example = "e.g. dynkv=http://127.0.0.1:8000 or shared=http://127.0.0.1:8000,http://127.0.0.1:8001"
    if not sep or not name.strip():
        raise ValueError(f"--endpoint {text!r}: expected NAME=URL[,URL...], {example}")
    urls = tuple(u.strip().rstrip("/") for u in rest.split(","))
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--endpoint {text!r}: {url!r} is not a server root (http://HOST:PORT); {example}")
    if len(set(urls)) != len(urls):
        raise ValueError(f"--endpoint {text!r}: a server is named twice; the requests alternate between "
                         "distinct servers")
    return name.strip(), urls


def server_of(conversation: int, turn: int, servers: int) -> int:
    """Index of the server that gets turn ``turn`` of conversation ``conversation`` among ``servers``.

    ``(conversation + turn) % servers``: the first turns spread over the
    servers, and every later turn goes to the next server after its previous
    turn's (with two, always the other one).
    """
    if servers < 1:
        raise ValueError(f"servers={servers}: expected at least 1")
    return (conversation + turn) % servers


def parse_metrics(text: str) -> dict[str, float]:
    """``dynkv_*`` samples of a Prometheus text page (``vllm:dynkv_*`` too), summed over labels other than a tier's,
    a direction's, a choice's, a state's or a reason's: ``{"dynkv_hits_total{tier=host}": 12.0, ...}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:dynkv_"):
            line = line[len("vllm:"):]
        if not line.startswith("dynkv_"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        if name.endswith("_created"):  # a counter's creation time, not a count
            continue
        kept = []
        for part in labels.rstrip("}").split(","):
            k, _, v = part.partition("=")
            if k.strip() in _LABELS:
                kept.append(f"{k.strip()}={v.strip().strip(chr(34))}")
        key = f"{name}{{{','.join(kept)}}}" if kept else name
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


async def _metrics(session: Any, url: str) -> dict[str, float]:
    try:
        async with session.get(url + "/metrics") as resp:
            return parse_metrics(await resp.text()) if resp.status == 200 else {}
    except Exception:  # a server without /metrics has no counters to report
        return {}


async def _stream(session: Any, url: str, body: dict[str, Any], rec: dict[str, Any], t_run: float) -> None:
    import aiohttp

    t0 = time.perf_counter()
    rec["submit_s"] = t0 - t_run
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec["error"] = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                return
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("error"):
                    rec["error"] = f"server error mid-stream: {chunk['error']}"
                    break
                usage = chunk.get("usage") or {}
                details = usage.get("prompt_tokens_details") or {}
                if details.get("cached_tokens") is not None:
                    rec["cached_tokens"] = int(details["cached_tokens"])
                for choice in chunk.get("choices") or ():
                    n = len(choice.get("token_ids") or ()) or (1 if choice.get("text") else 0)
                    if n and rec["ttft_s"] is None:
                        rec["ttft_s"] = time.perf_counter() - t0
                    rec["output_tokens"] += n
                if usage.get("completion_tokens"):
                    rec["output_tokens"] = int(usage["completion_tokens"])
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        rec["latency_s"] = time.perf_counter() - t0


async def _models(session: Any, url: str) -> list[str]:
    async with session.get(url + "/v1/models") as resp:
        resp.raise_for_status()
        return [str(m["id"]) for m in (await resp.json())["data"]]


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _sum(samples: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for one in samples:
        for k, v in one.items():
            out[k] = out.get(k, 0.0) + v
    return out


async def _run_one(session: Any, name: str, urls: tuple[str, ...], w: Workload,
                   model: str | None) -> dict[str, Any]:
    from tqdm import tqdm

    urls = tuple(u.rstrip("/") for u in urls)
    for url in urls:  # servers a run alternates between must serve the model it asks for
        served = await _models(session, url)
        if model is None:
            model = served[0]
        elif model not in served:
            raise ValueError(f"--endpoint {name}: {url} serves {served}, not {model!r}; the servers of one "
                             "endpoint must serve the same model (or give --model)")
    prompts = w.prompts()
    loop = ClosedLoop(w)
    records: list[dict[str, Any]] = []
    # One short request the workload never sends, not recorded: one-time start-up costs stay out of the first TTFT.
    warm = {"model": model, "prompt": [w.token_range[0]] * 8, "max_tokens": 2, "temperature": 0.0, "stream": True,
            "ignore_eos": True}
    for url in urls:
        await _stream(session, url, warm, {"ttft_s": None, "output_tokens": 0}, time.perf_counter())
    before = [await _metrics(session, url) for url in urls]
    t_run = time.perf_counter()

    async def one(c: int, t: int) -> tuple[int, int]:
        server = server_of(c, t, len(urls))
        rec: dict[str, Any] = {"conversation": c, "turn": t, "server": server, "prompt_tokens": len(prompts[c][t]),
                               "ttft_s": None, "latency_s": None, "cached_tokens": None, "output_tokens": 0,
                               "error": None}
        records.append(rec)
        body = {"model": model, "prompt": prompts[c][t], "max_tokens": w.answer_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
                "return_token_ids": True}
        await _stream(session, urls[server], body, rec, t_run)
        return c, t

    pending: set[asyncio.Task[tuple[int, int]]] = set()
    with tqdm(total=w.num_requests, desc=name, unit="req", leave=False, disable=None) as bar:
        while not loop.complete:
            while (item := loop.take()) is not None:
                pending.add(asyncio.ensure_future(one(*item)))
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                loop.done(*task.result())
                bar.update(1)
    wall = time.perf_counter() - t_run
    per_server = [_delta(await _metrics(session, url), b) for url, b in zip(urls, before)]
    return {"name": name, "url": urls[0], "urls": list(urls), "model": model, "status": "ok", "wall_s": wall,
            "requests": records, "samples": _sum(per_server), "server_samples": per_server}


async def _run_all(endpoints: list[tuple[str, tuple[str, ...]]], w: Workload, model: str | None,
                   timeout_s: float) -> dict[str, Any]:
    import aiohttp

    out: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    conn = aiohttp.TCPConnector(limit=2 * w.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn, read_bufsize=1 << 24) as session:
        for name, urls in endpoints:
            out[name] = await _run_one(session, name, (urls,) if isinstance(urls, str) else tuple(urls), w, model)
    return out


def run_endpoints(endpoints: list[tuple[str, str | tuple[str, ...]]], w: Workload, *, model: str | None = None,
                  timeout_s: float = 600.0) -> dict[str, Any]:
    """Run ``w`` against each ``(name, urls)`` in turn; ``{name: report}`` with every request (errors recorded).

    ``urls``: one server root, or several that the run's requests alternate
    between (:func:`server_of`); each request's record names its ``server``
    (an index into the report's ``urls``), and the report's dynkv counters
    are summed over the servers (``server_samples``: each one's).
    """
    return asyncio.run(_run_all(endpoints, w, model, timeout_s))
