"""``dynkv bench load``: the workload and its closed loop, sizes, flags, the endpoint mode, and a CPU run of vLLM."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from dynkv.benchmarks.load.endpoint import parse_endpoint, parse_metrics, run_endpoints, server_of
from dynkv.benchmarks.load.report import format_table, summarize
from dynkv.benchmarks.load.workload import ClosedLoop, Workload, plan_sizes


def test_prompts_grow_by_the_fixed_answer_and_are_the_same_every_time() -> None:
    w = Workload(conversations=3, turns=4, prefix_tokens=40, user_tokens=5, answer_tokens=3, seed=7)
    prompts = w.prompts()
    assert prompts == w.prompts(), "every engine of a run gets the same prompts"
    assert prompts != Workload(conversations=3, turns=4, prefix_tokens=40, user_tokens=5, answer_tokens=3,
                               seed=8).prompts()
    for conv in prompts:
        for t, p in enumerate(conv):
            assert len(p) == w.prompt_tokens(t)
            assert all(w.token_range[0] <= x < w.token_range[1] for x in p)
            if t:
                assert p[: len(conv[t - 1])] == conv[t - 1], "a turn's prompt holds the whole conversation so far"
    assert len({tuple(c[0][:40]) for c in prompts}) == 3, "each conversation has a prefix of its own"


@pytest.mark.parametrize("concurrency", [1, 3, 10])
def test_closed_loop_bounds_requests_in_flight_and_orders_turns(concurrency: int) -> None:
    w = Workload(conversations=6, turns=3, concurrency=concurrency)
    loop, rng = ClosedLoop(w), random.Random(concurrency)
    in_flight: list[tuple[int, int]] = []
    done: set[tuple[int, int]] = set()
    sent: list[tuple[int, int]] = []
    while not loop.complete:
        while (item := loop.take()) is not None:
            c, t = item
            assert t == 0 or (c, t - 1) in done, "a turn goes out only after its conversation's previous turn"
            in_flight.append(item)
            sent.append(item)
        assert 0 < len(in_flight) <= concurrency
        finished = in_flight.pop(rng.randrange(len(in_flight)))  # requests finish in any order
        done.add(finished)
        loop.done(*finished)
    assert sorted(sent) == [(c, t) for c in range(6) for t in range(3)]
    assert [c for c, t in sent if t == 0] == w.first_order()
    with pytest.raises(RuntimeError):
        loop.done(0, 0)


def test_sizes_are_shares_of_the_working_set() -> None:
    w = Workload(conversations=10, turns=2, prefix_tokens=100, user_tokens=10, answer_tokens=10, concurrency=2)
    s = plan_sizes(w, 32, 1024, 0.5, 1.25, 2.0)
    per_conv = -(-w.max_len // 32)  # 130 + 10 tokens: 5 blocks
    assert s.working_set_pages == 10 * per_conv == 50
    assert (s.device_blocks, s.host_pages, s.disk_pages) == (25, 63, 100)
    assert s.max_model_len >= w.max_len
    with pytest.raises(ValueError, match=r"--device-share >= 0\.220"):
        plan_sizes(w, 32, 1024, 0.1, 1.0, 0.0)  # 5 blocks cannot hold two requests of 5 blocks
    with pytest.raises(ValueError, match="--host-share"):
        plan_sizes(w, 32, 1024, 0.5, -1.0, 0.0)


def test_bad_workload_values_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--concurrency=0"):
        Workload(concurrency=0)
    with pytest.raises(ValueError, match="--prefix-tokens"):
        Workload(prefix_tokens=-1)


@pytest.mark.parametrize("args,message", [
    (["--engines", "plain,vllm"], "expected a comma-separated subset of plain, dynkv, offloading"),
    (["--dynkv-variant", "nocost"], "expected NAME=JSON"),
    (["--dynkv-variant", "x={bad"], "is not JSON"),
    (["--dynkv-config", "[1]"], "expected a JSON object"),
    (["--device-share", "lots"], "expected a share of the working set"),
    (["--engines", "plain", "--dynkv-variant", "a={}", "--device", "cpu"], "needs the dynkv engine"),
    (["--device", "cpu", "--device-share", "0.05"], "--device-share >= "),
    (["--endpoint", "a=http://127.0.0.1:1,ftp://h:2"], "'ftp://h:2' is not a server root"),
])
def test_bad_flags_fail_with_a_clear_message(args: list[str], message: str, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "dynkv.cli", "bench", "load", *args, "--work-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_parse_metrics_sums_engines_and_keeps_tier_labels() -> None:
    text = "\n".join([
        "# HELP vllm:dynkv_hits_total dynkv hits",
        'vllm:dynkv_hits_total{engine="0",model_name="m",tier="host"} 3.0',
        'vllm:dynkv_hits_total{engine="1",model_name="m",tier="host"} 4.0',
        'vllm:dynkv_hits_total{engine="0",model_name="m",tier="disk"} 1.0',
        'vllm:dynkv_misses_total{engine="0",model_name="m"} 9.0',
        'vllm:dynkv_misses_created{engine="0",model_name="m"} 1796618278.5',
        'vllm:num_requests_running{engine="0"} 2.0',
    ])
    assert parse_metrics(text) == {"dynkv_hits_total{tier=host}": 7.0, "dynkv_hits_total{tier=disk}": 1.0,
                                   "dynkv_misses_total": 9.0}


def test_parse_endpoint_takes_one_server_or_several() -> None:
    assert parse_endpoint("a=http://127.0.0.1:8000/") == ("a", ("http://127.0.0.1:8000",))
    assert parse_endpoint("shared=http://127.0.0.1:8000, https://h:8001") == (
        "shared", ("http://127.0.0.1:8000", "https://h:8001"))


@pytest.mark.parametrize("text,message", [
    ("http://127.0.0.1:8000", "expected NAME=URL[,URL...]"),
    ("=http://127.0.0.1:8000", "expected NAME=URL[,URL...]"),
    ("a=", "'' is not a server root"),
    ("a=http://127.0.0.1:8000,", "'' is not a server root"),
    ("a=127.0.0.1:8000", "'127.0.0.1:8000' is not a server root"),
    ("a=http://", "'http:' is not a server root"),
    ("a=http://h:1,http://h:1/", "a server is named twice"),
])
def test_parse_endpoint_rejects_bad_input_naming_the_flag(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="--endpoint") as e:
        parse_endpoint(text)
    assert message in str(e.value)


@pytest.mark.parametrize("servers", [1, 2, 3])
def test_server_of_sends_each_later_turn_to_the_next_server(servers: int) -> None:
    conversations, turns = 7, 4
    for c in range(conversations):
        for t in range(1, turns):
            assert server_of(c, t, servers) == (server_of(c, t - 1, servers) + 1) % servers
    firsts = [server_of(c, 0, servers) for c in range(conversations)]
    assert max(firsts.count(i) for i in range(servers)) - min(firsts.count(i) for i in range(servers)) <= 1
    if servers == 2:
        assert all(server_of(c, t, 2) != server_of(c, t - 1, 2) for c in range(conversations) for t in range(1, turns))
    with pytest.raises(ValueError, match="servers=0"):
        server_of(0, 0, 0)


class _Server:
    """A streaming ``/v1/completions`` that counts requests in flight and reports half the prompt as cached."""

    def __init__(self) -> None:
        self.in_flight = self.max_in_flight = 0
        self.prompts: list[list[int]] = []
        self.hits = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.prompts.append(body["prompt"])
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(0.01 * (1 + len(self.prompts) % 3))
        for i in range(body["max_tokens"]):
            await resp.write(f"data: {json.dumps({'choices': [{'text': 'a', 'token_ids': [20 + i]}]})}\n\n".encode())
        self.in_flight -= 1
        self.hits += 1
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"],
                 "prompt_tokens_details": {"cached_tokens": len(body["prompt"]) // 2}}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=f'vllm:dynkv_hits_total{{engine="0",tier="host"}} {self.hits * 2}.0\n')

    def __enter__(self) -> _Server:
        self._thread.start()
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)

        async def start() -> str:
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runner = runner
            return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

        self.url = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def server() -> Iterator[_Server]:
    with _Server() as s:
        yield s


def test_endpoint_mode_runs_the_closed_loop(server: _Server) -> None:
    w = Workload(conversations=5, turns=3, prefix_tokens=30, user_tokens=4, answer_tokens=3, concurrency=2)
    engines = run_endpoints([("fake", server.url)], w)
    rep = engines["fake"]
    assert server.max_in_flight == 2, "at most --concurrency requests in flight, and that many when turns are ready"
    prompts = w.prompts()
    assert server.prompts[0] == [w.token_range[0]] * 8, "a warm-up request first"
    assert sorted(map(tuple, server.prompts[1:])) == sorted(tuple(p) for conv in prompts for p in conv)
    assert len(rep["requests"]) == 15 and all(r["error"] is None for r in rep["requests"])
    assert all(r["output_tokens"] == 3 and r["ttft_s"] <= r["latency_s"] for r in rep["requests"])
    s = summarize(rep)
    assert s["errors"] == 0 and s["ttft_first_turn_s"]["n"] == 5 and s["ttft_later_turns_s"]["n"] == 10
    assert 0.45 < s["cached_share"] <= 0.5
    assert s["hits_blocks"]["host"] == 30.0, "dynkv's counters are the /metrics difference over the run (no warm-up)"
    table = format_table({"fake": s})
    assert table.splitlines()[0].split()[:4] == ["engine", "reqs", "err", "TTFT1"]
    assert table.splitlines()[1].split()[:3] == ["fake", "15", "0"]


def test_endpoint_mode_alternates_turns_between_servers(server: _Server) -> None:
    w = Workload(conversations=5, turns=3, prefix_tokens=30, user_tokens=4, answer_tokens=3, concurrency=2)
    with _Server() as other:
        engines = run_endpoints([("both", (server.url, other.url))], w)
        rep = engines["both"]
        prompts = w.prompts()
        for i, srv in enumerate((server, other)):
            assert srv.prompts[0] == [w.token_range[0]] * 8, "each server gets a warm-up request first"
            want = sorted(tuple(prompts[c][t]) for c in range(5) for t in range(3) if (c + t) % 2 == i)
            assert sorted(map(tuple, srv.prompts[1:])) == want
    assert rep["urls"] == [server.url, other.url]
    assert all(r["server"] == (r["conversation"] + r["turn"]) % 2 for r in rep["requests"])
    assert len(rep["requests"]) == 15 and all(r["error"] is None for r in rep["requests"])
    # Each server's counters over the run (its warm-up left out), and their sum.
    assert [ss["dynkv_hits_total{tier=host}"] for ss in rep["server_samples"]] == [16.0, 14.0]
    assert summarize(rep)["hits_blocks"]["host"] == 30.0


def test_endpoint_servers_must_serve_the_model_asked_for(server: _Server) -> None:
    w = Workload(conversations=1, turns=1, prefix_tokens=4, user_tokens=4, answer_tokens=1, concurrency=1)
    with pytest.raises(ValueError, match="serves \\['m'\\], not 'other'"):
        run_endpoints([("x", (server.url,))], w, model="other")


@pytest.mark.slow
def test_bench_load_cpu_smoke(tmp_path: Path) -> None:
    """plain and dynkv on vLLM's CPU build; the working set is 2.5x the device cache, the host tier holds it."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dynkv.cli", "bench", "load", "--device", "cpu", "--engines", "plain,dynkv",
           "--conversations", "6", "--turns", "3", "--prefix-tokens", "256", "--user-tokens", "32",
           "--answer-tokens", "4", "--concurrency", "2", "--device-share", "0.4", "--host-share", "1.25",
           "--work-dir", str(tmp_path / "work"), "--out", str(out), "--no-plot"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    header = next(line for line in run.stdout.splitlines() if line.startswith("engine "))
    for col in ("TTFT1 p50", "TTFT>1 p50", "wall s", "out tok/s", "cached", "host hits", "disk hits", "disk->recompute",
                "KV check"):
        assert col in header, header
    doc = json.loads((out / "load.json").read_text())
    sizes = doc["sizes"]
    assert sizes["working_set_pages"] > sizes["device_blocks"]
    plain, dyn = doc["summaries"]["plain"], doc["summaries"]["dynkv"]
    for s in (plain, dyn):
        assert s["status"] == "ok" and s["requests"] == 18 and s["errors"] == 0
        for key in ("p50", "p90", "mean"):
            assert s["ttft_first_turn_s"][key] > 0 and s["ttft_later_turns_s"][key] > 0
        assert s["wall_s"] > 0 and s["output_tok_s"] > 0
    assert dyn["cached_share"] > 0 and dyn["cached_share_later_turns"] > plain["cached_share_later_turns"]
    assert dyn["hits_blocks"]["host"] > 0 and dyn["bytes"]["h2d"] > 0
    kv = dyn["kv"]
    assert kv["passed"] and kv["requests"] == 18 and kv["loaded"] > 0 and kv["loaded_vs_stored"] > 0, kv
    assert all(r["kv"]["passed"] for r in doc["engines"]["dynkv"]["requests"])
    assert "kv" not in plain, "plain vLLM has no dynkv pages to check"


class _FakeLLM:
    """``collective_rpc`` of one rank whose blocks and host pages have the CRCs the test sets."""

    def __init__(self) -> None:
        self.block_crc: dict[int, int] = {}
        self.page_crc: dict[int, int] = {}

    def collective_rpc(self, fn, args):
        ids, slots = args
        return [{"rank": 0, "blocks": [self.block_crc[b] for b in ids], "pages": [self.page_crc[s] for s in slots]}]


def test_kv_check_catches_a_page_that_differs_from_its_block_or_from_the_page_stored(monkeypatch) -> None:
    from types import SimpleNamespace as NS

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # what importing the engine module sets otherwise
    from dynkv.benchmarks.e2e.kv import KVWatch
    from dynkv.benchmarks.load.engine import _Check

    plans: list[NS] = []
    scheduled: list[NS] = []
    scheduler = NS(schedule=lambda: scheduled.pop(0))
    connector = NS(build_connector_meta=lambda out: NS(plan=plans.pop(0)))
    watch = KVWatch(scheduler, connector)
    llm = _FakeLLM()
    check = _Check(llm, watch, block_size=2)

    def step(req_id: str, blocks: list[int], stores=(), loads=()) -> None:
        scheduled.append(NS(scheduled_new_reqs=[NS(req_id=req_id, block_ids=(blocks,))], scheduled_cached_reqs=None))
        def op(pairs) -> NS:
            return NS(req_id=req_id, block_ids=tuple(b for b, _ in pairs), slots=tuple(s for _, s in pairs))

        plans.append(NS(stores=[op(stores)], loads=[op(loads)]))
        scheduler.schedule()
        connector.build_connector_meta(None)

    first = [1, 2, 3, 4, 5]  # two full blocks of 2 tokens
    llm.block_crc.update({10: 111, 11: 222})
    llm.page_crc.update({0: 111, 1: 222})
    step("c0-t0-x1", [10, 11, 12], stores=[(10, 0), (11, 1)])
    out = check.request("c0-t0", "c0-t0", first)  # vLLM gave the request a suffix add_request did not return
    assert out["passed"] and out["stored"] == 2 and out["loaded"] == 0

    llm.block_crc.update({20: 111, 21: 222})
    step("c0-t1-x2", [20, 21, 22, 23], loads=[(20, 0), (21, 1)])
    out = check.request("c0-t1", "c0-t1-x2", first + [6, 7, 8])
    assert out["passed"] and out["loaded"] == 2 and out["loaded_vs_stored"] == 2

    llm.block_crc.update({30: 111, 31: 999})
    llm.page_crc.update({2: 111, 3: 999})  # a page whose bytes are not those stored for its prefix
    step("c1-t1-x3", [30, 31, 32], loads=[(30, 2), (31, 3)])
    out = check.request("c1-t1", "c1-t1-x3", first)
    assert not out["passed"] and [b["what"] for b in out["bad"]] == ["page loaded != page stored for this prefix"]
    assert out["bad"][0]["position"] == 1

    llm.block_crc.update({40: 5})
    llm.page_crc.update({4: 6})  # a store whose page differs from the block computed
    step("c2-t0-x4", [40, 41], stores=[(40, 4)])
    out = check.request("c2-t0", "c2-t0-x4", [9, 9, 9])
    assert [b["what"] for b in out["bad"]] == ["block != page"]
    assert check.totals["requests"] == 4 and check.totals["failed_requests"] == 2

    with pytest.raises(RuntimeError, match="never gave request c9-t0"):
        check.request("c9-t0", "c9-t0-zz", first)
