"""The router bench's client: multi-turn conversations sent through ``dynkv proxy``, and their summary.

Each conversation sends its turns one after the other, the prompt the whole
conversation so far; every request is streamed and its TTFT taken at the
first token, with the engine the proxy picked, the cached tokens it
predicted and those the engine reported.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from dynkv.benchmarks.serve_results import percentile
from dynkv.testing.model import FIRST_WORD_ID

__all__ = ["Conversation", "Turn", "drive", "drive_async", "summarize"]


@dataclass
class Turn:
    """One request of the driver and what came back."""

    conversation: int
    turn: int
    prompt_tokens: int
    engine: str = ""
    predicted: int = 0
    cached: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None


@dataclass
class Conversation:
    """A prefix of its own, then user messages; each prompt is the whole conversation so far."""

    prefix: list[int]
    users: list[list[int]]
    history: list[int] = field(default_factory=list)

    @classmethod
    def make(cls, rng: random.Random, prefix_tokens: int, user_tokens: int, turns: int, vocab: int) -> Conversation:
        def draw(n: int) -> list[int]:
            return [rng.randrange(FIRST_WORD_ID, vocab) for _ in range(n)]

        return cls(draw(prefix_tokens), [draw(user_tokens) for _ in range(turns)])


async def _one(session: Any, url: str, prompt: list[int], max_tokens: int, rec: Turn) -> None:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True, "ignore_eos": True}
    t0 = time.perf_counter()
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            rec.engine = resp.headers.get("x-dynkv-engine", url)
            rec.predicted = int(resp.headers.get("x-dynkv-predicted-cached-tokens", 0))
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("error"):
                    rec.error = str(chunk["error"])
                    return
                usage = chunk.get("usage")
                if usage:
                    rec.cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                for choice in chunk.get("choices") or ():
                    ids = choice.get("token_ids") or []
                    if ids and rec.ttft_s is None:
                        rec.ttft_s = time.perf_counter() - t0
                    rec.token_ids += ids
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        rec.latency_s = time.perf_counter() - t0


async def drive_async(url: str, convs: list[Conversation], *, max_tokens: int, concurrency: int) -> list[Turn]:
    """Closed loop: ``concurrency`` conversations in flight, each sending its turns in order."""
    import aiohttp

    out: list[Turn] = []
    todo = list(range(len(convs)))

    async def worker(session: Any) -> None:
        while todo:
            c = todo.pop(0)
            conv = convs[c]
            conv.history = list(conv.prefix)
            for t, user in enumerate(conv.users):
                prompt = [*conv.history, *user]
                rec = Turn(c, t, len(prompt))
                out.append(rec)
                await _one(session, url, prompt, max_tokens, rec)
                conv.history = [*prompt, *rec.token_ids]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return out


def drive(url: str, convs: list[Conversation], *, max_tokens: int, concurrency: int = 1) -> list[Turn]:
    """:func:`drive_async` from synchronous code."""
    return asyncio.run(drive_async(url, convs, max_tokens=max_tokens, concurrency=concurrency))


def summarize(turns: list[Turn], engines: list[str]) -> dict[str, Any]:
    """TTFT percentiles (first and later turns), request share per engine, predicted and reported cached tokens."""
    later = [t.ttft_s for t in turns if t.turn > 0 and t.ttft_s is not None]
    first = [t.ttft_s for t in turns if t.turn == 0 and t.ttft_s is not None]
    share = {e: sum(1 for t in turns if t.engine == e) for e in engines}
    mean = len(turns) / len(engines)
    return {"requests": len(turns), "errors": sum(1 for t in turns if t.error),
            "ttft_later_p50_s": percentile(later, 50), "ttft_later_p90_s": percentile(later, 90),
            "ttft_first_p50_s": percentile(first, 50), "share": share,
            "max_share_over_mean": max(share.values()) / mean if mean else None,
            "predicted_tokens": sum(t.predicted for t in turns), "cached_tokens": sum(t.cached or 0 for t in turns),
            "prompt_tokens": sum(t.prompt_tokens for t in turns)}
