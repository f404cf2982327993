"""Results of ``dynkv bench serve``: per-request records, summaries, comparisons, table and plot.

:mod:`dynkv.benchmarks.serve` fills :class:`RequestRecord` objects while it
streams; everything here works on finished records, so it is shared by the
benchmark, the demo and tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EndpointResult", "RequestRecord", "compare", "format_table", "percentile", "plot", "plot_turns", "summarize"]


@dataclass
class RequestRecord:
    """One request: when, how fast, and what came back."""

    conversation: int
    turn: int
    prompt_tokens: int
    start_s: float = 0.0
    ttft_s: float | None = None
    latency_s: float = 0.0
    output_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def decode_tok_s(self) -> float | None:
        """Output tokens per second after the first token (None below 2 tokens)."""
        if self.ttft_s is None or self.output_tokens < 2 or self.latency_s <= self.ttft_s:
            return None
        return (self.output_tokens - 1) / (self.latency_s - self.ttft_s)


@dataclass
class EndpointResult:
    """Every request sent to one endpoint, in the order they were sent."""

    name: str
    url: str
    model: str
    wall_s: float
    requests: list[RequestRecord]

    def summary(self) -> dict[str, Any]:
        """:func:`summarize` of this endpoint's requests."""
        return summarize(self.requests, self.wall_s)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: summary and every request."""
        return {"name": self.name, "url": self.url, "model": self.model, "wall_s": self.wall_s,
                "summary": self.summary(),
                "requests": [{**asdict(r), "decode_tok_s": r.decode_tok_s} for r in self.requests]}


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100, linear interpolation), None when empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    i = int(pos)
    if i + 1 >= len(xs):
        return xs[-1]
    return xs[i] + (xs[i + 1] - xs[i]) * (pos - i)


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
    """TTFT percentiles (all, first turns, later turns), throughput, errors."""
    ok = [r for r in records if r.error is None and r.ttft_s is not None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    later = [r.ttft_s for r in ok if r.turn > 0 and r.ttft_s is not None]
    first = [r.ttft_s for r in ok if r.turn == 0 and r.ttft_s is not None]
    decode = [d for r in ok if (d := r.decode_tok_s) is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
        "ttft_first_turn_p50_s": percentile(first, 50),
        "ttft_later_turns_p50_s": percentile(later, 50),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall_s if wall_s > 0 else None,
        "decode_tok_s_p50": percentile(decode, 50),
        "wall_s": wall_s,
    }


def compare(a: EndpointResult, b: EndpointResult) -> dict[str, Any]:
    """Compare the outputs of two runs of the same workload, request by request.

    Token ids are compared when both runs have them, else texts. Returns
    ``identical`` (every request of both runs succeeded and matched),
    ``compared``, ``differing``, ``first_difference`` (conversation, turn and
    first differing position, or None) and ``max_abs_logprob_diff`` over the
    matching requests' common tokens.
    """
    theirs = {(r.conversation, r.turn): r for r in b.requests}
    compared = differing = 0
    first: dict[str, Any] | None = None
    max_lp = 0.0
    for ra in a.requests:
        rb = theirs.get((ra.conversation, ra.turn))
        if rb is None or ra.error is not None or rb.error is not None:
            continue
        compared += 1
        use_ids = bool(ra.token_ids) and bool(rb.token_ids)
        xa, xb = (ra.token_ids, rb.token_ids) if use_ids else (ra.text, rb.text)
        if xa != xb:
            differing += 1
            if first is None:
                pos = next((i for i, (u, v) in enumerate(zip(xa, xb)) if u != v), min(len(xa), len(xb)))
                first = {"conversation": ra.conversation, "turn": ra.turn, "position": pos}
        else:
            max_lp = max([max_lp, *(abs(u - v) for u, v in zip(ra.logprobs, rb.logprobs))])
    complete = compared == len(a.requests) == len(b.requests)
    return {"a": a.name, "b": b.name, "compared": compared, "differing": differing,
            "identical": complete and differing == 0, "first_difference": first,
            "max_abs_logprob_diff": max_lp}


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def format_table(results: Mapping[str, EndpointResult], extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """One row per endpoint: requests, TTFT p50/p90 (all, later turns), tokens/s; ``extra`` adds columns."""
    cols = ["endpoint", "reqs", "err", "TTFT p50", "TTFT p90", "p50 turn>1", "out tok/s", "decode tok/s"]
    extra_cols = list(dict.fromkeys(k for row in (extra or {}).values() for k in row))
    rows = []
    for name, res in results.items():
        s = res.summary()
        rows.append([name, str(s["requests"]), str(s["errors"]), _fmt(s["ttft_p50_s"], ".3f") + "s",
                     _fmt(s["ttft_p90_s"], ".3f") + "s", _fmt(s["ttft_later_turns_p50_s"], ".3f") + "s",
                     _fmt(s["output_tok_s"], ".1f"), _fmt(s["decode_tok_s_p50"], ".1f")]
                    + [(extra or {}).get(name, {}).get(k, "n/a") for k in extra_cols])
    header = cols + extra_cols
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(wd) if i == 0 else h.rjust(wd) for i, (h, wd) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths)))
              for r in rows]
    return "\n".join(lines)


def plot(results: Mapping[str, EndpointResult], path: Path, title: str = "multi-turn TTFT") -> None:
    """PNG: TTFT p50/p90 per turn and endpoint, and each endpoint's TTFT CDF."""
    plot_turns({name: [(r.turn, r.ttft_s) for r in res.requests if r.ttft_s is not None and r.error is None]
                for name, res in results.items()}, path, title)


def plot_turns(ttfts: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str) -> None:
    """PNG from ``(turn, TTFT s)`` of each series' answered requests: p50/p90 per turn, and each series' CDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_turn, ax_cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [n for n, v in ttfts.items() if v]
    turns = sorted({t for n in names for t, _ in ttfts[n]})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        by_turn = [[x for t2, x in ttfts[name] if t2 == t] for t in turns]
        xs = [t + i * width for t in turns]
        ax_turn.bar(xs, [percentile(v, 50) or 0 for v in by_turn], width, label=f"{name} p50")
        ax_turn.scatter(xs, [percentile(v, 90) or 0 for v in by_turn], marker="_", s=200, color="k")
        ttft = sorted(x for _, x in ttfts[name])
        ax_cdf.plot(ttft, [(k + 1) / len(ttft) for k in range(len(ttft))], drawstyle="steps-post", label=name)
    ax_turn.set_xticks([t + width * (len(names) - 1) / 2 for t in turns], [str(t + 1) for t in turns])
    ax_turn.set(xlabel="turn", ylabel="TTFT (s); bars p50, ticks p90", title=title)
    ax_turn.legend()
    ax_cdf.set(xlabel="TTFT (s)", ylabel="fraction of requests", title="TTFT CDF", xscale="log")
    ax_cdf.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
