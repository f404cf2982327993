"""Results of ``dynkv bench e2e``: per-path summaries, greedy comparisons, targets, table and plot.

Works on the engines' JSON reports (:mod:`dynkv.benchmarks.e2e.engine`), so it is shared
by the bench and its tests. The reference for greedy tokens is vLLM's own
prefix-cache hit (the ``device`` path of the engine without a connector): a
cached prefix is what every other path also serves, so the tokens must match
it exactly; a full recompute may differ in the last bits.

Bit for bit, only like computations can be held to that: the same kernels
(eager in every engine, or compiled without timing in every engine, see
:mod:`dynkv.benchmarks.e2e.run`; ``summary["kernels"]`` says whether they
were; where they were not, every path's tokens are shown with that reason)
and a first step of the same shape. vLLM's prefix-cache hit computes
the prompt's last block (its cache never serves the token to sample from);
a connector that serves every block (vLLM's OffloadingConnector) leaves one
token to compute, and its logits come from matrix products of another
shape, whose sums may round otherwise. Such a path's tokens are shown with
the reason (``greedy["not_held"]``) and held to no target.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynkv.benchmarks.e2e.kv import compare

__all__ = ["PATHS", "TARGETS", "format_table", "plot", "summarize"]

# (engine, path in that engine's report, label), in table order.
PATHS = (
    ("vllm", "recompute", "recompute (vLLM, no cache)"),
    ("vllm", "device", "vLLM prefix cache (device)"),
    ("dynkv", "host", "dynkv host tier"),
    ("dynkv", "disk", "dynkv disk tier"),
    ("offload", "offload", "vLLM OffloadingConnector (CPU)"),
    ("dynkv", "miss", "dynkv miss (recompute + store)"),
    ("offload", "miss", "OffloadingConnector miss"),
    ("vllm", "turn_device", "next turn: vLLM prefix cache"),
    ("dynkv", "turn_host", "next turn: dynkv host tier"),
    ("offload", "turn_offload", "next turn: OffloadingConnector"),
)
TARGETS = {
    "host_ttft_s": 0.045,  # host-tier hit TTFT of an 8k prompt
    "host_vs_offload": 0.7,  # ... and at most this fraction of OffloadingConnector's
    "disk_vs_dd": 1.3,  # disk-tier hit TTFT within this factor of dd reading the same bytes
    "decode_ratio": 0.98,  # decode tokens/s with dynkv storing, relative to plain vLLM
}
_SPLIT = ("queue_s", "wait_s", "forward_s", "tail_s", "h2d_s", "disk_read_s", "launch_after_scheduled_s")


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _path_summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [r["ttft_s"] for r in recs]
    out: dict[str, Any] = {"n": len(recs), "ttft_s": _median(ttft), "min_s": min(ttft, default=None),
                           "max_s": max(ttft, default=None), "all_s": ttft,
                           "cached_tokens": [r.get("cached_tokens") for r in recs],
                           "first_tokens": [r.get("token") for r in recs]}
    for k in _SPLIT:
        out[k] = _median([r[k] for r in recs if r.get(k) is not None])
    launches = [r["launch_ms"] for r in recs if r.get("launch_ms")]
    if launches:  # the CPU time of the sync-load launches (in-process worker), and where they were made
        out["launch_ms"] = _median([sum(x.values()) for x in launches])
        out["launch_sites"] = sorted({k for x in launches for k in x})
    batches = [r for r in recs if r.get("disk_batches")]
    if batches:  # the last disk hit's read batches, and what the host did during it
        out["disk_batches"] = batches[-1]["disk_batches"]
        out["host"] = batches[-1].get("host")
        out["steps"] = batches[-1].get("steps")
    hits = [r["hits"] for r in recs if "hits" in r]
    if hits:
        out["hits"] = {t: [h[t] for h in hits] for t in hits[0]}
    return out


def _compare(check: dict[str, Any] | None, ref: dict[str, Any] | None) -> dict[str, Any]:
    if not check or not ref:
        return {"identical": None}
    a, b = check["tokens"], ref["tokens"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(check["logprobs"], ref["logprobs"])]
    out = {"identical": first is None, "first_difference": first, "max_logprob_diff": max(diffs, default=0.0)}
    if first is not None and first < len(ref.get("top2_gaps", [])):
        out["reference_gap_there"] = ref["top2_gaps"][first]
    return out


def _unlike_step(check: dict[str, Any] | None, ref: dict[str, Any] | None, length: int) -> str | None:
    """Why a path's greedy tokens need not equal the reference's bit for bit: its first step computed another
    number of prompt tokens (None: the same number, or unknown)."""
    a, b = (check or {}).get("cached_tokens"), (ref or {}).get("cached_tokens")
    if a is None or b is None or a == b:
        return None
    n = max(1, length - a)
    return f"its first step computes {n} prompt token{'s' * (n != 1)}, vLLM's prefix-cache hit {max(1, length - b)}"


def _kernels(reports: Mapping[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Whether the engines' kernels compute alike (:func:`dynkv.benchmarks.e2e.engine.kernels` of each): eager in
    every engine, or compiled in Inductor's deterministic mode in every engine."""
    engines = {k: r["kernels"] for k, r in reports.items() if r and r.get("kernels")}
    kinds = {(k["compiled"], k["deterministic"]) for k in engines.values()}
    alike = kinds in ({(False, False)}, {(True, True)})
    return {"alike": alike if engines else None, "engines": engines}


def summarize(reports: Mapping[str, dict[str, Any] | None], lengths: list[int]) -> dict[str, Any]:
    """Per length and path: TTFT statistics, the split of the median, greedy comparison; decode; targets."""
    out: dict[str, Any] = {"lengths": {}, "targets": []}
    out["kernels"] = _kernels(reports)
    unalike = None if out["kernels"]["alike"] is not False else "the engines' kernels were not alike"
    for length in lengths:
        key = str(length)
        ref = ((reports.get("vllm") or {}).get("lengths", {}).get(key, {}).get("checks") or {}).get("device")
        rows: dict[str, Any] = {}
        for engine, path, label in PATHS:
            rec = ((reports.get(engine) or {}).get("lengths") or {}).get(key, {})
            if not rec.get(path):
                continue
            row = _path_summary(rec[path])
            row["label"] = label
            checks = rec.get("checks") or {}
            if engine == "vllm" and path == "device":
                row["greedy"] = {"identical": None, "reference": True}
            else:
                row["greedy"] = {"identical": None} if path == "miss" else _compare(checks.get(path), ref)
                why = unalike or _unlike_step(checks.get(path), ref, length)
                if why and row["greedy"]["identical"] is not None:
                    row["greedy"]["not_held"] = why
            recompute = ((reports.get("vllm") or {}).get("lengths", {}).get(key, {}).get("checks") or {}).get("recompute")
            if path != "miss" and not path.startswith("turn_"):
                row["greedy_vs_recompute"] = _compare(checks.get(path), recompute)
            if ref and row["first_tokens"] and not path.startswith("turn_"):
                row["first_token_matches"] = all(t == ref["tokens"][0] for t in row["first_tokens"])
            rows[f"{engine}/{path}"] = row
        dyn = ((reports.get("dynkv") or {}).get("lengths") or {}).get(key, {})
        for name, recs in dyn.items():
            if "@" in name and isinstance(recs, list) and recs:  # a variant of dynkv's copy knobs (e2e_probe)
                path, variant = name.split("@", 1)
                rows[f"dynkv/{name}"] = {**_path_summary(recs), "label": f"dynkv {path} tier, variant {variant}",
                                         "greedy": {"identical": None}}
        traces = {}
        for engine, rep in reports.items():
            for name, r in (((rep or {}).get("lengths") or {}).get(key) or {}).items():
                if name.endswith("_traced") and r and r.get("trace"):
                    traces[f"{engine}/{name[: -len('_traced')]}"] = {"ttft_s": r["ttft_s"], **r["trace"]}
        dd = dyn.get("dd")
        gaps = (ref or {}).get("top2_gaps") or []
        choice = ((reports.get("vllm") or {}).get("lengths") or {}).get(key, {}).get("prompt_choice")
        out["lengths"][key] = {"paths": rows, "dd": dd, "dd_after_fillers": dyn.get("dd_after_fillers"),
                               "traces": traces, "disk_probe": dyn.get("disk_probe"), "kv": _kv(reports, key),
                               "top2_gap_min": min(gaps, default=None), "top2_gap_median": _median(gaps),
                               "prompt_choice": choice}
    out["decode"] = _decode(reports)
    out["targets"] = _targets(out, lengths)
    return out


# (engine, path, reference path in the vllm engine): a full prefill against vLLM's full prefill, a hit against
# vLLM's prefix-cache hit (both compute the prompt's last block in a step of their own).
_KV_PAIRS = (("vllm", "device", "recompute"), ("dynkv", "miss", "recompute"), ("dynkv", "host", "device"),
             ("dynkv", "disk", "device"), ("offload", "miss", "recompute"))
_KV_REFERENCE = {"recompute": "full prefill", "device": "prefix-cache hit"}


def _kv(reports: Mapping[str, dict[str, Any] | None], key: str) -> dict[str, Any]:
    """The KV checks of one length (:func:`dynkv.benchmarks.e2e.kv.compare`), per ``engine/path``."""
    def kv(engine: str) -> dict[str, Any]:
        return ((((reports.get(engine) or {}).get("lengths") or {}).get(key) or {}).get("kv")) or {}

    ref = kv("vllm")
    out: dict[str, Any] = {}
    for engine, path, ref_path in _KV_PAIRS:
        d = kv(engine).get(path)
        if d:
            try:
                out[f"{engine}/{path}"] = {**compare(d, ref.get(ref_path)), "reference": ref_path}
            except ValueError as e:
                out[f"{engine}/{path}"] = {"error": str(e)}
    return out


def _kv_lines(kv: dict[str, Any]) -> list[str]:
    words = {"stored": "pages stored = blocks computed", "loaded": "blocks loaded = pages",
             "vs_reference": "blocks = vLLM's"}
    lines = []
    for name, c in kv.items():
        if c.get("error"):
            lines.append(f"KV {name}: {c['error']}")
            continue
        parts = []
        for k, what in words.items():
            r = c.get(k)
            if r is None:
                continue
            ref = f" {_KV_REFERENCE[c['reference']]}" if k == "vs_reference" else ""
            diff = "" if r["first_differing"] is None else f", first differing block {r['first_differing']}"
            parts.append(f"{what}{ref} {r['equal']} of {r['of']}{diff}")
        if parts:
            lines.append(f"KV {name} (CRC-32 per block, every rank): " + "; ".join(parts))
    return lines


def _decode(reports: Mapping[str, dict[str, Any] | None]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for engine in ("vllm", "dynkv"):
        recs = (reports.get(engine) or {}).get("decode") or []
        rates = [r["decode_tok_s"] for r in recs if r.get("decode_tok_s")]
        d[engine] = {"tok_s": _median(rates), "all": rates, "d2h_bytes": [r.get("d2h_bytes") for r in recs]}
    plain, ours = d["vllm"]["tok_s"], d["dynkv"]["tok_s"]
    d["ratio"] = ours / plain if plain and ours else None
    variants = {}
    for key, recs in (reports.get("dynkv") or {}).items():
        if key.startswith("decode@"):
            rate = _median([r["decode_tok_s"] for r in recs if r.get("decode_tok_s")])
            variants[key.removeprefix("decode@")] = {"tok_s": rate, "ratio": rate / plain if plain and rate else None}
    if variants:
        d["variants"] = variants
    return d


def _targets(s: dict[str, Any], lengths: list[int]) -> list[dict[str, Any]]:
    t: list[dict[str, Any]] = []
    for length in lengths:
        L = s["lengths"][str(length)]
        paths = L["paths"]
        host, disk, off = (paths.get(k, {}).get("ttft_s") for k in ("dynkv/host", "dynkv/disk", "offload/offload"))
        if length == 8192 and host is not None:
            t.append({"target": "host-tier hit TTFT, 8k prompt", "limit": f"<= {TARGETS['host_ttft_s'] * 1e3:.0f} ms",
                      "measured": f"{host * 1e3:.1f} ms", "met": host <= TARGETS["host_ttft_s"]})
        if host is not None and off:
            t.append({"target": f"host-tier hit TTFT vs OffloadingConnector, {length} tokens",
                      "limit": f"<= {TARGETS['host_vs_offload']}x", "measured": f"{host / off:.2f}x",
                      "met": host / off <= TARGETS["host_vs_offload"]})
        # dd back to back, and dd right after the filler pass each disk-tier hit follows (the hit's state).
        for which, label in (("dd", ""), ("dd_after_fillers", ", dd after the same filler pass")):
            dd = L.get(which) or {}
            if disk is not None and dd.get("median_s"):
                r = disk / dd["median_s"]
                t.append({"target": f"disk-tier hit TTFT vs dd O_DIRECT of the same bytes{label}, {length} tokens",
                          "limit": f"<= {TARGETS['disk_vs_dd']}x", "measured": f"{r:.2f}x ({disk * 1e3:.0f} ms vs "
                          f"{dd['median_s'] * 1e3:.0f} ms)", "met": r <= TARGETS["disk_vs_dd"]})
        for key, row in paths.items():
            g = row.get("greedy", {})
            # Recompute is not a cached path, and a first step of another shape is not the same computation:
            # their tokens are shown, not held to the target.
            if g.get("identical") is not None and key != "vllm/recompute" and not g.get("not_held"):
                t.append({"target": f"greedy tokens = vLLM prefix-cache hit: {row['label']}, {length} tokens",
                          "limit": "identical", "measured": "identical" if g["identical"] else
                          f"differ from token {g['first_difference']}", "met": bool(g["identical"])})
        for name, c in (L.get("kv") or {}).items():
            for kind, what in (("stored", "pages stored = blocks computed"), ("loaded", "blocks loaded = pages")):
                k = c.get(kind)
                if name.startswith("dynkv/") and k:
                    t.append({"target": f"KV check, {name.removeprefix('dynkv/')}: {what}, {length} tokens",
                              "limit": "every block", "measured": f"{k['equal']} of {k['of']}",
                              "met": k["equal"] == k["of"]})
    r = s["decode"]["ratio"]
    if r is not None:
        t.append({"target": "decode tokens/s with dynkv storing vs plain vLLM",
                  "limit": f">= {TARGETS['decode_ratio']:.0%}", "measured": f"{r:.1%}", "met": r >= TARGETS["decode_ratio"]})
    return t


def _kernels_line(k: dict[str, Any]) -> str:
    engines = k.get("engines") or {}
    if not engines:
        return "kernels: unknown (no engine said)"
    if k["alike"]:
        compiled = next(iter(engines.values()))["compiled"]
        return ("kernels: compiled in every engine in Inductor's deterministic mode (chosen without timing)"
                if compiled else "kernels: eager in every engine")
    each = "; ".join(f"{name}: " + ("eager" if not e["compiled"] else "compiled, deterministic" if e["deterministic"]
                                    else "compiled, tuned by timing") for name, e in engines.items())
    return (f"kernels: NOT alike ({each}): engines' KV and greedy tokens can differ for that alone, so they are "
            "shown, not held to each other's (--kernels eager holds them)")


def _same(g: dict[str, Any] | None) -> str:
    if not g or g.get("identical") is None:
        return "-"
    return "yes" if g["identical"] else f"no (from token {g['first_difference']})"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.1f}"


def format_table(s: dict[str, Any]) -> str:
    """Markdown tables: TTFT per path and length, dd, decode, top-2 gaps, targets."""
    lines: list[str] = [_kernels_line(s.get("kernels") or {}), ""]
    for length, L in s["lengths"].items():
        lines += [f"### {length}-token prompt", "",
                  "| path | TTFT ms (median) | min-max | queue | wait/load | forward | tail | dynkv disk read | "
                  "dynkv H2D | cached tokens | greedy = prefix-cache hit | = recompute |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in L["paths"].values():
            g = row["greedy"]
            same = _same(g)
            if g.get("reference"):
                same = "reference"
            elif g.get("not_held"):
                same += f" (not held: {g['not_held']})"
            cached = sorted({c for c in row["cached_tokens"] if c is not None})
            lines.append(f"| {row['label']} | {_ms(row['ttft_s'])} | {_ms(row['min_s'])}-{_ms(row['max_s'])} | "
                         f"{_ms(row['queue_s'])} | {_ms(row['wait_s'])} | {_ms(row['forward_s'])} | "
                         f"{_ms(row['tail_s'])} | {_ms(row['disk_read_s']) if row.get('disk_read_s') else '-'} | "
                         f"{_ms(row['h2d_s']) if row['h2d_s'] else '-'} | "
                         f"{','.join(map(str, cached)) or '-'} | {same} | {_same(row.get('greedy_vs_recompute'))} |")
        launched = [f"{row['label']} {row['launch_ms']:.2f} ms ({', '.join(row['launch_sites'])}"
                    + (f", began {_ms(row['launch_after_scheduled_s'])} ms after vLLM scheduled the request"
                       if row.get("launch_after_scheduled_s") is not None else "") + ")"
                    for row in L["paths"].values() if row.get("launch_ms") is not None]
        if launched:
            lines.append("\nCPU time of dynkv's sync-load launches per hit (median; where launched): "
                         + "; ".join(launched))
        dd = L.get("dd") or {}
        if dd.get("median_s"):
            lines.append(f"\ndd iflag=direct over the same disk records: {dd['median_s'] * 1e3:.1f} ms for "
                         f"{dd['bytes'] / 2**20:.0f} MiB ({dd['gbps']:.2f} GB/s; {dd['pages']} of "
                         f"{dd['pages_wanted']} pages on disk)")
        elif dd.get("error"):
            lines.append(f"\ndd: {dd['error']}")
        after = L.get("dd_after_fillers") or {}
        if after.get("median_s"):
            lines.append(f"dd right after the filler pass (as before each disk hit): {after['median_s'] * 1e3:.1f} ms "
                         f"({after['gbps']:.2f} GB/s; runs {', '.join(f'{x * 1e3:.0f}' for x in after['seconds'])} ms)")
        if L["top2_gap_min"] is not None:
            lines.append(f"\nreference top-2 logprob gap: min {L['top2_gap_min']:.3f}, median "
                         f"{L['top2_gap_median']:.3f} nats")
        turn = [L["paths"].get(k, {}).get("ttft_s") for k in ("dynkv/turn_host", "offload/turn_offload")]
        if all(turn):
            lines.append(f"\nnext turn (prompt + new tokens): dynkv host tier {turn[0] * 1e3:.1f} ms, "
                         f"OffloadingConnector {turn[1] * 1e3:.1f} ms ({turn[0] / turn[1]:.2f}x)")
        probe = L.get("disk_probe")
        if probe and not probe.get("error"):
            rates = ", ".join(f"{k} {v:.2f}" for k, v in probe.items() if isinstance(v, float))
            lines.append(f"disk tier's batched reads of the same records, no request running (GB/s): {rates}")
            for label, host in (probe.get("host") or {}).items():
                lines.append(_host_line(f"probe, {label}", host))
        lines += _kv_lines(L.get("kv") or {})
        for name, t in (L.get("traces") or {}).items():
            lines.append(_trace_line(name, t))
            for other in t.get("other_ranks") or ():
                lines.append(_trace_line(f"{name}, rank {other['rank']}", {"ttft_s": t["ttft_s"], **other}))
        disk = L["paths"].get("dynkv/disk")
        if disk and disk.get("disk_batches"):
            lines.append(_batches_line(disk["disk_batches"]))
            lines.append(_host_line(f"the last disk hit ({disk.get('steps')} engine steps)", disk.get("host")))
        if dd.get("host"):
            lines.append(_host_line("dd", dd["host"]))
        if after.get("host"):
            lines.append(_host_line("dd after the filler pass", after["host"]))
        choice = L.get("prompt_choice")
        if choice:
            gaps = ", ".join("failed" if g is None else f"{g:.3f}" for g in choice["min_top2_gaps"])
            lines.append(f"prompt: candidate {choice['chosen']} of {len(choice['min_top2_gaps'])} (smallest top-2 gap "
                         f"under recompute per candidate: {gaps})")
        lines.append("")
    d = s["decode"]
    if d["vllm"]["tok_s"] or d["dynkv"]["tok_s"]:
        plain, ours = (f"{x:.0f}" if x else "n/a" for x in (d["vllm"]["tok_s"], d["dynkv"]["tok_s"]))
        lines += ["### decode", "", f"plain vLLM {plain} tok/s, with dynkv storing {ours} tok/s"
                  + (f" ({d['ratio']:.1%})" if d["ratio"] else "")]
        for name, v in (d.get("variants") or {}).items():
            rate = f"{v['tok_s']:.0f} tok/s" if v["tok_s"] else "n/a"
            lines.append(f"with dynkv storing, variant {name}: {rate}" + (f" ({v['ratio']:.1%})" if v["ratio"] else ""))
        lines.append("")
    if s["targets"]:
        lines += ["### targets", "", "| target | limit | measured | met |", "| --- | --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['limit']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |"
                  for t in s["targets"]]
    return "\n".join(lines)


def _trace_line(name: str, t: dict[str, Any]) -> str:
    """One traced hit: the compute stream's span and idle time, dynkv's copy kernels."""
    text = f"trace {name}: TTFT {t['ttft_s'] * 1e3:.1f} ms, {t.get('kernels', 0)} kernels"
    c = (t.get("streams") or {}).get(str(t.get("compute_stream")))
    if c:
        text += f"; compute stream {c['span_ms']:.1f} ms from first to last kernel, {c['idle_ms']:.1f} ms idle"
    if t.get("copy"):
        cp = t["copy"]
        text += (f"; dynkv copies {cp['kernels']} kernels from {cp['first_ms']:.1f} to {cp['last_ms']:.1f} ms, "
                 f"{cp['busy_ms']:.1f} ms busy")
    if t.get("cpu_ms_per_layer"):
        text += f"; CPU {t['cpu_ms_per_layer']:.2f} ms per layer of the last forward"
    if t.get("allreduce_ms"):
        text += f"; all-reduce kernels {t['allreduce_ms']:.1f} ms"
    return text


def _batches_line(batches: list[list[Any]]) -> str:
    """The disk tier's read batches of one disk-tier hit (e2e_probe.disk_batches)."""
    started = [b[1] for b in batches]
    done = [b[3] for b in batches]
    text = (f"disk read batches of the last disk hit: {len(batches)}, {sum(int(b[4]) for b in batches)} pages in "
            f"{sum(int(b[5]) for b in batches)} runs; started {min(started):.1f}-{max(started):.1f} ms, "
            f"read {min(b[2] - b[1] for b in batches):.1f}-{max(b[2] - b[1] for b in batches):.1f} ms each, "
            f"all done at {max(done):.1f} ms")
    costs = [b[6] for b in batches if len(b) > 6 and isinstance(b[6], dict)]
    if costs:
        tot = {k: sum(c[k] for c in costs) for k in costs[0]}
        text += (f"; summed over the batches: {tot['read_ms']:.0f} ms in preadv, {tot['crc_ms']:.0f} ms in CRC, "
                 f"CPU {tot['user_ms']:.0f} ms user + {tot['sys_ms']:.0f} ms system, "
                 f"{tot['minor_faults']:.0f} minor faults, {tot['voluntary_switches']:.0f} voluntary and "
                 f"{tot['involuntary_switches']:.0f} involuntary context switches")
    return text


def _host_line(what: str, host: dict[str, Any] | None) -> str:
    """What the disk tier's device, the CPUs and the process's threads did (e2e_probe.HostSample.delta)."""
    if not host:
        return f"host during {what}: not sampled"
    parts = [f"{host['wall_ms']:.0f} ms"]
    d = host.get("device")
    if d:
        parts.append(f"{d['name']} read {d['read_mb']:.0f} MB in {d['reads']} requests of {d['mean_read_kb']:.0f} KiB, "
                     f"busy {d['busy_pct']:.0f}%, mean queue {d['mean_queue']:.1f}"
                     + (f", wrote {d['write_mb']:.0f} MB" if d.get("write_mb") else ""))
    c = host.get("cpu")
    if c:
        parts.append(f"{c['busy_cores']:.1f} cores busy, {c['iowait_cores']:.1f} in I/O wait")
    threads = host.get("threads_cpu_ms") or {}
    if threads:
        parts.append("thread CPU ms " + ", ".join(f"{k} {v:.0f}" for k, v in list(threads.items())[:6]))
    return f"host during {what}: " + "; ".join(parts)


def plot(s: dict[str, Any], path: Path, title: str = "TTFT per serving path") -> None:
    """PNG: median TTFT (bars, min-max whiskers) per path and prompt length, log scale; dd as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(s["lengths"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.8), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        rows = [r for r in s["lengths"][length]["paths"].values() if r["ttft_s"] is not None]
        med = [r["ttft_s"] * 1e3 for r in rows]
        err = [[m - r["min_s"] * 1e3 for m, r in zip(med, rows)], [r["max_s"] * 1e3 - m for m, r in zip(med, rows)]]
        ax.barh(range(len(rows)), med, xerr=err, color="tab:blue")
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        dd = s["lengths"][length].get("dd") or {}
        if dd.get("median_s"):
            ax.axvline(dd["median_s"] * 1e3, color="tab:red", ls="--", label="dd O_DIRECT, same bytes")
            ax.legend(fontsize=8)
        for i, m in enumerate(med):
            ax.text(m, i, f" {m:.0f}", va="center", fontsize=8)
        ax.set(xscale="log", xlabel="TTFT (ms, median; whiskers min-max)", title=f"{length}-token prompt")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
