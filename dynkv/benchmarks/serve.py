"""``dynkv bench serve``: multi-turn TTFT against OpenAI-compatible servers.

The workload is what a KV offload tier is for: ``conversations`` chats, each
opening with a long prefix of its own (a system prompt, a document), then
``turns`` turns, each turn's prompt being the whole conversation so far (the
prefix, every earlier user message and answer) plus a new user message. Each
round of turns visits the conversations in a seeded shuffled order, so the
distance between two turns of one conversation varies; once all
conversations together are longer than the server's KV cache, a returning
conversation finds its prefix evicted from the device and only a lower tier
can spare its prefill.

Requests are streamed ``/v1/completions`` at temperature 0 with a fixed
``max_tokens``; TTFT is the time from sending a request to its first streamed
token. Every request is recorded with its output token ids (or text) and
log-probs, so runs against two servers can be compared token by token
(:func:`compare`). Endpoints run one after the other on the same prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dynkv.benchmarks.serve_results import EndpointResult, RequestRecord, compare, format_table, plot

__all__ = [
    "DESCRIPTION",
    "Workload",
    "endpoint_arg",
    "engine_arg",
    "report",
    "run_workload",
    "run_workload_async",
    "token_range_arg",
]

DESCRIPTION = (
    "Multi-turn chat workload (long per-conversation prefixes, working set larger than the KV cache) against "
    "one or more OpenAI-compatible endpoints: TTFT p50/p90 and tokens/s, outputs compared across endpoints."
)


@dataclass(frozen=True)
class Workload:
    """What to send. Token counts are exact with ``prompt_format="tokens"``.

    ``token_range`` bounds the random token ids of prefixes and user messages
    (``[lo, hi)``); keep it inside the served model's vocabulary and clear of
    its special tokens. ``vllm_extensions`` adds vLLM's request fields
    (``return_token_ids``, ``ignore_eos``...) that make outputs exact and
    fixed-length; turn it off for servers that reject unknown fields.
    ``warmup`` requests (short, sharing nothing with the workload, not
    recorded) go first, so one-time start-up costs do not land in a TTFT.
    """

    conversations: int = 8
    turns: int = 3
    prefix_tokens: int = 1024
    user_tokens: int = 64
    max_tokens: int = 32
    concurrency: int = 1
    prompt_format: str = "tokens"
    token_range: tuple[int, int] = (16, 1000)
    shuffle: bool = True
    seed: int = 0
    logprobs: int = 1
    model: str | None = None
    timeout_s: float = 600.0
    vllm_extensions: bool = True
    warmup: int = 1

    def __post_init__(self) -> None:
        for name in ("conversations", "turns", "max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"workload {name}={getattr(self, name)}: expected >= 1")
        if self.prefix_tokens < 0 or self.user_tokens < 1 or self.warmup < 0:
            raise ValueError(f"workload prefix_tokens={self.prefix_tokens}, user_tokens={self.user_tokens}, "
                             f"warmup={self.warmup}: expected prefix_tokens >= 0, user_tokens >= 1, warmup >= 0")
        if self.prompt_format not in ("tokens", "text"):
            raise ValueError(f"workload prompt_format={self.prompt_format!r}: expected 'tokens' or 'text'")
        lo, hi = self.token_range
        if not 0 <= lo < hi:
            raise ValueError(f"workload token_range={self.token_range}: expected 0 <= lo < hi")

    @property
    def num_requests(self) -> int:
        return self.conversations * self.turns


class _Conversation:
    """Prompt state of one conversation: token ids or text."""

    def __init__(self, w: Workload, rng: random.Random, words: Sequence[str]) -> None:
        lo, hi = w.token_range

        def draw(n: int) -> list[int]:
            return [rng.randrange(lo, hi) for _ in range(n)]

        self.prefix = draw(w.prefix_tokens)
        self.users = [draw(w.user_tokens) for _ in range(w.turns)]
        self.words = words
        self.text_mode = w.prompt_format == "text"
        self.history: list[int] | str = self._render(self.prefix) if self.text_mode else list(self.prefix)

    def _render(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    def prompt(self, turn: int) -> list[int] | str:
        if self.text_mode:
            return f"{self.history} {self._render(self.users[turn])}".lstrip()
        return [*self.history, *self.users[turn]]


def _words(w: Workload) -> list[str]:
    if w.prompt_format != "text":
        return []
    from dynkv.testing.model import FIRST_WORD_ID, vocabulary

    # Words of dynkv's test tokenizer (one token each); other tokenizers
    # split them into a few tokens, which only changes prompt lengths.
    vocab = vocabulary(max(w.token_range[1], FIRST_WORD_ID + 1))
    return [vocab[i] if i >= FIRST_WORD_ID else vocab[FIRST_WORD_ID] for i in range(len(vocab))]


async def _served_model(session: Any, url: str) -> str:
    async with session.get(url + "/v1/models") as resp:
        resp.raise_for_status()
        data = (await resp.json())["data"]
    if not data:
        raise RuntimeError(f"{url}/v1/models lists no model; pass the model name explicitly")
    return str(data[0]["id"])


async def _stream_one(session: Any, url: str, body: dict[str, Any], rec: RequestRecord, t_run: float) -> None:
    import aiohttp

    t0 = time.perf_counter()
    rec.start_s = t0 - t_run
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                return
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("error"):
                    rec.error = f"server error mid-stream: {chunk['error']}"
                    break
                if chunk.get("usage") and chunk["usage"].get("prompt_tokens"):
                    rec.prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                for choice in chunk.get("choices") or ():
                    _take_choice(choice, rec, time.perf_counter() - t0)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
        # A failed request is a result (counted in the table), not a crash;
        # a malformed SSE payload is a ValueError.
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        rec.latency_s = time.perf_counter() - t0


def _take_choice(choice: dict[str, Any], rec: RequestRecord, now: float) -> None:
    ids = choice.get("token_ids") or []
    lp = choice.get("logprobs") or {}
    toks = lp.get("tokens") or []
    if not ids and toks and all(isinstance(t, str) and t.startswith("token_id:") for t in toks):
        ids = [int(t.split(":", 1)[1]) for t in toks]
    text = choice.get("text") or ""
    n = len(ids) or len(toks) or (1 if text else 0)
    if n and rec.ttft_s is None:
        rec.ttft_s = now
    rec.output_tokens += n
    rec.token_ids.extend(int(i) for i in ids)
    rec.text += text
    rec.logprobs.extend(float(x) for x in (lp.get("token_logprobs") or []) if x is not None)


async def _run_endpoint(session: Any, name: str, url: str, w: Workload, bar: Any) -> EndpointResult:
    url = url.rstrip("/")
    model = w.model or await _served_model(session, url)
    rng = random.Random(w.seed)
    words = _words(w)
    convs = [_Conversation(w, rng, words) for _ in range(w.conversations)]
    records: list[RequestRecord] = []
    sem = asyncio.Semaphore(w.concurrency)

    def body_for(prompt: list[int] | str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": w.max_tokens, "temperature": 0.0,
                                "stream": True, "stream_options": {"include_usage": True}}
        if w.logprobs > 0:
            body["logprobs"] = w.logprobs
        if w.vllm_extensions:
            body.update(return_token_ids=True, return_tokens_as_token_ids=True, ignore_eos=True)
        return body

    warm_rng = random.Random(w.seed - 1)
    for _ in range(w.warmup):
        ids = [warm_rng.randrange(*w.token_range) for _ in range(min(64, max(w.prefix_tokens, 8)))]
        prompt = " ".join(words[i] for i in ids) if words else ids
        await _stream_one(session, url, body_for(prompt), RequestRecord(-1, -1, len(ids)), time.perf_counter())
    t_run = time.perf_counter()

    async def one(c: int, turn: int) -> None:
        conv = convs[c]
        prompt = conv.prompt(turn)
        body = body_for(prompt)
        rec = RequestRecord(c, turn, len(prompt) if isinstance(prompt, list) else len(prompt.split()))
        records.append(rec)
        async with sem:
            await _stream_one(session, url, body, rec, t_run)
        if isinstance(prompt, list):
            conv.history = [*prompt, *rec.token_ids]
        else:
            conv.history = prompt + rec.text
        bar.update(1)
        bar.set_postfix_str(f"ttft {rec.ttft_s or 0:.3f}s" + (" ERR" if rec.error else ""))

    order_rng = random.Random(w.seed + 1)
    for turn in range(w.turns):
        order = list(range(w.conversations))
        if w.shuffle:
            order_rng.shuffle(order)
        # Tasks acquire the semaphore in creation order, so with
        # concurrency 1 requests go out exactly in ``order``.
        await asyncio.gather(*(one(c, turn) for c in order))
    return EndpointResult(name, url, model, time.perf_counter() - t_run, records)


async def run_workload_async(endpoints: Mapping[str, str] | Sequence[tuple[str, str]], workload: Workload, *,
                             progress: bool = True) -> dict[str, EndpointResult]:
    """Coroutine form of :func:`run_workload`."""
    import aiohttp
    from tqdm import tqdm

    pairs = list(endpoints.items()) if isinstance(endpoints, Mapping) else list(endpoints)
    results: dict[str, EndpointResult] = {}
    timeout = aiohttp.ClientTimeout(total=workload.timeout_s)
    connector = aiohttp.TCPConnector(limit=max(workload.concurrency, 1) * 2)
    # vLLM echoes the prompt's token ids in the first SSE line: long prompts
    # make lines far longer than aiohttp's default 64 KiB read buffer allows.
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=1 << 24) as session:
        for name, url in pairs:
            with tqdm(total=workload.num_requests, desc=name, unit="req", disable=None if progress else True,
                      leave=False) as bar:
                results[name] = await _run_endpoint(session, name, url, workload, bar)
    return results


def run_workload(endpoints: Mapping[str, str] | Sequence[tuple[str, str]], workload: Workload, *,
                 progress: bool = True) -> dict[str, EndpointResult]:
    """Run ``workload`` against each endpoint in turn.

    Parameters
    ----------
    endpoints
        ``{name: base_url}`` (or ``(name, url)`` pairs); ``base_url`` is the
        server root, e.g. ``http://127.0.0.1:8000``.
    workload
        What to send; every endpoint gets the same prefixes and user messages.
    progress
        Show a progress bar (only on a terminal).

    Returns
    -------
    dict
        ``{name: EndpointResult}`` in the order given. Failed requests are
        recorded with ``error`` set, not raised.
    """
    return asyncio.run(run_workload_async(endpoints, workload, progress=progress))


def report(results: Mapping[str, EndpointResult], workload: Workload, **extra: Any) -> dict[str, Any]:
    """The JSON document: workload, per-endpoint summaries and requests, pairwise comparisons."""
    names = list(results)
    comparisons = [compare(results[names[0]], results[n]) for n in names[1:]]
    return {"workload": asdict(workload), "endpoints": {n: r.to_dict() for n, r in results.items()},
            "comparisons": comparisons, **extra}


def endpoint_arg(text: str) -> tuple[str, str]:
    """``--endpoint NAME=URL`` (also ``dynkv bench load``'s)."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"--endpoint {text!r}: expected NAME=URL, e.g. dynkv=http://127.0.0.1:8000")
    return name, url


def engine_arg(text: str) -> tuple[str, Any]:
    """``--engine-arg KEY=VALUE`` of the benches that start engines: VALUE as JSON, else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip("-"):
        raise argparse.ArgumentTypeError(f"--engine-arg {text!r}: expected KEY=VALUE, e.g. attention_backend=TRITON_ATTN")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def token_range_arg(text: str) -> tuple[int, int]:
    """``--token-range LO:HI`` (also ``dynkv bench load``'s)."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--token-range {text!r}: expected LO:HI, e.g. 16:1000") from None
    return lo, hi


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """Workload shape options, shared with ``dynkv demo``."""
    d = Workload()
    p.add_argument("--conversations", type=int, default=d.conversations, help="number of conversations")
    p.add_argument("--turns", type=int, default=d.turns, help="turns per conversation")
    p.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens, help="per-conversation prefix length")
    p.add_argument("--user-tokens", type=int, default=d.user_tokens, help="tokens of each new user message")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="output tokens per request")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", type=Path, metavar="PATH", help="write the full report (every request) here")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of TTFT per turn and its CDF here")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dynkv bench serve``."""
    p.add_argument("--endpoint", type=endpoint_arg, action="append", required=True, metavar="NAME=URL",
                   help="server root URL; repeat to compare servers (the first is the reference)")
    add_workload_arguments(p)
    p.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    p.add_argument("--prompt-format", choices=["tokens", "text"], default="tokens",
                   help="token-id prompts (exact lengths) or text")
    p.add_argument("--token-range", type=token_range_arg, default=Workload().token_range, metavar="LO:HI",
                   help="token ids drawn for prompts (inside the model's vocabulary)")
    p.add_argument("--no-shuffle", action="store_true", help="visit conversations in order every turn")
    p.add_argument("--logprobs", type=int, default=1, help="log-probs per token to record (0: none)")
    p.add_argument("--no-vllm-extensions", action="store_true",
                   help="send only standard OpenAI fields (no return_token_ids / ignore_eos)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up requests per endpoint")


def workload_from_args(args: argparse.Namespace, **overrides: Any) -> Workload:
    """A :class:`Workload` from parsed options (missing ones keep defaults)."""
    keys = {"conversations", "turns", "prefix_tokens", "user_tokens", "max_tokens", "concurrency", "seed",
            "model", "prompt_format", "token_range", "logprobs", "warmup"}
    kw = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "no_shuffle", False):
        kw["shuffle"] = False
    if getattr(args, "no_vllm_extensions", False):
        kw["vllm_extensions"] = False
    if getattr(args, "timeout", None) is not None:
        kw["timeout_s"] = args.timeout
    return Workload(**{**kw, **overrides})


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dynkv bench serve``."""
    workload = workload_from_args(args)
    results = run_workload(args.endpoint, workload)
    doc = report(results, workload)
    print(format_table(results))
    for c in doc["comparisons"]:
        print(f"outputs {c['b']} vs {c['a']}: {'identical' if c['identical'] else 'DIFFERENT'} "
              f"({c['compared'] - c['differing']}/{c['compared']} requests match)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 1 if any(r.summary()["errors"] for r in results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dynkv.benchmarks.serve [options]``: the same as ``dynkv bench serve``."""
    p = argparse.ArgumentParser(prog="dynkv bench serve", description=DESCRIPTION)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
