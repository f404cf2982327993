"""KV-aware routing measured: N engines behind ``dynkv proxy``, a multi-turn workload, ``kv`` against
``round-robin``.

``python -m dynkv.benchmarks.router --out results.json`` starts ``--engines``
vLLM engines (two by default; random-weight model, KV events on, each device cache holding about
``cache_share`` of the workload's working set), then for each policy starts
the proxy over them and runs a closed-loop multi-turn workload through it:
``concurrency`` conversations in flight, each sending its turns one after
the other (the prompt is the whole conversation so far), every request
streamed, TTFT taken at the first token. Each policy gets conversations of
its own (other seeds), so no run finds another's prefixes. Reported per
policy: TTFT p50/p90 of later turns, the request share of each engine, and
predicted against reported cached tokens; the ratio kv / round-robin is the
result. With round robin every engine sees every conversation and, with a
device cache smaller than the working set, evicts what the next turn needs;
kv routing keeps each conversation where its prefix is, so the engines'
caches add up.

With ``--remote-url`` (or ``--redis``, which starts a ``redis-server`` on a
loopback port for the run) the engines run dynkv with the shared tier on
that store and a small host tier: round robin then finds a conversation's
earlier turns in the store, and the run measures whether device hits on the
engine kv routing picks still beat them. Each run also reports the pages the
engines put to and got from the store.

With ``--device cuda`` the engines share one GPU: Llama-3-8B geometry with
random bf16 weights (the model ``dynkv bench load`` writes), 16-token blocks,
each engine ``--gpu-share`` of the GPU's memory (``--gpu-memory-utilization``)
and a device cache of ``cache_share`` of the working set
(``--num-gpu-blocks-override``), the workload as large as ``bench load``'s on a
GPU. They start one after the other: vLLM sizes its cache by profiling the
memory the GPU has free, which another engine starting at the same time
changes under it (on CPU both start together: their caches have a fixed size).
``--engine-arg KEY=VALUE`` (repeatable) adds a flag to every engine,
``--dry-run`` prints the engines' and proxies' commands and starts nothing.

The pieces (engine flags, the proxy as a process, the driver of
:mod:`dynkv.benchmarks.router_driver`) serve the end-to-end tests too.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dynkv.benchmarks.demo import BLOCK_SIZE, SHUTDOWN_TIMEOUT_S, scrape_metrics, terminate_as_interrupt
from dynkv.benchmarks.load.workload import Sizes, Workload, plan_sizes
from dynkv.benchmarks.router_driver import Conversation, Turn, drive, drive_async, summarize
from dynkv.benchmarks.serve import engine_arg
from dynkv.testing.model import PRESETS, write_model
from dynkv.testing.server import ServerError, VLLMServer, free_port

__all__ = ["Conversation", "ProxyProcess", "RedisProcess", "Turn", "drive", "drive_async", "engine_args",
           "engine_flags", "events_config", "shared_transfer_config", "summarize"]

ENGINES = 2  # default engine count
# (option, default with --device cuda, default on CPU): bench load's GPU workload, and a small one for few cores.
_DEFAULTS = (("preset", "llama3-8b", "tiny"), ("block_size", 16, BLOCK_SIZE), ("conversations", 32, 12),
             ("turns", 4, 4), ("prefix_tokens", 4096, 768), ("user_tokens", 256, 32), ("max_tokens", 64, 8),
             ("concurrency", 8, 2))


def events_config(pub_port: int, replay_port: int) -> str:
    """``--kv-events-config`` with a replay socket on loopback.

    vLLM binds its publisher only for a wildcard address (``tcp://*:port``)
    and connects it otherwise, so the publisher listens on every interface.
    """
    return json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "topic": "",
                       "endpoint": f"tcp://*:{pub_port}", "replay_endpoint": f"tcp://127.0.0.1:{replay_port}",
                       "buffer_steps": 100000})


def engine_args(*, device_blocks: int, max_model_len: int, page_bytes: int, pub_port: int, replay_port: int,
                transfer_config: dict[str, Any] | None = None, seed: int = 0, device: str = "cpu",
                block_size: int = BLOCK_SIZE, gpu_share: float = 0.4,
                extra: Mapping[str, Any] | None = None) -> list[str]:
    """Flags of one engine: a device cache of ``device_blocks``, KV events and cached-token usage on.

    On CPU: float32, eager, the cache's bytes given (no profiling). With
    ``device="cuda"``: bf16, ``gpu_share`` of the GPU's memory, the cache
    capped at ``device_blocks``. ``extra`` (``--engine-arg``) comes last, so
    a flag given there wins.
    """
    args = ["--block-size", str(block_size), "--max-model-len", str(max_model_len), "--num-gpu-blocks-override",
            str(device_blocks), "--seed", str(seed), "--served-model-name", "m", "--shutdown-timeout",
            str(SHUTDOWN_TIMEOUT_S), "--enable-prompt-tokens-details", "--kv-events-config",
            events_config(pub_port, replay_port)]
    if device == "cuda":
        args = ["--dtype", "bfloat16", "--gpu-memory-utilization", f"{gpu_share:g}", *args]
    elif device == "cpu":
        args = ["--dtype", "float32", *args, "--kv-cache-memory-bytes", str(device_blocks * page_bytes),
                "--enforce-eager"]
    else:
        raise ValueError(f"device {device!r}: expected 'cpu' or 'cuda'")
    if transfer_config is not None:
        args += ["--kv-transfer-config", json.dumps(transfer_config)]
    return [*args, *engine_flags(extra or {})]


def engine_flags(extra: Mapping[str, Any]) -> list[str]:
    """``vllm serve`` flags of ``--engine-arg`` values: ``attention_backend="TRITON_ATTN"`` ->
    ``--attention-backend TRITON_ATTN``; True -> ``--key``, False -> ``--no-key``; a dict or list as JSON."""
    out: list[str] = []
    for key, value in extra.items():
        flag = "--" + key.lstrip("-").replace("_", "-")
        if value is True or value is False:
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return out


def shared_transfer_config(remote_url: str, host_pages: int) -> dict[str, Any]:
    """``--kv-transfer-config`` of an engine with dynkv's shared tier at ``remote_url`` and ``host_pages`` of host
    tier (no disk tier)."""
    return {"kv_connector": "DynKVConnector", "kv_role": "kv_both", "kv_connector_module_path": "dynkv.connector",
            "kv_connector_extra_config": {"host_pages": host_pages, "disk_gb": 0, "remote_url": remote_url}}


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s, of a process this bench started (None or exited: nothing)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisProcess:
    """A ``redis-server`` on a free loopback port, no persistence, for one run; :attr:`url` is its store URL."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("--redis: redis-server is not on PATH; install it (apt-get install redis-server) "
                               "or give --remote-url of a running store")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
               "no", "--dir", str(self.workdir), "--daemonize", "no"]
        with open(self.workdir / "redis.log", "ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}; see {self.workdir}/redis.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"redis-server did not listen on {self.port} within 30 s") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        _stop(self._proc)


def _shared_pages(url: str) -> dict[str, float]:
    """Pages ``url``'s engine put to (``host_to_shared``) and got from (``shared_to_host``) the shared tier."""
    samples = scrape_metrics([url + "/metrics"])
    return {d: samples.get(("dynkv_pages_moved_total", (("direction", d),)), 0.0)
            for d in ("host_to_shared", "shared_to_host")}


class ProxyProcess:
    """``python -m dynkv.proxy --engine ...`` as a child process, logging to a file."""

    def __init__(self, engines: list[tuple[str, int, int]], policy: str, log_path: Path, *,
                 extra: list[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dynkv.proxy", "--port", str(self.port), "--policy", policy]
        for url, pub, replay in engines:
            cmd += ["--engine", url, "--kv-events", f"tcp://127.0.0.1:{pub}", "--kv-replay",
                    f"tcp://127.0.0.1:{replay}"]
        self.command = [*cmd, *extra]
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ProxyProcess:
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self._proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"proxy not healthy after 60 s: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        _stop(self._proc)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            body = r.read()
        return json.loads(body) if path != "/metrics" else body.decode()


def _sizes(args: argparse.Namespace) -> Sizes:
    """Working set and device cache (``cache_share`` of it) in blocks, planned as ``dynkv bench load`` plans them.

    Raises ``ValueError`` (naming the option) for a cache that cannot hold
    ``concurrency`` longest requests at once or a request longer than the model.
    """
    spec = PRESETS[args.preset]
    w = Workload(conversations=args.conversations, turns=args.turns, prefix_tokens=args.prefix_tokens,
                 user_tokens=args.user_tokens, answer_tokens=args.max_tokens, concurrency=args.concurrency)
    page_bytes = spec.kv_bytes_per_token(spec.elem_bytes if args.device == "cuda" else 4) * args.block_size
    sizes = plan_sizes(w, args.block_size, page_bytes, args.cache_share, 0.0, 0.0)
    if sizes.max_model_len > spec.max_position_embeddings:
        raise ValueError(f"the longest request needs {sizes.max_model_len} tokens but --preset {args.preset} holds "
                         f"{spec.max_position_embeddings}: fewer --turns or tokens, or another --preset")
    return sizes


def _servers(args: argparse.Namespace, sizes: Sizes, model: Path, remote_url: str | None
             ) -> tuple[list[VLLMServer], list[tuple[str, int, int]], dict[str, str]]:
    """The engines (not started), their ``(url, events port, replay port)`` and the environment they add."""
    transfer = shared_transfer_config(remote_url, args.host_pages) if remote_url else None
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(args.threads)} if args.device == "cpu" else {}
    servers, engines = [], []
    for i in range(args.engines):
        pub, replay = free_port(), free_port()
        flags = engine_args(device_blocks=sizes.device_blocks, max_model_len=sizes.max_model_len,
                            page_bytes=sizes.page_bytes, pub_port=pub, replay_port=replay, transfer_config=transfer,
                            device=args.device, block_size=args.block_size, gpu_share=args.gpu_share,
                            extra=dict(args.engine_arg))
        s = VLLMServer(str(model), flags, log_path=Path(args.work) / f"engine{i}.log", name=f"engine{i}", env=env)
        servers.append(s)
        engines.append((s.url, pub, replay))
    return servers, engines, env


def _start(servers: list[VLLMServer], *, one_by_one: bool, timeout_s: float) -> None:
    """Start the engines and wait for each to answer ``/health`` (``ServerError`` with its log's tail if not)."""
    for s in servers:
        print(f"[{s.name}] starting (log {s.log_path})", flush=True)
        s.start()
        if one_by_one:
            print(f"[{s.name}] ready in {s.wait_ready(timeout_s):.0f} s", flush=True)
    if not one_by_one:
        for s in servers:
            print(f"[{s.name}] ready in {s.wait_ready(timeout_s):.0f} s", flush=True)


def _dry_run(args: argparse.Namespace, sizes: Sizes, model: Path) -> None:
    """Print what a run would start: each engine's environment and command, each policy's proxy."""
    remote_url = "redis://127.0.0.1:PORT/0" if args.redis else args.remote_url
    servers, engines, env = _servers(args, sizes, model, remote_url)
    print(f"model: {args.preset} at {model} (written at the start of a run unless there)")
    print(f"device {args.device}: blocks of {args.block_size} tokens ({sizes.page_bytes / 1024:g} KiB pages); working "
          f"set {sizes.working_set_pages} blocks; each engine's device cache {sizes.device_blocks} blocks; engines "
          f"start {'one after the other' if args.device == 'cuda' else 'together'}, --ready-timeout "
          f"{args.ready_timeout:g} s each")
    for s in servers:
        print(f"{s.name}: {shlex.join([*(f'{k}={v}' for k, v in env.items()), *s.command])}")
    for policy in args.policies:
        print(f"proxy {policy}: {shlex.join(ProxyProcess(engines, policy, Path(args.work) / 'proxy.log').command)}")


def _run(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    if args.redis:
        with RedisProcess(Path(args.work) / "redis") as store:
            return _run_engines(args, sizes, store.url)
    return _run_engines(args, sizes, args.remote_url)


def _run_engines(args: argparse.Namespace, sizes: Sizes, remote_url: str | None) -> dict[str, Any]:
    spec = PRESETS[args.preset]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = write_model(work / args.preset, preset=args.preset)
    print(f"model: {args.preset} at {model} ({time.perf_counter() - t0:.0f} s)", flush=True)
    servers, engines, _ = _servers(args, sizes, model, remote_url)
    result: dict[str, Any] = {"workload": {k: getattr(args, k) for k in (
        "conversations", "turns", "prefix_tokens", "user_tokens", "max_tokens", "concurrency", "preset",
        "cache_share")}, "engines": args.engines, "device": args.device, "block_size": args.block_size,
        "gpu_share": args.gpu_share if args.device == "cuda" else None, "engine_command": servers[0].command,
        "device_blocks": sizes.device_blocks, "working_set_blocks": sizes.working_set_pages,
        "shared_tier": {"host_pages": args.host_pages} if remote_url else None, "runs": []}
    try:
        _start(servers, one_by_one=args.device == "cuda", timeout_s=args.ready_timeout)
        seed = 0
        for rep in range(args.repeats):
            for policy in args.policies:
                seed += 1
                rng = random.Random(seed)
                convs = [Conversation.make(rng, args.prefix_tokens, args.user_tokens, args.turns, spec.vocab_size)
                         for _ in range(args.conversations)]
                before = [_shared_pages(e[0]) for e in engines] if remote_url else None
                with ProxyProcess(engines, policy, work / f"proxy-{policy}-{rep}.log") as proxy:
                    t0 = time.perf_counter()
                    turns = drive(proxy.url, convs, max_tokens=args.max_tokens, concurrency=args.concurrency)
                    wall = time.perf_counter() - t0
                summary = summarize(turns, [e[0] for e in engines])
                if before is not None:
                    after = [_shared_pages(e[0]) for e in engines]
                    summary["shared_pages"] = {d: sum(a[d] - b[d] for a, b in zip(after, before))
                                               for d in ("host_to_shared", "shared_to_host")}
                print(f"[{rep}] {policy}: {json.dumps(summary)}", flush=True)
                result["runs"].append({"policy": policy, "repeat": rep, "seed": seed, "wall_s": wall,
                                       "summary": summary, "turns": [asdict(t) for t in turns]})
    finally:
        for s in servers:
            s.stop()
    by = {p: [r["summary"] for r in result["runs"] if r["policy"] == p] for p in args.policies}
    result["max_share_over_mean"] = {p: [s["max_share_over_mean"] for s in v] for p, v in by.items()}
    result["errors"] = {p: sum(s["errors"] for s in v) for p, v in by.items()}
    if "kv" in by and "round-robin" in by:
        result["ratio_kv_over_rr_later_p50"] = [
            k["ttft_later_p50_s"] / r["ttft_later_p50_s"] for k, r in zip(by["kv"], by["round-robin"])
            if k["ttft_later_p50_s"] and r["ttft_later_p50_s"]]
    return result


def _targets(result: dict[str, Any]) -> str:
    """The issue's two figures, one line each: later-turn TTFT p50 kv / round-robin, largest request share / mean."""
    def figures(values: list[float | None]) -> str:
        return ", ".join("-" if v is None else f"{v:.3f}" for v in values) or "-"

    return (f"later-turn TTFT p50, kv / round-robin: {figures(result.get('ratio_kv_over_rr_later_p50', []))} "
            f"(target <= 0.5)\nlargest request share / mean: "
            + "; ".join(f"{p} {figures(v)}" for p, v in result["max_share_over_mean"].items())
            + " (target <= 1.5)\nfailed requests: "
            + ", ".join(f"{p} {n}" for p, n in result["errors"].items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynkv.benchmarks.router", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--work", default="/tmp/dynkv-router-bench", help="model, logs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="vLLM build of the engines; cuda: both on one GPU, bf16 (default cpu)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model geometry (default llama3-8b on cuda, tiny on cpu)")
    p.add_argument("--block-size", type=int, help=f"tokens per KV block (default 16 on cuda, {BLOCK_SIZE} on cpu)")
    p.add_argument("--conversations", type=int, help="default 32 on cuda, 12 on cpu")
    p.add_argument("--turns", type=int, help="default 4")
    p.add_argument("--prefix-tokens", type=int, help="default 4096 on cuda, 768 on cpu")
    p.add_argument("--user-tokens", type=int, help="default 256 on cuda, 32 on cpu")
    p.add_argument("--max-tokens", type=int, help="tokens of each answer (default 64 on cuda, 8 on cpu)")
    p.add_argument("--concurrency", type=int, help="conversations in flight (default 8 on cuda, 2 on cpu)")
    p.add_argument("--cache-share", "--device-share", dest="cache_share", type=float, default=0.6,
                   help="each engine's device cache as a share of the workload's working set")
    p.add_argument("--engines", type=int, default=ENGINES,
                   help=f"engines behind the proxy (default {ENGINES}); round-robin sends a conversation's turns "
                        "to each in turn")
    p.add_argument("--gpu-share", type=float,
                   help="with --device cuda: each engine's --gpu-memory-utilization (the engines share the GPU; "
                        "default 0.8 / engines)")
    p.add_argument("--engine-arg", type=engine_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra flag for every engine, e.g. attention_backend=TRITON_ATTN or enforce_eager=true "
                        "(VALUE as JSON or a string; true/false: --key/--no-key); repeatable")
    p.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds each engine may take to answer /health before the run stops (default 600)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the engines' and proxies' commands and environment; start and write nothing")
    p.add_argument("--policies", nargs="+", default=["round-robin", "kv"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per engine (cpu)")
    p.add_argument("--remote-url", default=None,
                   help="run every engine with dynkv's shared tier on this store (redis://HOST:PORT/DB, ...)")
    p.add_argument("--redis", action="store_true",
                   help="start a redis-server on a loopback port for the run and use it as --remote-url")
    p.add_argument("--host-pages", type=int, default=32,
                   help="with a shared tier: each engine's dynkv host tier in pages (small, so later turns "
                        "that miss the device come from the store)")
    args = p.parse_args(argv)
    for key, on_gpu, on_cpu in _DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if args.device == "cuda" else on_cpu)
    if args.redis and args.remote_url:
        p.error("--redis starts its own store: give it or --remote-url, not both")
    if args.host_pages < 1:
        p.error(f"--host-pages {args.host_pages}: expected a page count >= 1")
    if args.engines < 2:
        p.error(f"--engines {args.engines}: expected 2 or more (routing needs a choice)")
    if args.gpu_share is None:
        args.gpu_share = round(0.8 / args.engines, 3)
    if not 0 < args.gpu_share <= 1 / args.engines:
        p.error(f"--gpu-share {args.gpu_share:g}: expected 0 < share <= {1 / args.engines:g} ({args.engines} engines "
                "share the GPU)")
    if args.block_size < 1 or (args.device == "cpu" and args.block_size % 32):
        p.error(f"--block-size {args.block_size}: expected a positive block size (a multiple of 32 on cpu)")
    if args.max_tokens < 1:
        p.error(f"--max-tokens {args.max_tokens}: expected an integer >= 1")
    if not args.ready_timeout > 0:
        p.error(f"--ready-timeout {args.ready_timeout:g}: expected seconds > 0")
    try:
        sizes = _sizes(args)
    except ValueError as e:
        p.error(str(e))
    if args.dry_run:
        _dry_run(args, sizes, Path(args.work) / args.preset)
        return 0
    try:
        with terminate_as_interrupt():  # SIGTERM as Ctrl-C: the engines and the proxy are stopped on the way out
            result = _run(args, sizes)
    except ServerError as e:
        print(f"router bench: {e}\nevery engine was stopped", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    print(_targets(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
