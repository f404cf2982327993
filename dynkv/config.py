"""dynkv's configuration: one frozen dataclass, built once at start-up.

vLLM hands the connector ``kv_transfer_config.kv_connector_extra_config`` (a
JSON object); :meth:`DynKVConfig.from_dict` reads it, with ``DYNKV_<KEY>``
environment variables as defaults under it (``DYNKV_HOST_GB``,
``DYNKV_DISK_PATHS``, ...). Unknown keys and bad values raise ``ValueError``
at construction, naming the key (or variable) and what it accepts, so a typo
fails when the engine starts instead of silently running without a tier.

The module is kept whole (past 500 lines): most of it is the class docstring,
the reference of every key, which belongs beside the parser of each; the
parsers are a few lines per kind of value.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from dynkv.policy import EVICTION_POLICIES
from dynkv.tiers.shared.base import redact, scheme_of

__all__ = ["DEFAULT_HOST_GB", "ENV_PREFIX", "DynKVConfig"]

ENV_PREFIX = "DYNKV_"
DEFAULT_HOST_GB = 4.0
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("", "none", "off")


class _Source:
    """Where a value came from, for error messages."""

    def __init__(self, key: str, env_var: str | None = None) -> None:
        self.key = key
        self.env_var = env_var

    def __str__(self) -> str:
        if self.env_var is not None:
            return f"environment variable {self.env_var} (key {self.key!r})"
        return f"key {self.key!r}"

    def error(self, value: Any, expected: str) -> ValueError:
        return ValueError(f"dynkv config {self}: got {value!r}, expected {expected}")


def _parse_int(value: Any, src: _Source, expected: str) -> int:
    if isinstance(value, bool):
        raise src.error(value, expected)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise src.error(value, expected)


def _parse_float(value: Any, src: _Source, expected: str) -> float:
    if isinstance(value, bool):
        raise src.error(value, expected)
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", value):
        out = float(value)
    else:
        raise src.error(value, expected)
    if not math.isfinite(out):
        raise src.error(value, expected)
    return out


def _parse_bool(value: Any, src: _Source) -> bool:
    expected = f"a boolean (true/false, or one of {', '.join(_TRUE + _FALSE)} as a string)"
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise src.error(value, expected)


def _int_in(lo: int, hi: int | None = None) -> Callable[[Any, _Source], int]:
    expected = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(value: Any, src: _Source) -> int:
        out = _parse_int(value, src, expected)
        if out < lo or (hi is not None and out > hi):
            raise src.error(value, expected)
        return out

    return parse


def _float_above(lo: float, *, inclusive: bool) -> Callable[[Any, _Source], float]:
    expected = f"a finite number {'>=' if inclusive else '>'} {lo:g}"

    def parse(value: Any, src: _Source) -> float:
        out = _parse_float(value, src, expected)
        if out < lo or (out == lo and not inclusive):
            raise src.error(value, expected)
        return out

    return parse


def _optional(parse: Callable[[Any, _Source], Any]) -> Callable[[Any, _Source], Any]:
    def parse_optional(value: Any, src: _Source) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return parse(value, src)

    return parse_optional


COPY_PATHS = ("auto", "kernel", "staged")
HOST_ADMISSION = ("auto", "all", "frequency")


def _parse_host_admission(value: Any, src: _Source) -> str:
    v = value.strip().lower() if isinstance(value, str) else value
    if v not in HOST_ADMISSION:
        raise src.error(value, f"one of {', '.join(HOST_ADMISSION)}")
    return v


def _parse_str(value: Any, src: _Source) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 256:
        raise src.error(value, "a non-empty string of at most 256 characters")
    return value.strip()


def _parse_copy_path(value: Any, src: _Source) -> str:
    v = value.strip().lower() if isinstance(value, str) else value
    if v not in COPY_PATHS:
        raise src.error(value, f"one of {', '.join(COPY_PATHS)}")
    return v


def _parse_paths(value: Any, src: _Source) -> tuple[str, ...]:
    expected = "a list of directory paths, or one string of paths separated by ',' or ':'"
    if isinstance(value, str):
        items = re.split(r"[,:]", value)
    elif isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        items = list(value)
    else:
        raise src.error(value, expected)
    paths = tuple(p.strip() for p in items if p.strip())
    dupes = sorted({p for p in paths if paths.count(p) > 1})
    if dupes:
        raise src.error(value, f"{expected}, each directory once (repeated: {', '.join(dupes)})")
    return paths


def _parse_host(value: Any, src: _Source) -> str:
    expected = "a host name or IP address to bind, e.g. '127.0.0.1' or '0.0.0.0'"
    if isinstance(value, str) and value.strip() and not any(c.isspace() for c in value.strip()):
        return value.strip()
    raise src.error(value, expected)


def _parse_store_url(value: Any, src: _Source) -> str:
    expected = ("a store URL: redis://HOST:PORT[/DB], rediss://..., redis+cluster://H1:P1,H2:P2,... "
                "or mooncake://MASTER_HOST:PORT")
    if not isinstance(value, str):
        raise src.error(value, expected)
    try:
        scheme_of(value.strip())
    except ValueError as e:  # the message shows the URL redacted; never echo the raw value
        raise ValueError(f"dynkv config {src}: {e}; expected {expected}") from None
    return value.strip()


def _parse_namespace(value: Any, src: _Source) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", value.strip()):
        return value.strip()
    raise src.error(value, "1 to 64 letters, digits, '_', '.' or '-'")


MIN_SECRET_CHARS = 32


def _parse_secret(value: Any, src: _Source) -> str:
    # The value is never echoed: error messages end up in logs.
    if isinstance(value, str) and MIN_SECRET_CHARS <= len(value.strip()) <= 4096:
        return value.strip()
    got = f"a string of {len(value.strip())} characters" if isinstance(value, str) else type(value).__name__
    raise ValueError(
        f"dynkv config {src}: got {got} (value not shown), expected a secret of at least {MIN_SECRET_CHARS} "
        "characters shared by every engine of the deployment, e.g. the output of "
        "python -c 'import secrets; print(secrets.token_hex(32))'"
    )


def _parse_devices(value: Any, src: _Source) -> str:
    expected = "UCX device names separated by ',', e.g. 'eth0', 'mlx5_0:1,eth0', 'lo', or 'all'"
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.:\-]+(,[A-Za-z0-9_.:\-]+)*", value.strip()):
        return value.strip()
    raise src.error(value, expected)


def _parse_eviction(value: Any, src: _Source) -> str:
    expected = f"one of {', '.join(repr(p) for p in EVICTION_POLICIES)}"
    if isinstance(value, str) and value.strip().lower() in EVICTION_POLICIES:
        return value.strip().lower()
    raise src.error(value, expected)


_PARSERS: dict[str, Callable[[Any, _Source], Any]] = {
    "host_gb": _optional(_float_above(0.0, inclusive=False)),
    "host_pages": _optional(_int_in(1)),
    "staging_pages": _optional(_int_in(0, 1 << 24)),
    "disk_gb": _float_above(0.0, inclusive=True),
    "disk_paths": _parse_paths,
    "disk_direct_io": _parse_bool,
    "eviction": _parse_eviction,
    "disk_admit_min_hits": _int_in(0),
    "io_threads": _int_in(1, 256),
    "disk_write_backlog_gb": _float_above(0.0, inclusive=False),
    "disk_write_around": _parse_bool,
    "init_timeout_s": _float_above(0.0, inclusive=False),
    "metrics_port": _optional(_int_in(1, 65535)),
    "layerwise": _parse_bool,
    "side_channel_host": _parse_host,
    "side_channel_port": _int_in(0, 65535),
    "transfer_timeout_s": _float_above(0.0, inclusive=False),
    "export_timeout_s": _float_above(0.0, inclusive=False),
    "stats_interval_s": _float_above(0.0, inclusive=True),
    "disk_wait_ms": _float_above(0.0, inclusive=True),
    "early_loads": _parse_bool,
    "load_last_block": _parse_bool,
    "copy_path": _parse_copy_path,
    "model_version": _optional(_parse_str),
    "cost_model": _parse_bool,
    "host_admission": _parse_host_admission,
    "remote_url": _optional(_parse_store_url),
    "shared_namespace": _parse_namespace,
    "shared_admit_min_hits": _int_in(0),
    "shared_batch_pages": _int_in(1, 4096),
    "shared_timeout_s": _float_above(0.0, inclusive=False),
    "shared_lookup_ms": _float_above(0.0, inclusive=True),
    "transfer_secret": _optional(_parse_secret),
    "accept_remote_prefill": _parse_bool,
    "ucx_net_devices": _optional(_parse_devices),
}


@dataclass(frozen=True)
class DynKVConfig:
    """Settings of one dynkv engine (leader and workers read the same).

    Build it with :meth:`from_dict`; direct construction validates the same way.

    Parameters
    ----------
    host_gb
        Size of the pinned host tier (G2) in GiB. Give this or ``host_pages``,
        not both; with neither, ``DEFAULT_HOST_GB``.
    host_pages
        Size of the host tier in pages (exact; handy for tests).
    staging_pages
        Pages of the host pool outside the host tier: a disk or shared-tier
        hit that finds every host page pinned or being written is read into
        one of these instead, and it is freed once the load is on the device
        (it never becomes a cached host page). None (the default): a
        sixteenth of the host tier, within 64 to 1024 pages; 0: none, such a
        hit is recomputed.
    disk_gb
        Size of the disk tier (G3) in GiB over all ``disk_paths``; 0 turns the
        disk tier off.
    disk_paths
        Directories (one per NVMe device, ideally) that hold the disk tier's
        files; required when ``disk_gb > 0``. As a string: separated by ``,``
        or ``:``.
    disk_direct_io
        Open disk-tier files with ``O_DIRECT``; turn off for file systems that
        refuse it (tmpfs).
    eviction
        Eviction policy of every tier: ``"lru"`` or ``"fifo"``.
    disk_admit_min_hits
        A page is written to disk only after it was seen this many times
        (stored plus hits); 0 admits every page. Spares the SSD one-hit pages.
    io_threads
        Threads of the leader's host<->disk I/O pool, in ``[1, 256]``. They
        take disk reads ahead of queued write-through.
    disk_write_backlog_gb
        The most write-through to the disk tier (GiB) submitted and not yet
        written. Reads go ahead of queued writes, so under a read load writes
        wait; past this, new write-throughs are skipped (their pages stay in
        the host tier only, a later miss on disk at worst) and counted in
        ``dynkv_disk_writes_skipped_total``. Each queued write pins its host
        page, so the bound also keeps the host tier from filling with pinned
        pages (a quarter of it is the most ever pinned for writes).
    disk_write_around
        Pages the host tier does not take (its admission gate keeps them
        out, or every host page is pinned) are copied into a staging slot
        and written from there to the disk tier, under the same admission
        filter and backlog as write-through; at most half the staging slots
        hold such writes, so loads always find some. Off: such pages are
        not stored.
    init_timeout_s
        How long workers wait for the leader's host pool at start-up.
    metrics_port
        Port of a standalone Prometheus endpoint, or None for none.
    layerwise
        Hits in the host tier load in the step that computes the request,
        layer by layer, each layer waited for just before its attention (the
        copy overlaps the forward pass). Off: every hit loads asynchronously,
        and the request is computed a step after its load finishes.
    side_channel_host
        Disaggregated prefill (``kv_role`` ``kv_producer``): the address the
        side channel binds, where decode engines fetch the NIXL metadata and
        release pages. Loopback unless set; ``0.0.0.0`` for decode engines on
        other hosts (they are then told this host's address).
    side_channel_port
        Port of the side channel; 0 picks a free one (decode engines learn it
        from each request's ``kv_transfer_params``).
    transfer_timeout_s
        Disaggregated decode: how long one pull of a request's pages may take,
        waiting for the prefill engine included; past it the decode engine
        recomputes those blocks.
    export_timeout_s
        Disaggregated prefill: how long exported pages stay pinned for a decode
        engine that has not released them.
    stats_interval_s
        How often the scheduler also reads dynkv's latency histogram for
        vLLM's stats (``get_kv_connector_stats``, asked at every step on the
        way to the step's output). Counters and gauges are reported at every
        step where one changed; the histogram is most of the samples, and its
        sums and counts are reported up to this much later (at the next step
        after it). 0 reads everything at every step.
    disk_wait_ms
        When a scheduler step schedules no tokens while a disk-tier load is
        reading, the scheduler blocks up to this long for a read to land
        instead of returning at once (vLLM's loop otherwise spins on the
        waiting request). A read landing ends the wait at once; 0 never waits.
    early_loads
        With ``layerwise``: a step's host-tier loads start before vLLM
        prepares the step's inputs, so the copy runs meanwhile. Where the
        engine's only worker runs in the scheduler's thread (one GPU, vLLM's
        uni executor), the scheduler launches them as it builds the step,
        ordered after every earlier step's GPU work. Otherwise they start
        when vLLM hands the step to the workers (its ``handle_preemptions``
        hook): before input preparation in vLLM's V1 model runner, after it
        in the V2 runner, where that changes nothing. Steps in which vLLM
        itself writes KV blocks first (zeroing fresh blocks, copying blocks)
        start them after that, as with this off.
    load_last_block
        An asynchronous hit (disk tier, or host tier without ``layerwise``)
        on the whole prompt also loads the prompt's last full block, and vLLM
        computes one token instead of that block: a shorter step after the
        load (at 32k tokens on an H200, a one-token step takes a quarter of a
        16-token one). The last block's KV then comes from the prompt's first
        prefill, where vLLM's own prefix-cache hit computes it again, so greedy
        tokens can differ from that hit where the model's top two logits
        nearly tie. Off (the default): every local hit stops where vLLM's own
        prefix cache would. Pages pulled from a prefill engine always load
        whole.
    copy_path
        How pages cross between the host tier and a GPU's KV cache:
        ``kernel`` (dynkv's copy kernel reads or writes pinned host memory
        directly), ``staged`` (whole page slices on the copy engines through a
        small staging ring on the GPU, then an on-device kernel), or ``auto``
        (each worker measures both at start, per direction, and keeps the
        faster; the result is cached per GPU and driver).
    model_version
        The identity of the served weights, in every page key: pages stored
        under another version never match. Default (None): a digest of the
        model directory's JSON files and samples of each weight file
        (:mod:`dynkv.identity`); set it where reading the weight files at start
        is slow, or to share pages between copies of a model you know are
        the same.
    cost_model
        Per request, read a disk-tier match only while the read would land
        before the engine recomputed the same tokens (the disk tier's measured
        bandwidth and queue against the engine's measured prefill rate,
        :mod:`dynkv.policy.cost`); otherwise those tokens are recomputed. A
        load whose disk reads then wait past the recompute time gives up: its
        reads not yet started are cancelled and its unread blocks recomputed.
        The shared tier's matches are weighed the same way, on its own
        measured bandwidth and queue. Off: every match is read, however long
        it waits.
    host_admission
        ``auto`` (default): ``all`` while the host tier's traffic is
        recency-friendly, ``frequency`` while it is a cycle larger than the
        tier, decided from the pages that come back after leaving the tier
        (:class:`dynkv.policy.admission.AdaptiveGate`). ``all``: a full host
        tier evicts for every new page (LRU). ``frequency``: once full, a new
        page enters only if it was seen more often than the page it would
        evict (TinyLFU-style, over the frequency filter the disk tier also
        uses). Under multi-turn traffic whose working set exceeds the tier,
        LRU evicts each prefix just before its next turn; gating keeps a
        stable share resident. But where conversations come and go and the
        active ones fit, gating shuts the new ones out behind old pages seen
        more often: simulated in ``tests/policy/test_scan_resistance.py``,
        ``auto`` stays within a few points of the better of the two in both.
    remote_url
        The shared tier's store, below the host tier and shared by every
        engine that serves the same model against it
        (:mod:`dynkv.tiers.shared`): ``redis://[USER:PASSWORD@]HOST:PORT[/DB]``,
        ``rediss://...`` (TLS), ``redis+cluster://H1:P1,H2:P2,...`` (Redis or
        Valkey), or ``mooncake://MASTER_HOST:PORT`` (Mooncake Store's master;
        options as a query: ``?segment_mb=..&buffer_mb=..&protocol=tcp``).
        Credentials may come from ``DYNKV_SHARED_USERNAME`` /
        ``DYNKV_SHARED_PASSWORD`` instead; they are never logged. None (the
        default): no shared tier. A store that is down at start leaves the
        engine running without it until it answers.
    shared_namespace
        First part of every key in the store; engines share pages within one
        namespace (and one model identity, always part of the key).
    shared_admit_min_hits
        A host page is written to the shared tier once it was seen this many
        times (stored plus hits); 0 or 1 writes every page.
    shared_batch_pages
        Pages per store call (one pipeline or one batch request).
    shared_timeout_s
        Connect and per-call timeout of the store's client; a call past it
        marks the store down (requests recompute; it is retried with backoff).
    shared_lookup_ms
        The most a lookup waits for the store to say which pages it holds; a
        store that answers later counts as a miss for that request, so a slow
        store never holds up the scheduler for longer.
    transfer_secret
        Disaggregated serving: the key (at least 32 characters) under which a
        prefill engine signs its ``kv_transfer_params`` (HMAC-SHA256) and a
        decode engine checks them; every engine of a deployment has the same.
        Give it as ``DYNKV_TRANSFER_SECRET``: ``kv_connector_extra_config`` is
        in vLLM's start-up log and on the command line. Without one, a decode
        engine keeps pulled pages for the request that pulled them only (it
        cannot tell forged params from real ones), and a prefill engine's
        params carry no MAC, which decode engines with a secret refuse.
    accept_remote_prefill
        A ``kv_both`` engine pulls pages named by a request's
        ``kv_transfer_params`` (``do_remote_prefill``) only with this on;
        off (the default), such params are ignored and counted, and the
        prompt is computed. ``kv_consumer`` engines always pull.
    ucx_net_devices
        Network devices NIXL's UCX may use (``UCX_NET_DEVICES``), on prefill
        and decode engines. Default: ``lo`` while ``side_channel_host`` is on
        loopback (unless the environment sets ``UCX_NET_DEVICES``), else
        every device. Set it on engines of a multi-host deployment to the
        interfaces facing the other engines, e.g. ``eth1`` or ``mlx5_0:1``.
    """

    host_gb: float | None = None
    host_pages: int | None = None
    staging_pages: int | None = None
    disk_gb: float = 0.0
    disk_paths: tuple[str, ...] = ()
    disk_direct_io: bool = True
    eviction: str = "lru"
    disk_admit_min_hits: int = 2
    io_threads: int = 4
    disk_write_backlog_gb: float = 1.0
    disk_write_around: bool = True
    init_timeout_s: float = 120.0
    metrics_port: int | None = None
    layerwise: bool = True
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 0
    transfer_timeout_s: float = 30.0
    export_timeout_s: float = 120.0
    stats_interval_s: float = 1.0
    disk_wait_ms: float = 0.0
    early_loads: bool = True
    load_last_block: bool = False
    copy_path: str = "auto"
    model_version: str | None = None
    cost_model: bool = True
    host_admission: str = "auto"
    remote_url: str | None = field(default=None, repr=False)  # may hold credentials: see shared_store()
    shared_namespace: str = "dynkv"
    shared_admit_min_hits: int = 1
    shared_batch_pages: int = 32
    shared_timeout_s: float = 2.0
    shared_lookup_ms: float = 20.0
    transfer_secret: str | None = field(default=None, repr=False)
    accept_remote_prefill: bool = False
    ucx_net_devices: str | None = None

    def __post_init__(self) -> None:
        for name, parse in _PARSERS.items():
            object.__setattr__(self, name, parse(getattr(self, name), _Source(name)))
        _check_combination(self, {name: _Source(name) for name in _PARSERS})

    def shared_store(self) -> str:
        """``remote_url`` without its credentials (what logs and errors show), or ``"none"``."""
        return redact(self.remote_url) if self.remote_url else "none"

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every key :meth:`from_dict` accepts."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def env_var(cls, key: str) -> str:
        """The environment variable that gives ``key``'s default."""
        return ENV_PREFIX + key.upper()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> DynKVConfig:
        """Build the config from vLLM's ``kv_connector_extra_config``.

        Parameters
        ----------
        d
            The extra-config mapping; None for empty.
        env
            Environment to read ``DYNKV_*`` defaults from; default
            ``os.environ``. An empty variable counts as unset.

        Raises
        ------
        ValueError
            On an unknown key, a value of the wrong type or out of range, or a
            contradictory combination; the message names the key (and the
            variable when the value came from the environment).
        """
        d = dict(d or {})
        env = os.environ if env is None else env
        known = cls.keys()
        for key in d:
            if key not in known:
                near = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(
                    f"dynkv config: unknown key {key!r}{hint}; accepted keys: {', '.join(known)}"
                )
        values: dict[str, Any] = {}
        sources: dict[str, _Source] = {}
        from_env = {k: env.get(cls.env_var(k), "") for k in known}
        host_in_dict = "host_gb" in d or "host_pages" in d
        for key in known:
            if key in d:
                src, raw = _Source(key), d[key]
            elif from_env[key].strip() and not (key in ("host_gb", "host_pages") and host_in_dict):
                # The host tier's size is one setting: a size in the dict, in
                # either unit, replaces one from the environment.
                src, raw = _Source(key, cls.env_var(key)), from_env[key]
            else:
                continue
            values[key] = _PARSERS[key](raw, src)
            sources[key] = src
        _check_combination(values, {k: sources.get(k, _Source(k)) for k in known})
        return cls(**values)

    def for_rank(self, dp_rank: int, dp_rank_local: int | None = None) -> DynKVConfig:
        """The settings of data-parallel rank ``dp_rank`` (``dp_rank_local`` on its node; default the same).

        Each DP rank of vLLM is an engine of its own (its own scheduler, so its
        own leader and page index): it gets its own tiers rather than one pool
        shared over the node, which would put a cross-process index and its
        locks on every lookup. Each rank keeps its disk pages in a
        subdirectory ``dp<rank>`` of every ``disk_paths`` entry (so a rank
        restarted finds its own pages again), and serves metrics and the
        side channel on the configured port plus its local rank (when one is
        configured). ``host_gb`` and ``disk_gb`` are per rank: a node of
        ``n`` ranks uses ``n`` times as much.
        """
        if dp_rank < 0:
            raise ValueError(f"dynkv: data-parallel rank {dp_rank}: expected >= 0")
        local = dp_rank if dp_rank_local is None else dp_rank_local
        changes: dict[str, Any] = {"disk_paths": tuple(os.path.join(p, f"dp{dp_rank}") for p in self.disk_paths)}
        for key in ("metrics_port", "side_channel_port"):
            port = getattr(self, key)
            if port:
                if port + local > 65535:
                    raise ValueError(f"dynkv config {key}={port}: data-parallel rank {dp_rank} would listen on "
                                     f"{port + local}, past 65535; give a lower port")
                changes[key] = port + local
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping; ``from_dict(c.to_dict(), env={}) == c``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("host_gb", "host_pages") and value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _check_combination(cfg: Any, sources: Mapping[str, _Source]) -> None:
    get = cfg.get if isinstance(cfg, Mapping) else lambda k, default=None: getattr(cfg, k, default)
    host_gb, host_pages = get("host_gb"), get("host_pages")
    if host_gb is not None and host_pages is not None:
        raise ValueError(
            f"dynkv config: {sources['host_gb']} and {sources['host_pages']} are both set; "
            "size the host tier in one unit only"
        )
    if host_gb is None and host_pages is None and not isinstance(cfg, Mapping):
        object.__setattr__(cfg, "host_gb", DEFAULT_HOST_GB)
    disk_gb, disk_paths = get("disk_gb", 0.0), get("disk_paths", ())
    if disk_gb and not disk_paths:
        raise ValueError(
            f"dynkv config: {sources['disk_gb']} is {disk_gb:g} GiB but {sources['disk_paths']} "
            "names no directory; give disk_paths, or disk_gb=0 to turn the disk tier off"
        )
