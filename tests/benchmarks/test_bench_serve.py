"""``dynkv bench serve`` against an in-process fake OpenAI streaming server.

The fake server answers ``/v1/completions`` with ``max_tokens`` streamed
tokens that are a pure function of the prompt, after a fixed delay before the
first token, so TTFT measurement, multi-turn prompt building, comparisons and
the JSON/PNG outputs are checked without vLLM.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from dynkv.benchmarks import serve as bench_serve
from dynkv.benchmarks.serve import Workload, run_workload
from dynkv.benchmarks.serve_results import RequestRecord, compare, percentile, summarize

FIRST_TOKEN_DELAY_S = 0.05


class FakeServer:
    """OpenAI-style streaming completions; ``salt`` changes every output token."""

    def __init__(self, salt: int = 0, fail_every: int = 0) -> None:
        self.salt = salt
        self.fail_every = fail_every
        self.prompts: list[list[int] | str] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["prompt"]
        self.prompts.append(prompt)
        if self.fail_every and len(self.prompts) % self.fail_every == 0:
            return web.json_response({"error": "injected"}, status=500)
        ids = prompt if isinstance(prompt, list) else [len(w) for w in prompt.split()]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(FIRST_TOKEN_DELAY_S)
        state = sum(ids) + self.salt
        for k in range(body["max_tokens"]):
            tok = (state * 31 + k * 7) % 1000 + 16
            state += tok
            choice = {"index": 0, "text": f" w{tok}", "token_ids": [tok],
                      "logprobs": {"tokens": [f"token_id:{tok}"], "token_logprobs": [-0.5 - k / 100]}}
            if k == 0 and body.get("return_token_ids"):
                choice["prompt_token_ids"] = ids  # as vLLM does: one long first line
            await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            await asyncio.sleep(0.001)
        usage = {"prompt_tokens": len(ids), "completion_tokens": body["max_tokens"]}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return resp

    def __enter__(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer() as s:
        yield s


SMALL = Workload(conversations=3, turns=2, prefix_tokens=40, user_tokens=5, max_tokens=4, seed=7)


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 90) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0
    assert percentile(range(11), 90) == pytest.approx(9.0)


def test_ttft_and_multiturn_prompts(fake: FakeServer) -> None:
    res = run_workload({"fake": fake.url}, SMALL, progress=False)["fake"]
    assert res.model == "fake-model"
    assert len(res.requests) == SMALL.num_requests
    for r in res.requests:
        assert r.error is None
        # The server sleeps before its first token, so TTFT is at least that.
        assert r.ttft_s is not None and FIRST_TOKEN_DELAY_S * 0.9 <= r.ttft_s <= r.latency_s
        assert r.output_tokens == len(r.token_ids) == len(r.logprobs) == SMALL.max_tokens
        assert r.text == "".join(f" w{t}" for t in r.token_ids)
    # Turn 2 of a conversation = its turn-1 prompt + the answer + a new user message.
    by_key = {(r.conversation, r.turn): r for r in res.requests}
    first_turn = [p for p in fake.prompts if len(p) == SMALL.prefix_tokens + SMALL.user_tokens]
    second_turn = [p for p in fake.prompts if p not in first_turn]
    assert len({tuple(p) for p in first_turn}) == SMALL.conversations  # prefixes differ per conversation
    for c in range(SMALL.conversations):
        r0, r1 = by_key[(c, 0)], by_key[(c, 1)]
        assert r0.prompt_tokens == SMALL.prefix_tokens + SMALL.user_tokens
        assert r1.prompt_tokens == r0.prompt_tokens + SMALL.max_tokens + SMALL.user_tokens
        assert sum(1 for p1 in second_turn for p0 in first_turn
                   if list(p1[: len(p0)]) == list(p0) and list(p1[len(p0): len(p0) + SMALL.max_tokens]) == r0.token_ids
                   ) == 1
    s = res.summary()
    assert s["requests"] == SMALL.num_requests and s["errors"] == 0
    assert s["ttft_p50_s"] <= s["ttft_p90_s"]
    assert s["output_tokens"] == SMALL.num_requests * SMALL.max_tokens


def test_same_workload_same_prompts_and_compare(fake: FakeServer) -> None:
    with FakeServer(salt=1) as other:
        results = run_workload([("a", fake.url), ("b", fake.url), ("c", other.url)], SMALL, progress=False)
    per_run = SMALL.num_requests + SMALL.warmup
    assert len(fake.prompts) == 2 * per_run and fake.prompts[:per_run] == fake.prompts[per_run:]
    same = compare(results["a"], results["b"])
    assert same["identical"] and same["compared"] == SMALL.num_requests and same["differing"] == 0
    diff = compare(results["a"], results["c"])
    assert not diff["identical"] and diff["differing"] > 0
    assert diff["first_difference"]["position"] == 0


def test_errors_are_recorded() -> None:
    with FakeServer(fail_every=2) as bad:
        res = run_workload({"bad": bad.url}, SMALL, progress=False)["bad"]
    errors = [r for r in res.requests if r.error is not None]
    assert errors and all("HTTP 500" in (r.error or "") for r in errors)
    assert res.summary()["errors"] == len(errors)
    assert not compare(res, res)["identical"]


def test_text_prompts(fake: FakeServer) -> None:
    w = Workload(conversations=2, turns=2, prefix_tokens=10, user_tokens=3, max_tokens=2, prompt_format="text",
                 vllm_extensions=False, logprobs=0)
    res = run_workload({"fake": fake.url}, w, progress=False)["fake"]
    assert all(isinstance(p, str) for p in fake.prompts)
    assert all(r.error is None and r.output_tokens == 2 for r in res.requests)
    turn1 = [p for p in fake.prompts if isinstance(p, str) and len(p.split()) == 10 + 3 + 2 + 3]
    assert len(turn1) == 2


def test_summary_by_turn() -> None:
    recs = [RequestRecord(0, 0, 10, ttft_s=1.0, latency_s=2.0, output_tokens=11),
            RequestRecord(0, 1, 20, ttft_s=0.2, latency_s=1.2, output_tokens=11),
            RequestRecord(1, 1, 20, error="boom")]
    s = summarize(recs, wall_s=4.0)
    assert s["errors"] == 1 and s["requests"] == 3
    assert s["ttft_first_turn_p50_s"] == 1.0 and s["ttft_later_turns_p50_s"] == 0.2
    assert s["output_tok_s"] == pytest.approx(22 / 4.0)
    assert s["decode_tok_s_p50"] == pytest.approx(10.0)


def test_cli_json_and_plot(fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = bench_serve.main(["--endpoint", f"x={fake.url}", "--endpoint", f"y={fake.url}", "--conversations", "2",
                           "--turns", "2", "--prefix-tokens", "20", "--user-tokens", "4", "--max-tokens", "3",
                           "--json", str(out), "--plot", str(png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "TTFT p50" in printed and "identical" in printed
    doc = json.loads(out.read_text())
    assert set(doc["endpoints"]) == {"x", "y"}
    assert doc["workload"]["conversations"] == 2
    reqs = doc["endpoints"]["x"]["requests"]
    assert len(reqs) == 4 and all(r["ttft_s"] > 0 and len(r["token_ids"]) == 3 for r in reqs)
    assert doc["comparisons"][0]["identical"] is True
    assert png.stat().st_size > 1000


def test_long_prompts(fake: FakeServer) -> None:
    w = Workload(conversations=1, turns=2, prefix_tokens=40_000, user_tokens=8, max_tokens=2, warmup=0)
    res = run_workload({"fake": fake.url}, w, progress=False)["fake"]
    assert [r.error for r in res.requests] == [None, None]
    assert res.requests[1].prompt_tokens == 40_000 + 8 + 2 + 8


def test_bad_endpoint_argument() -> None:
    with pytest.raises(SystemExit):
        bench_serve.main(["--endpoint", "no-equals-sign"])


def test_engine_arg_values_are_json_or_the_string_and_a_missing_value_is_refused() -> None:
    import argparse

    from dynkv.benchmarks.serve import engine_arg

    assert engine_arg("enforce_eager=true") == ("enforce_eager", True)
    assert engine_arg("max_num_seqs=8") == ("max_num_seqs", 8)
    assert engine_arg('compilation_config={"level": 0}') == ("compilation_config", {"level": 0})
    assert engine_arg("attention_backend=TRITON_ATTN") == ("attention_backend", "TRITON_ATTN")
    assert engine_arg("x=a=b") == ("x", "a=b")
    for bad in ("enforce_eager", "=1", "--=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
            engine_arg(bad)
