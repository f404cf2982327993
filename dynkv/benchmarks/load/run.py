"""``dynkv bench load``: multi-turn conversations under a closed loop; plain vLLM, dynkv and vLLM's offloading.

The workload (:mod:`dynkv.benchmarks.load.workload`): ``--conversations``
conversations of ``--turns`` turns, each turn's prompt the whole conversation
so far plus a new user message, fixed answers, at most ``--concurrency``
requests in flight. The caches are sized from the working set (every
conversation's longest request, in blocks): vLLM's device cache holds
``--device-share`` of it (``num_gpu_blocks_override``), dynkv's host tier (and
the OffloadingConnector's CPU tier) ``--host-share``, dynkv's disk tier
``--disk-share``.

Engines, each in a process of its own, one after the other, on the same
prompts (:mod:`dynkv.benchmarks.load.engine`, the engine core in that
process, driven through its step loop):

- ``plain``: vLLM with its own prefix cache, no connector;
- ``dynkv``: :class:`dynkv.connector.DynKVConnector` with the host (and disk)
  tier, its config extended by ``--dynkv-config``; each ``--dynkv-variant
  NAME=JSON`` adds an engine ``dynkv-NAME`` with those keys changed;
- ``offloading``: vLLM's ``OffloadingConnector`` (CUDA only).

With ``--endpoint NAME=URL`` the same workload goes to running
OpenAI-compatible servers instead (:mod:`dynkv.benchmarks.load.endpoint`);
with ``--endpoint NAME=URL1,URL2`` its requests alternate between servers
(turn ``t`` of conversation ``c`` to server ``(c + t) % n``), the measure of
engines sharing KV through dynkv's shared tier.
Output: a table, JSON (every request), a PNG (with matplotlib), a progress
bar on stderr, one log per engine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dynkv.benchmarks.load.endpoint import parse_endpoint
from dynkv.benchmarks.load.report import format_table, plot, summarize
from dynkv.benchmarks.load.workload import Sizes, Workload, plan_sizes
from dynkv.benchmarks.serve import engine_arg, token_range_arg
from dynkv.testing.model import FIRST_WORD_ID, PRESETS, write_model

__all__ = ["DESCRIPTION", "ENGINES", "add_arguments", "engine_args", "run", "run_from_args"]

DESCRIPTION = (
    "Multi-turn conversations, at most K requests in flight, working set larger than the device cache: TTFT of "
    "first and later turns, throughput, cached share, hits and bytes per tier and a KV check per request, for plain "
    "vLLM, dynkv (and variants of its config) and vLLM's OffloadingConnector, or for running servers. Table, JSON, PNG."
)
ENGINES = ("plain", "dynkv", "offloading")
# (option, default on a GPU, default on CPU): the CPU build runs a small model on few cores.
_DEFAULTS = (("conversations", 32, 8), ("turns", 4, 3), ("prefix_tokens", 4096, 512), ("user_tokens", 256, 32),
             ("answer_tokens", 64, 8), ("concurrency", 8, 2))
_RECORD_HEADER = 4096  # a disk-tier record is a 4 KiB header and the page (dynkv.tiers.diskfile)


def engine_args(gpu: bool, sizes: Sizes, w: Workload, extra: dict[str, Any]) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments shared by every engine of the run (``extra`` wins)."""
    args: dict[str, Any] = {"block_size": sizes.block_size, "max_model_len": sizes.max_model_len,
                            "enable_prefix_caching": True, "seed": 0, "max_num_seqs": max(16, w.concurrency),
                            "num_gpu_blocks_override": sizes.device_blocks, "disable_log_stats": False}
    if gpu:
        # One GPU, the engine in this process: the uni executor; Triton attention as in bench e2e's GPU runs.
        args.update(dtype="bfloat16", attention_backend="TRITON_ATTN", distributed_executor_backend="uni")
    else:
        # vLLM's CPU build: float32, eager, and a KV cache of the device share (no memory profiling).
        args.update(dtype="float32", enforce_eager=True, max_num_batched_tokens=max(2048, sizes.max_model_len),
                    kv_cache_memory_bytes=(sizes.device_blocks + 1) * sizes.page_bytes)
    args.update(extra)
    return args


def _dynkv_extra(sizes: Sizes, disk_dir: Path, gpu: bool, base: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {"host_pages": sizes.host_pages}
    if sizes.disk_pages:
        record = _RECORD_HEADER + math.ceil(sizes.page_bytes / 4096) * 4096
        extra.update(disk_gb=math.ceil(sizes.disk_pages * record / 2**30 * 1e3) / 1e3, disk_paths=[str(disk_dir)],
                     io_threads=16 if gpu else 4)
    extra.update(base)
    return extra


def _progress(fd: int, total: int, name: str) -> threading.Thread:
    """A thread that reads one line per finished request from ``fd`` and moves a bar on stderr."""

    def follow() -> None:
        from tqdm import tqdm

        with os.fdopen(fd) as f, tqdm(total=total, desc=name, unit="req", file=sys.stderr, leave=False,
                                      disable=None) as bar:  # on a terminal only
            for line in f:
                bar.update(1)
                bar.set_postfix_str(f"ttft {float(line):.3f}s")

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    return t


def _run_engine(name: str, spec: dict[str, Any], work: Path, log_dir: Path, timeout_s: float,
                total: int) -> dict[str, Any]:
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    out_path.unlink(missing_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    print(f"[{name}] starting vLLM (log: {log_path})", flush=True)
    r, wfd = os.pipe()
    spec_path.write_text(json.dumps({**spec, "progress_fd": wfd}))
    bar = _progress(r, total, name)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "dynkv.benchmarks.load.engine", str(spec_path),
                                   str(out_path)], stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  pass_fds=(wfd,))
            status = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"killed after {timeout_s:.0f} s"
        finally:
            os.close(wfd)
    bar.join(timeout=5)
    report = json.loads(out_path.read_text()) if out_path.is_file() else {"requests": [], "errors": []}
    report["status"], report["process_s"] = status, time.perf_counter() - t0
    if status != "ok":
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print(f"[{name}] {status}; last lines of its log:\n" + "\n".join(tail), file=sys.stderr, flush=True)
    for err in report.get("errors", []):
        print(f"[{name}] error: {err}", file=sys.stderr, flush=True)
    print(f"[{name}] {status} in {report['process_s']:.0f} s", flush=True)
    return report


def _device(gpu: bool) -> str:
    import platform

    import torch

    if gpu:
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _finish(doc: dict[str, Any], engines: dict[str, Any], args: argparse.Namespace, out: Path, title: str) -> None:
    json_path = Path(args.json) if args.json else out / "load.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1, default=str))
    print()
    print(format_table(doc["summaries"]))
    print(f"\nJSON: {json_path}")
    if not args.no_plot:
        png = Path(args.plot) if args.plot else out / "load.png"
        try:
            plot(engines, png, title=title)
            print(f"plot: {png}")
        except ImportError as e:
            print(f"no plot ({e}); pip install matplotlib", file=sys.stderr)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the bench of parsed options; returns the JSON document (also written and printed as a table)."""
    if args.endpoint:
        return _run_endpoints(args)
    import torch

    gpu = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    for key, on_gpu, on_cpu in _DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    preset = args.preset or ("llama3-8b" if gpu else "tiny")
    spec = PRESETS[preset]
    block_size = args.block_size or (16 if gpu else 32)
    w = _workload(args, (FIRST_WORD_ID, spec.vocab_size))
    page_bytes = spec.kv_bytes_per_token(spec.elem_bytes if gpu else 4) * block_size
    sizes = plan_sizes(w, block_size, page_bytes, args.device_share, args.host_share, args.disk_share)
    names = _engine_names(args)
    if sizes.host_pages < 1 and any(n.startswith("dynkv") or n == "offloading" for n in names):
        raise ValueError("--host-share=0: dynkv and offloading need a host tier; give --host-share > 0")
    if sizes.max_model_len > spec.max_position_embeddings:
        raise ValueError(f"the longest request needs {sizes.max_model_len} tokens but preset {preset} holds "
                         f"{spec.max_position_embeddings}: fewer --turns or tokens, or another --preset")
    work, out = Path(args.work_dir).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = write_model(args.model_dir or work / "models" / f"{preset}-seed{args.seed}", preset=preset, seed=args.seed)
    gib = 1 << 30
    print(f"model: {preset} at {model} ({time.perf_counter() - t0:.0f} s); {'GPU' if gpu else 'CPU'}; working set "
          f"{sizes.working_set_pages} blocks of {block_size} tokens ({sizes.working_set_pages * page_bytes / gib:.2f} "
          f"GiB); device {sizes.device_blocks} blocks, host {sizes.host_pages} pages, disk {sizes.disk_pages} pages",
          flush=True)
    eargs = engine_args(gpu, sizes, w, dict(args.engine_arg))
    disk_dir = Path(args.disk_path or work / "disk").resolve()
    base = {"model": str(model), "engine": eargs, "workload": w.__dict__, "kv_check": not args.no_kv_check}
    dynkv_base = json.loads(args.dynkv_config) if args.dynkv_config else {}
    specs: dict[str, dict[str, Any]] = {
        "plain": {**base, "name": "plain", "connector": None},
        "dynkv": {**base, "name": "dynkv", "connector": "dynkv",
                  "extra": _dynkv_extra(sizes, disk_dir, gpu, dynkv_base)},
        "offloading": {**base, "name": "offloading", "connector": "offloading",
                       "extra": {"cpu_bytes_to_use": sizes.host_pages * page_bytes}},
    }
    for vname, keys in args.dynkv_variant:
        specs[f"dynkv-{vname}"] = {**specs["dynkv"], "name": f"dynkv-{vname}",
                                   "extra": {**specs["dynkv"]["extra"], **keys}}
    doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv),
                           "device": _device(gpu), "preset": preset, "model": str(model), "workload": w.__dict__,
                           "sizes": sizes.__dict__, "engine_args": eargs, "engines": {}, "summaries": {}}
    json_path = Path(args.json) if args.json else out / "load.json"
    for name in names:
        if name == "offloading" and not gpu:
            report: dict[str, Any] = {"status": "skipped: vLLM's OffloadingConnector runs on CUDA only", "requests": []}
        else:
            if specs[name]["connector"] == "dynkv" and disk_dir.exists():
                for f in disk_dir.glob("*.pages"):  # an earlier engine's disk tier would serve this one's prompts
                    f.unlink()
            load0 = os.getloadavg()
            report = _run_engine(name, specs[name], work, out / "logs", args.engine_timeout, w.num_requests)
            report["extra"] = specs[name].get("extra")
            report["loadavg"] = [load0, os.getloadavg()]  # the host's 1/5/15-minute load before and after
        doc["engines"][name] = report
        doc["summaries"][name] = summarize(report)
        json_path.write_text(json.dumps(doc, indent=1, default=str))  # a run cut short keeps the engines it finished
    title = f"{preset} on {doc['device']}, {w.conversations}x{w.turns}, K={w.concurrency}"
    _finish(doc, doc["engines"], args, out, title)
    return doc


def _run_endpoints(args: argparse.Namespace) -> dict[str, Any]:
    from dynkv.benchmarks.load.endpoint import run_endpoints

    for key, _, on_cpu in _DEFAULTS:  # a server's size is its own: the small defaults unless given
        if getattr(args, key) is None:
            setattr(args, key, on_cpu)
    w = _workload(args, args.token_range)
    engines = run_endpoints(args.endpoint, w, model=args.model, timeout_s=args.timeout)
    out = Path(args.out).resolve()
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv), "workload": w.__dict__,
           "endpoints": {n: list(urls) for n, urls in args.endpoint}, "engines": engines,
           "summaries": {n: summarize(e) for n, e in engines.items()}}
    _finish(doc, engines, args, out, f"{w.conversations}x{w.turns}, K={w.concurrency}")
    return doc


def _workload(args: argparse.Namespace, token_range: tuple[int, int]) -> Workload:
    return Workload(conversations=args.conversations, turns=args.turns, prefix_tokens=args.prefix_tokens,
                    user_tokens=args.user_tokens, answer_tokens=args.answer_tokens, concurrency=args.concurrency,
                    seed=args.seed, token_range=tuple(token_range))


def _engine_names(args: argparse.Namespace) -> list[str]:
    names = list(args.engines)
    if args.dynkv_variant and "dynkv" not in names:
        raise ValueError("--dynkv-variant needs the dynkv engine in --engines")
    at = names.index("dynkv") + 1 if "dynkv" in names else len(names)
    return names[:at] + [f"dynkv-{n}" for n, _ in args.dynkv_variant] + names[at:]


def _engines(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in ENGINES]
    if bad or not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {', '.join(ENGINES)}")
    return out


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not JSON ({e}); "
                                         "e.g. '{\"cost_model\": false}'") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected a JSON object of dynkv config keys")
    return obj


def _dynkv_config(text: str) -> str:
    _json_object(text, "--dynkv-config")
    return text


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"--dynkv-variant {text!r}: expected NAME=JSON, e.g. "
                                         "nocost='{\"cost_model\": false}' (NAME: letters, digits, - and _)")
    return name.strip(), _json_object(rest, f"--dynkv-variant {name}:")


def _endpoint(text: str) -> tuple[str, tuple[str, ...]]:
    try:
        return parse_endpoint(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a share of the working set, e.g. 0.4") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite share >= 0")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload (defaults: GPU / CPU)")
    w.add_argument("--conversations", type=int, help="conversations (default 32 / 8)")
    w.add_argument("--turns", type=int, help="turns per conversation (default 4 / 3)")
    w.add_argument("--prefix-tokens", type=int, help="each conversation's own prefix (default 4096 / 512)")
    w.add_argument("--user-tokens", type=int, help="tokens of each user message (default 256 / 32)")
    w.add_argument("--answer-tokens", type=int, help="tokens of each answer: max_tokens with ignore_eos, and the "
                                                     "answer the history keeps (default 64 / 8)")
    w.add_argument("--concurrency", type=int, help="requests in flight at most; a conversation's next turn goes "
                                                   "out once its previous one finished (default 8 / 2)")
    w.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and order")
    c = p.add_argument_group("caches, as shares of the working set (every conversation's longest request)")
    c.add_argument("--device-share", type=_share, default=0.4, help="vLLM's device KV cache (default 0.4)")
    c.add_argument("--host-share", type=_share, default=1.25,
                   help="dynkv's host tier and the OffloadingConnector's CPU tier (default 1.25)")
    c.add_argument("--disk-share", type=_share, default=0.0, help="dynkv's disk tier (default 0: none)")
    e = p.add_argument_group("engines")
    e.add_argument("--engines", type=_engines, default=list(ENGINES),
                   help=f"comma-separated, run in this order (default {','.join(ENGINES)}; offloading: CUDA only)")
    e.add_argument("--dynkv-config", type=_dynkv_config, metavar="JSON",
                   help="kv_connector_extra_config keys of the dynkv engines, "
                        "e.g. '{\"host_admission\": \"frequency\"}'")
    e.add_argument("--dynkv-variant", type=_variant, action="append", default=[], metavar="NAME=JSON",
                   help="one more dynkv engine, dynkv-NAME, with these config keys changed, e.g. "
                        "nocost='{\"cost_model\": false}' (repeatable; run right after dynkv)")
    e.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="vLLM build to drive")
    e.add_argument("--preset", choices=sorted(PRESETS), help="model geometry (default llama3-8b on a GPU, tiny on CPU)")
    e.add_argument("--block-size", type=int, help="tokens per KV block (default 16 on a GPU, 32 on CPU)")
    e.add_argument("--engine-arg", type=engine_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM argument for every engine, VALUE as JSON or a string; repeatable")
    e.add_argument("--engine-timeout", type=float, default=3600, help="seconds per engine before it is killed")
    e.add_argument("--no-kv-check", action="store_true",
                   help="skip the per-request KV check of dynkv engines (CRC-32 of each block stored or loaded, "
                        "of its host page, and of the page stored earlier for the same prefix)")
    e.add_argument("--work-dir", default="dynkv-bench/load-work", help="model, specs and (default) the disk tier")
    e.add_argument("--model-dir", help="where the model is written (default under --work-dir; reused if there)")
    e.add_argument("--disk-path", help="directory of dynkv's disk tier (default <work-dir>/disk; emptied first)")
    s = p.add_argument_group("running servers instead of engines")
    s.add_argument("--endpoint", type=_endpoint, action="append", default=[], metavar="NAME=URL[,URL...]",
                   help="an OpenAI-compatible server root, or several that the run's requests alternate between "
                        "(turn t of conversation c to server (c+t) %% n: engines sharing KV); repeatable; the "
                        "endpoints are run one after the other")
    s.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    s.add_argument("--token-range", type=token_range_arg, default=(FIRST_WORD_ID, 1000), metavar="LO:HI",
                   help="token ids of the prompts, inside the served model's vocabulary (default 16:1000)")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="dynkv-bench/load", help="directory of load.json, load.png and logs/")
    o.add_argument("--json", help="JSON path (default <out>/load.json)")
    o.add_argument("--plot", help="PNG path (default <out>/load.png)")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG")


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dynkv bench load``; 1 when an engine failed, a request failed or a KV check failed."""
    try:
        doc = run(args)
    except ValueError as e:
        raise SystemExit(f"dynkv bench load: {e}") from None
    bad = [n for n, s in doc["summaries"].items() if not str(s["status"]).startswith(("ok", "skipped"))
           or s["errors"] or not s.get("kv", {}).get("passed", True)]
    if bad:
        print(f"failed: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dynkv bench load", description=DESCRIPTION)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
