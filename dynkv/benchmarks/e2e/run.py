"""``dynkv bench e2e``: dynkv inside real vLLM (offline API), against vLLM's own caches and offloading.

Writes a random-weight model of a named geometry (:mod:`dynkv.testing.model`;
``llama3-8b`` in bf16 on a GPU, ``tiny`` in float32 on CPU), then runs one
engine per configuration, each in its own process (:mod:`dynkv.benchmarks.e2e.engine`):

- ``vllm``: no connector. TTFT of a full recompute and of a revisit served
  from vLLM's own GPU prefix cache (the reference for greedy tokens), and
  decode tokens/s.
- ``dynkv``: :class:`dynkv.connector.DynKVConnector` with host and disk
  tiers. TTFT of revisits served from the host tier and from the disk tier,
  ``dd iflag=direct`` over the disk records that hold the prompt, and decode
  tokens/s while dynkv stores every new block.
- ``offload``: vLLM's ``OffloadingConnector`` (CPU tier of the same
  capacity as dynkv's host tier; CUDA only).

Each engine also measures the next turn of a conversation: the cached prompt
followed by ``--turn-tokens`` new tokens, served from vLLM's prefix cache,
dynkv's host tier or OffloadingConnector's CPU tier.

Engines are held to each other's bits only where their kernels compute
alike. A GPU engine runs ``torch.compile``'s Inductor kernels, and Inductor
(with vLLM's max-autotune and coordinate-descent tuning on) picks some of
them by timing candidates on the device: the block sizes and warps of
reductions such as RMSNorm, which set their order of summation, combo
kernels, matmul templates. Two compiles of one model can then differ in the
last bits of bf16 from layer 0 on. vLLM compiles once per hash of its config,
and that hash counts whether a KV connector is set
(``KVTransferConfig.compute_hash`` hashes no fields, so not which one): the
engine without a connector compiles and tunes its own kernels, the connector
engines share another set. By default (``--kernels tuned``, what vLLM users
run) the timings are measured this way, and the KV and greedy tokens of one
engine are shown beside another's but not held to them; ``--kernels eager``
runs every engine eager (kernels chosen by shape alone, TTFTs of eager
engines), and then they are held. Inductor's deterministic mode would
choose without timing while compiling, but with vLLM 0.26's max-autotune it
refuses to start (it forbids the benchmarking that autotuning does).

Every path also generates ``--check-tokens`` greedy tokens with top-2
logprobs, compared with the reference. Random weights put near-ties in the
top two logits (in bf16, an exact tie flips with any change of summation
order, vLLM's own prefix cache included), so the ``vllm`` engine first
recomputes ``--prompt-candidates`` prompts per length and the run measures
the one whose smallest top-2 gap is largest. Output: a table, JSON, a PNG, and one
log per engine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dynkv.benchmarks.e2e.probe import parse_variant
from dynkv.benchmarks.e2e.report import format_table, plot, summarize
from dynkv.benchmarks.serve import engine_arg
from dynkv.testing.model import FIRST_WORD_ID, PRESETS, write_model

__all__ = ["DESCRIPTION", "ENGINES", "add_arguments", "eager_kernels", "engine_args", "plan", "run",
           "run_from_args"]

DESCRIPTION = (
    "TTFT of recompute, vLLM's GPU prefix cache, dynkv's host and disk tiers and vLLM's OffloadingConnector "
    "for long prompts, decode tokens/s with dynkv storing, greedy tokens of every path against vLLM's own "
    "prefix-cache hit; offline vLLM API, random-weight model. Table, JSON, PNG."
)
ENGINES = ("vllm", "dynkv", "offload")
# (option, default on a GPU, default on CPU): the CPU build runs a small model on few cores.
_DEFAULTS = (("lengths", [8192, 32768], [512, 1024]), ("decode_requests", 32, 4), ("decode_prompt", 1024, 128),
             ("decode_tokens", 256, 32), ("prompt_candidates", 4, 2), ("turn_tokens", 512, 64))
_RECORD_HEADER = 4096  # a disk-tier record is a 4 KiB header and the page (dynkv.tiers.diskfile)


def plan(preset: str, lengths: list[int], block_size: int, elem_bytes: int, check_tokens: int,
         turn_tokens: int = 0) -> dict[str, int]:
    """Sizes of the run: tiers, fillers, disk I/O threads, the engine's max_model_len.

    dynkv's host tier (and the OffloadingConnector's CPU tier, the same size)
    holds the longest prompt with a margin; pushing a prompt out of it takes
    fillers worth one tier plus a few pages. 16 disk I/O threads: the disk
    tier's best on the H200 host (``dynkv bench disk``: 3.5 GB/s reads, more
    than one dd stream); disk writes in flight are bounded by a quarter of the
    host tier (:mod:`dynkv.leader`), enough for a prefill chunk.
    """
    spec = PRESETS[preset]
    page_bytes = spec.kv_bytes_per_token(elem_bytes) * block_size
    max_pages = math.ceil(max(lengths) / block_size)
    host_pages = max_pages + max(16, max_pages // 20)
    max_model_len = math.ceil((max(lengths) + max(check_tokens, turn_tokens + 1) + block_size) / block_size) * block_size
    # Every prompt and the warm-up can reach the disk (a second sighting admits them), twice over for slack.
    disk_pages = 2 * (sum(math.ceil(n / block_size) for n in lengths) + math.ceil(min(lengths) / block_size))
    chunk = min(8192, max_model_len - block_size) // block_size * block_size
    return {"block_size": block_size, "page_bytes": page_bytes, "max_model_len": max_model_len,
            "host_pages": host_pages, "disk_pages": disk_pages,
            "disk_bytes": disk_pages * (_RECORD_HEADER + page_bytes),
            "io_threads": 16,
            "flush_tokens": (host_pages + 16) * block_size, "flush_chunk": chunk}


def engine_args(gpu: bool, sizes: dict[str, int], max_seqs: int, extra: dict[str, Any]) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments shared by every engine of the run (``extra`` wins)."""
    args: dict[str, Any] = {"block_size": sizes["block_size"], "max_model_len": sizes["max_model_len"],
                            "enable_prefix_caching": True, "seed": 0, "max_num_seqs": max_seqs,
                            # Request metrics (queued/scheduled/first-token times) need stats on.
                            "disable_log_stats": False}
    if gpu:
        args["dtype"] = "bfloat16"
    else:
        # vLLM's CPU build: float32, eager (no torch.compile warm-up on small
        # machines) and an explicit KV size (no memory profiling).
        blocks = 4 * sizes["max_model_len"] // sizes["block_size"] + max_seqs * 8
        args.update(dtype="float32", enforce_eager=True, max_num_batched_tokens=max(2048, sizes["max_model_len"]),
                    kv_cache_memory_bytes=blocks * sizes["page_bytes"])
    args.update(extra)
    return args


def eager_kernels(eargs: dict[str, Any]) -> dict[str, Any]:
    """``eargs`` for ``--kernels eager``: every engine runs eager, its kernels chosen by shape alone.

    An ``enforce_eager`` the user gave (``--engine-arg``) is kept: the
    engines then report what they ran, and the table says whether their
    kernels were alike.
    """
    return eargs if "enforce_eager" in eargs else {**eargs, "enforce_eager": True}


def _prompts(seed: int, lengths: list[int], vocab: int, decode: dict[str, int] | None,
             candidates: int = 1) -> dict[str, Any]:
    """Prompts of the run: ``str(length)`` is the first of ``candidates[str(length)]``."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(n: int) -> list[int]:
        return rng.integers(FIRST_WORD_ID, vocab, size=n).tolist()

    cands = {str(n): [draw(n) for _ in range(candidates)] for n in lengths}
    out: dict[str, Any] = {"warmup": draw(min(lengths)), **{n: c[0] for n, c in cands.items()}}
    if candidates > 1:
        out["candidates"] = cands
    if decode:
        out["decode"] = [[draw(decode["prompt"]) for _ in range(decode["requests"])] for _ in range(decode["repeat"])]
    return out


def _run_engine(name: str, spec: dict[str, Any], work: Path, log_dir: Path, timeout_s: float) -> dict[str, Any]:
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    print(f"[{name}] starting vLLM (log: {log_path})", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "dynkv.benchmarks.e2e.engine", str(spec_path), str(out_path)],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
            status = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"killed after {timeout_s:.0f} s"
    report = json.loads(out_path.read_text()) if out_path.is_file() else {"lengths": {}, "errors": []}
    report["status"], report["wall_s"] = status, time.perf_counter() - t0
    if status != "ok":
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print(f"[{name}] {status}; last lines of its log:\n" + "\n".join(tail), file=sys.stderr, flush=True)
    for err in report.get("errors", []):
        print(f"[{name}] error: {err}", file=sys.stderr, flush=True)
    print(f"[{name}] {status} in {report['wall_s']:.0f} s", flush=True)
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the bench of parsed options; returns the JSON report (also written and printed as a table)."""
    import torch

    gpu = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    for key, on_gpu, on_cpu in _DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    preset = args.preset or ("llama3-8b" if gpu else "tiny")
    spec = PRESETS[preset]
    block_size = args.block_size or (16 if gpu else 32)
    sizes = plan(preset, args.lengths, block_size, spec.elem_bytes if gpu else 4, args.check_tokens, args.turn_tokens)
    work = Path(args.work_dir).resolve()
    out = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = write_model(args.model_dir or work / "models" / f"{preset}-seed{args.seed}", preset=preset, seed=args.seed)
    model_s = time.perf_counter() - t0
    print(f"model: {preset} ({spec.num_layers} layers, {spec.num_kv_heads} KV heads of {spec.head_dim}) at {model} "
          f"({model_s:.0f} s); {'GPU' if gpu else 'CPU'}, {block_size}-token blocks, pages of "
          f"{sizes['page_bytes'] / 2**20:.2f} MiB", flush=True)
    decode = None if args.decode_requests <= 0 else {"requests": args.decode_requests, "prompt": args.decode_prompt,
                                                     "tokens": args.decode_tokens, "repeat": args.decode_repeat}
    prompts = _prompts(args.seed, args.lengths, spec.vocab_size, decode, args.prompt_candidates)
    candidates = prompts.pop("candidates", None)
    eargs = engine_args(gpu, sizes, max(16, args.decode_requests), dict(args.engine_arg))
    if args.kernels == "eager":
        eargs = eager_kernels(eargs)
    disk_dir = Path(args.disk_path or work / "disk").resolve()
    base = {"model": str(model), "engine": eargs, "lengths": args.lengths, "repeat": args.repeat,
            "check_tokens": args.check_tokens, "seed": args.seed, "prompts": prompts, "profile": args.profile,
            "trace_dir": str(out / "logs") if args.trace else None,
            "turn_tokens": args.turn_tokens, "vocab": [FIRST_WORD_ID, spec.vocab_size],
            "verify_kv": not args.no_kv_check}
    specs = {
        "vllm": {**base, "name": "vllm", "connector": None, "decode": decode, "candidates": candidates},
        "dynkv": {**base, "name": "dynkv", "connector": "dynkv", "decode": decode, "dd_repeat": args.repeat,
                  "variants": dict(args.variant), "disk_probe": args.disk_probe,
                  "extra": {"host_pages": sizes["host_pages"], "disk_gb": math.ceil(sizes["disk_bytes"] / 2**30 * 1e3)
                            / 1e3, "disk_paths": [str(disk_dir)], "io_threads": sizes["io_threads"],
                            # each path is measured as such: the disk path reads the disk even where recompute wins,
                            # and the filler pass evicts the prompt from the host tier (LRU; auto admission would
                            # learn the prompt's return and keep it there)
                            "cost_model": False, "host_admission": "all"},
                  "flush": {"tokens": sizes["flush_tokens"], "chunk": sizes["flush_chunk"],
                            "token_lo": FIRST_WORD_ID, "token_hi": spec.vocab_size}},
        "offload": {**base, "name": "offload", "connector": "offload", "decode": None,
                    "extra": {"cpu_bytes_to_use": sizes["host_pages"] * sizes["page_bytes"]}},
    }
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / "e2e.json"
    head = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv), "device": _device(gpu),
            "preset": preset, "model": str(model), "model_write_s": model_s, "sizes": sizes, "engine_args": eargs}
    reports: dict[str, Any] = {}
    for name in args.engines:
        if name == "offload" and not gpu:
            reports[name] = {"status": "skipped: vLLM's OffloadingConnector runs on CUDA only", "lengths": {}}
        else:
            if name == "dynkv" and disk_dir.exists():
                # A disk tier left by an earlier run would serve this run's prompts (same model, same keys).
                for f in disk_dir.glob("*.pages"):
                    f.unlink()
            reports[name] = _run_engine(name, specs[name], work, out / "logs", args.engine_timeout)
        if name == "vllm" and candidates:
            # Every later engine measures the prompts the reference chose (its specs share this dict).
            for n, i in reports[name].get("chosen", {}).items():
                prompts[n] = candidates[n][i]
        # Written after every engine: a run cut short keeps the engines it finished.
        doc = _document(head, reports, args.lengths)
        json_path.write_text(json.dumps(doc, indent=1, default=str))
    summary = doc["summary"]
    table = format_table(summary)
    print()
    print(table)
    print(f"\nJSON: {json_path}")
    if not args.no_plot:
        png = Path(args.plot) if args.plot else out / "e2e.png"
        try:
            plot(summary, png, title=f"{preset} on {doc['device']}")
            print(f"plot: {png}")
        except ImportError as e:
            print(f"no plot ({e}); pip install matplotlib", file=sys.stderr)
    return doc


def _document(head: dict[str, Any], reports: dict[str, Any], lengths: list[int]) -> dict[str, Any]:
    return {**head, "summary": summarize(reports, lengths),
            "engines": {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in reports.items()},
            "dynkv_samples": (reports.get("dynkv") or {}).get("samples")}


def _device(gpu: bool) -> str:
    import platform

    import torch

    if gpu:
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated token counts, e.g. 8192,32768") from None
    if not out or min(out) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected prompt lengths of at least 2 tokens")
    return out


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    try:
        return parse_variant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _engines(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in ENGINES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {', '.join(ENGINES)}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="model geometry (default: llama3-8b on a GPU, tiny on CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="vLLM build to drive")
    p.add_argument("--lengths", type=_ints, help="prompt lengths in tokens (default 8192,32768 on a GPU, 512,1024 on CPU)")
    p.add_argument("--repeat", type=int, default=3, help="TTFT runs per path and length (median; default 3)")
    p.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared per path (default 32)")
    p.add_argument("--decode-requests", type=int,
                   help="concurrent requests of the decode run (0: none; default 32 on a GPU, 4 on CPU)")
    p.add_argument("--decode-prompt", type=int, help="prompt tokens of each decode request (default 1024 / 128)")
    p.add_argument("--decode-tokens", type=int, help="output tokens of each decode request (default 256 / 32)")
    p.add_argument("--decode-repeat", type=int, default=2, help="decode runs per engine (median)")
    p.add_argument("--turn-tokens", type=int,
                   help="new tokens of the next-turn paths: the cached prompt plus this many fresh tokens "
                        "(0: none; default 512 on a GPU, 64 on CPU)")
    p.add_argument("--engines", type=_engines, default=list(ENGINES), help="engines to run (default all)")
    p.add_argument("--block-size", type=int, help="tokens per KV block (default 16 on a GPU, 32 on CPU)")
    p.add_argument("--engine-arg", type=engine_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM argument for every engine, VALUE as JSON or a string "
                        "(e.g. attention_backend=TRITON_ATTN); repeatable")
    p.add_argument("--engine-timeout", type=float, default=1800, help="seconds per engine before it is killed")
    p.add_argument("--profile", action="store_true",
                   help="one extra dynkv host and disk hit per length under cProfile (text in the JSON)")
    p.add_argument("--variant", type=_variant, action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="dynkv's host and disk hits of the first length again with copy knobs changed in place: "
                        "priority (load stream), ctas, threads and smem_kib (H2D kernel: CTAs, threads per CTA, shared memory "
                        "reserved per CTA), read_chunk, io_threads and disk_wait_ms (disk), "
                        "store_launch_kib (stores' launch size), early, sched and last_block (0/1: the connector's "
                        "early_loads, loads launched by the scheduler, load_last_block), paths (host, disk, host+disk, or decode: a decode "
                        "run with fresh prompts after each default one); "
                        "e.g. normal:priority=0 (repeatable; see dynkv.benchmarks.e2e.probe)")
    p.add_argument("--trace", action="store_true",
                   help="one hit per path of the first length under torch.profiler: Chrome traces in <out>/logs, "
                        "summaries (copy and compute streams) in the table")
    p.add_argument("--disk-probe", action="store_true",
                   help="after the disk-tier hits of the first length: the same records read by the disk tier with "
                        "no request running, into anonymous and pinned scratch memory and into the host-tier pages "
                        "that hold them, and while the idle engine steps (GB/s, with the device's, CPUs' and "
                        "threads' activity, in the JSON and the table)")
    p.add_argument("--kernels", choices=("tuned", "eager"), default="tuned",
                   help="tuned (default, vLLM's own): engines compile apart and Inductor picks some kernels by timing "
                        "them, so engines' KV and greedy tokens may differ in the last bits: shown, not held to each "
                        "other's; eager: every engine runs eager (slower steps) and they are held")
    p.add_argument("--no-kv-check", action="store_true",
                   help="skip the KV check: by default the first request of each path has a CRC-32 taken of each "
                        "of its KV blocks on every rank (and of the dynkv pages it stored or loaded), compared "
                        "with vLLM's own KV of the prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
    p.add_argument("--prompt-candidates", type=int,
                   help="prompts per length the vllm engine recomputes to pick the one with the largest smallest "
                        "top-2 logprob gap (default 4 on a GPU, 2 on CPU; 1: no choice)")
    p.add_argument("--work-dir", default="dynkv-bench/e2e-work", help="model, specs and (default) disk tier")
    p.add_argument("--model-dir", help="where the model is written (default under --work-dir; reused if there)")
    p.add_argument("--disk-path", help="directory of dynkv's disk tier (default <work-dir>/disk; emptied first)")
    p.add_argument("--out", default="dynkv-bench/e2e", help="directory of e2e.json, e2e.png and logs/")
    p.add_argument("--json", help="JSON path (default <out>/e2e.json)")
    p.add_argument("--plot", help="PNG path (default <out>/e2e.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def run_from_args(args: argparse.Namespace) -> int:
    if args.repeat < 1 or args.check_tokens < 1 or (args.prompt_candidates is not None and args.prompt_candidates < 1):
        raise SystemExit("--repeat, --check-tokens and --prompt-candidates must be at least 1")
    doc = run(args)
    failed = [k for k, v in doc["engines"].items() if not str(v.get("status", "")).startswith(("ok", "skipped"))]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dynkv bench e2e", description=DESCRIPTION)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
