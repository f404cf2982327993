"""``dynkv demo``: vLLM with and without dynkv on a multi-turn workload.

On a fresh machine (CPU is enough) this writes a small random-weight model,
then serves it with real ``vllm serve`` several times — without a KV
connector, with dynkv (host and disk tiers), and optionally with vLLM's
``ExampleConnector`` — each time with a device KV cache smaller than the
workload's working set, runs the same multi-turn workload
(:mod:`dynkv.benchmarks.serve`) against it, and prints one table: TTFT, tokens/s,
hits per tier, bytes moved, and whether dynkv's greedy outputs are identical
to vLLM's own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynkv.benchmarks.serve import Workload, add_workload_arguments, report, run_workload, workload_from_args
from dynkv.benchmarks.serve_results import EndpointResult, compare, format_table, plot
from dynkv.testing.model import FIRST_WORD_ID, PRESETS, write_model
from dynkv.testing.server import ServerError, VLLMServer, cuda_visible, free_port

__all__ = ["DESCRIPTION", "Run", "dynkv_transfer_config", "plan_sizes", "scrape_metrics", "server_args",
           "terminate_as_interrupt", "tier_summary"]

DESCRIPTION = (
    "Serve a small random-weight model with vLLM without a KV connector and with dynkv (optionally also vLLM's "
    "ExampleConnector), run a multi-turn workload whose working set exceeds the device KV cache, and print TTFT, "
    "tokens/s, hits per tier, bytes moved and whether outputs are identical."
)
BLOCK_SIZE = 32  # vLLM's CPU attention needs a multiple of 32; GPUs take it too.
# vLLM's default (0) kills the engine at once on shutdown, before the KV
# connector's shutdown() runs; a grace period lets dynkv release its tiers.
SHUTDOWN_TIMEOUT_S = 10
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Run:
    """One server configuration of the demo and what it measured."""

    name: str
    args: list[str]
    metrics_urls: list[str] = field(default_factory=list)
    startup_s: float | None = None
    result: EndpointResult | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def default_model_dir(preset: str, seed: int = 0) -> Path:
    """Where the demo caches its model: ``$XDG_CACHE_HOME/dynkv/models`` (``~/.cache`` by default)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dynkv" / "models" / f"{preset}-seed{seed}"


def plan_sizes(w: Workload, kv_bytes_per_token: int, block_size: int = BLOCK_SIZE) -> dict[str, int]:
    """Size the device KV cache and dynkv's tiers against the workload.

    The device cache holds about a quarter of the working set (at least one
    longest request), so conversations coming back find their prefix evicted
    from it; the host tier holds about half, so with shuffled turns some hits
    come from host memory and some from disk; the disk holds all of it twice.
    """
    longest = w.prefix_tokens + w.turns * w.user_tokens + (w.turns - 1) * w.max_tokens
    max_model_len = max(256, math.ceil((longest + w.max_tokens) / block_size) * block_size)
    conv_blocks = math.ceil((longest + w.max_tokens) / block_size)
    working_set = w.conversations * conv_blocks
    # vLLM keeps one null block and refuses a cache that cannot hold one max-length request.
    device_blocks = max(max_model_len // block_size + 1, working_set // 4)
    page_bytes = kv_bytes_per_token * block_size
    return {"block_size": block_size, "max_model_len": max_model_len, "working_set_blocks": working_set,
            "device_blocks": device_blocks, "page_bytes": page_bytes, "host_pages": max(1, working_set // 2),
            "disk_pages": 2 * working_set}


def server_args(sizes: dict[str, int], *, gpu: bool, seed: int = 0) -> list[str]:
    """``vllm serve`` flags of every demo run: float32, small block cache, deterministic."""
    args = ["--dtype", "float32", "--block-size", str(sizes["block_size"]), "--max-model-len",
            str(sizes["max_model_len"]), "--num-gpu-blocks-override", str(sizes["device_blocks"]),
            "--seed", str(seed), "--served-model-name", "demo", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    if not gpu:
        # Eager mode and an explicit cache size let vLLM's CPU worker skip
        # torch.compile and its warm-up profiling (minutes on two cores).
        args += ["--enforce-eager", "--kv-cache-memory-bytes", str(sizes["device_blocks"] * sizes["page_bytes"])]
    return args


def dynkv_transfer_config(sizes: dict[str, int], disk_dir: Path, metrics_port: int) -> dict[str, Any]:
    """``--kv-transfer-config`` of the dynkv run."""
    def gib(pages: int) -> float:
        # Rounded up to a millionth of a GiB: readable, never 0.
        return math.ceil(pages * sizes["page_bytes"] / 2**30 * 1e6) / 1e6

    extra = {
        "host_gb": gib(sizes["host_pages"]),
        "disk_gb": gib(sizes["disk_pages"]),
        "disk_paths": [str(disk_dir)],
        # A short demo sees each page only a few times: admit to disk at once.
        "disk_admit_min_hits": 0,
        "metrics_port": metrics_port,
    }
    return {"kv_connector": "DynKVConnector", "kv_role": "kv_both", "kv_connector_module_path": "dynkv.connector",
            "kv_connector_extra_config": extra}


def scrape_metrics(urls: list[str], timeout_s: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``dynkv_*`` samples (``vllm:dynkv_*`` too) of Prometheus endpoints; unreachable ones are skipped.

    Returns ``{(name, sorted labels): value}`` without vLLM's ``engine`` and
    ``model_name`` labels; a sample exposed by several endpoints keeps its
    largest value.
    """
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                text = r.read().decode(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m is None or line.startswith("#"):
                continue
            name = m.group(1).removeprefix("vllm:")
            if not name.startswith(("dynkv_", "prefix_cache_", "external_prefix_cache_")) \
                    or name.endswith(("_created", "_bucket")):
                continue
            labels = tuple(sorted((k, v) for k, v in _LABEL.findall(m.group(2) or "")
                                  if k not in ("engine", "model_name")))
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            key = (name, labels)
            out[key] = max(value, out.get(key, value))
    return out


def tier_summary(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, Any]:
    """Hits per tier, bytes moved and vLLM's own prefix-cache hits, from scraped samples.

    Every value is None when its metric is absent, so the table says "n/a"
    instead of a misleading 0.
    """
    def total(pred: Any) -> float | None:
        vals = [v for (n, labels), v in samples.items() if pred(n, dict(labels))]
        return sum(vals) if vals else None

    def is_counter(n: str) -> bool:
        return n.endswith("_total")

    out: dict[str, Any] = {
        # vLLM counts prefix-cache hits in tokens.
        "device_hit_tokens": total(lambda n, lb: n == "prefix_cache_hits_total"),
        "connector_hit_tokens": total(lambda n, lb: n == "external_prefix_cache_hits_total"),
        "bytes_moved": total(lambda n, lb: n.startswith("dynkv_") and "bytes" in n and is_counter(n)),
        "bytes_by_direction": {},
    }
    for tier in ("device", "host", "disk"):
        out[f"{tier}_hits"] = total(lambda n, lb, t=tier: n.startswith("dynkv_") and "hit" in n and is_counter(n)
                                    and (lb.get("tier") == t or (t in n and "tier" not in lb)))
    for (n, labels), v in samples.items():
        lb = dict(labels)
        if n.startswith("dynkv_") and "bytes" in n and is_counter(n) and "direction" in lb:
            out["bytes_by_direction"][lb["direction"]] = out["bytes_by_direction"].get(lb["direction"], 0.0) + v
    return out


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _count(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt so servers are stopped on the way out."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run_one(run: Run, model: Path, w: Workload, log_dir: Path, timeout_s: float) -> None:
    from tqdm import tqdm

    log_path = log_dir / (re.sub(r"\W+", "-", run.name) + ".log")
    server = VLLMServer(str(model), run.args, log_path=log_path, name=run.name)
    pools: set[str] = set()
    try:
        with server, tqdm(total=None, desc=f"{run.name}: starting vLLM", bar_format="{desc} {elapsed}",
                          disable=None, leave=False) as bar:
            run.startup_s = server.wait_ready(timeout_s, tick=lambda _: bar.refresh())
            bar.close()
            pools = server.mapped_files("/dev/shm/dynkv-")
            print(f"[{run.name}] vLLM ready in {run.startup_s:.0f} s on port {server.port}; running "
                  f"{w.num_requests} requests", flush=True)
            run.result = run_workload({run.name: server.url}, w)[run.name]
            # Let a last stats interval reach the metrics before scraping.
            time.sleep(1.0)
            samples = scrape_metrics([server.url + "/metrics", *run.metrics_urls])
            run.metrics = tier_summary(samples)
            run.metrics["samples"] = {n + ("{" + ",".join(f"{k}={v}" for k, v in lb) + "}" if lb else ""): v
                                      for (n, lb), v in sorted(samples.items())}
    finally:
        # dynkv's host pool is a memfd, gone with the server's processes; where
        # the kernel had none it is in /dev/shm, which a killed server leaves
        # behind (memory held until reboot). Ours are gone now.
        for path in pools:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                print(f"[{run.name}] removed host pool {path} left by the stopped server")


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo of parsed options; returns the report (also printed)."""
    spec = PRESETS[args.preset]
    w = workload_from_args(args, token_range=(FIRST_WORD_ID, spec.vocab_size), model="demo")
    model_dir = args.model_dir or default_model_dir(args.preset)
    print(f"model: {args.preset} preset ({spec.num_layers} layers, hidden {spec.hidden_size}) at {model_dir}")
    model = write_model(model_dir, preset=args.preset)
    sizes = plan_sizes(w, spec.kv_bytes_per_token(), BLOCK_SIZE)
    gpu = cuda_visible()
    print(f"device KV cache {sizes['device_blocks']} blocks of {BLOCK_SIZE} tokens; working set "
          f"{sizes['working_set_blocks']} blocks; dynkv host {sizes['host_pages']} pages, disk "
          f"{sizes['disk_pages']} pages ({'GPU' if gpu else 'CPU'})")
    if sizes["working_set_blocks"] <= sizes["device_blocks"]:
        print("note: the working set fits in the device KV cache; raise --conversations or --prefix-tokens "
              "to see offloading")
    work = Path(tempfile.mkdtemp(prefix="dynkv-demo-", dir=args.work_dir))
    base = server_args(sizes, gpu=gpu, seed=args.seed)
    mport = free_port()
    xfer = dynkv_transfer_config(sizes, work / "disk", mport)
    (work / "disk").mkdir()
    runs = [Run("no connector", base),
            Run("dynkv", [*base, "--kv-transfer-config", json.dumps(xfer)],
                metrics_urls=[f"http://127.0.0.1:{mport}/metrics"])]
    if args.with_example_connector:
        (work / "example").mkdir()
        ex = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"shared_storage_path": str(work / "example")}}
        runs.append(Run("ExampleConnector", [*base, "--kv-transfer-config", json.dumps(ex)]))
    failed = False
    try:
        with terminate_as_interrupt():
            for run in runs:
                try:
                    _run_one(run, model, w, work / "logs", args.startup_timeout)
                except ServerError as e:
                    run.error = str(e)
                    failed = True
                    print(f"[{run.name}] {e}", file=sys.stderr)
    finally:
        if args.keep or failed:
            print(f"logs kept in {work / 'logs'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return _finish(runs, w, sizes, xfer, args)


def _finish(runs: list[Run], w: Workload, sizes: dict[str, int], xfer: dict[str, Any],
            args: argparse.Namespace) -> dict[str, Any]:
    done = {r.name: r.result for r in runs if r.result is not None}
    ref = done.get("no connector")
    extra: dict[str, dict[str, str]] = {}
    comparisons = {}
    for r in runs:
        if r.result is None:
            continue
        m = r.metrics
        device = m.get("device_hit_tokens")
        # Hits in blocks: vLLM counts its prefix-cache hits in tokens of whole blocks.
        row = {"device hits": _count(None if device is None else device / sizes["block_size"]),
               "host hits": _count(m.get("host_hits")), "disk hits": _count(m.get("disk_hits")),
               "moved": _human_bytes(m.get("bytes_moved"))}
        if ref is not None and r.result is not ref:
            c = comparisons[r.name] = compare(ref, r.result)
            row["identical"] = "yes" if c["identical"] else "no"
        else:
            row["identical"] = "ref" if r.result is ref else "n/a"
        extra[r.name] = row
    print()
    print(format_table(done, extra) if done else "no run completed")
    for r in runs:
        if r.error is not None:
            print(f"{r.name}: FAILED (see above)")
    if "dynkv" in comparisons:
        c = comparisons["dynkv"]
        print(f"outputs identical (dynkv vs no connector, greedy tokens): {'yes' if c['identical'] else 'no'}"
              + ("" if c["identical"] else f" - first difference {c['first_difference']}"))
    doc = report(done, w, sizes=sizes, dynkv_kv_transfer_config=xfer,
                 runs={r.name: {"args": r.args, "startup_s": r.startup_s, "metrics": r.metrics, "error": r.error}
                       for r in runs},
                 demo_comparisons=comparisons)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    if args.plot is not None and done:
        plot(done, args.plot, title=f"dynkv demo ({args.preset} model)")
        print(f"wrote {args.plot}")
    return doc


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dynkv demo``."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model preset")
    add_workload_arguments(p)
    p.add_argument("--with-example-connector", action="store_true",
                   help="also run vLLM's ExampleConnector (stores KV as files) for comparison")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server logs, disk tier)")
    p.add_argument("--work-dir", type=Path, help="parent of the temporary work directory (default: system temp)")
    p.add_argument("--model-dir", type=Path, help="where the model is written (default: ~/.cache/dynkv/models/...)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for each server")


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dynkv demo``."""
    try:
        doc = run_demo(args)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    runs = doc["runs"]
    ok = all(r["error"] is None for r in runs.values()) and all(
        e["summary"]["errors"] == 0 for e in doc["endpoints"].values())
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m dynkv.benchmarks.demo [options]``: the same as ``dynkv demo``."""
    p = argparse.ArgumentParser(prog="dynkv demo", description=DESCRIPTION)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
