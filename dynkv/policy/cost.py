"""Load or recompute: cap a request's disk-tier match where reading it would take longer than computing it.

A disk hit pays only while its pages land sooner than the engine would
recompute the same tokens. Under load both sides move: the disk's reads queue
behind each other, and the engine's prefill rate is shared by the batch. So
the leader keeps two measured rates and one queue:

- the engine's **prefill rate**: tokens per second of a step, from when the
  scheduler hands the step over to when its output comes back, a moving average
  over steps of at least :data:`MIN_STEP_TOKENS` tokens (decode-only steps say
  little about prefill; with vLLM's async scheduling two steps overlap and the
  rate reads low, which errs toward loading);
- the disk tier's **read bandwidth**: bytes read per second of the time the
  disk had reads outstanding, sampled over windows of at least
  :data:`MIN_WINDOW_S` of such busy time (or until it has nothing left to
  read), each read timed when its I/O thread finished it, and kept as a ratio
  of sums (bytes over busy time, fading over :data:`BANDWIDTH_HORIZON_S` of
  busy time) rather than an average of the windows' ratios, which reads
  bursts of completions as speed. The tier reads several loads at
  once on its I/O threads, so a load's own time says nothing of the disk:
  loads read side by side finish close together, and timing each from the
  previous one's end read tens of GB/s off a 2 GB/s disk (seen on an H100
  host under load, 2026-12-07). Time with nothing to read counts for nothing,
  so waiting in the queue is not mistaken for slow reads either;
- the disk **queue**: bytes of disk loads submitted and not yet complete, and
  the bytes of write-through running on the device (``writes_ahead``): the
  disk tier's threads take reads ahead of queued writes, so only the writes
  already running can still be ahead of a read.

A request whose match has ``d`` disk pages would wait ``(queue + d * page) /
bandwidth`` for them; recomputing them costs ``d * block_tokens / rate``. The
leader loads them when the first is smaller (times :data:`LOAD_MARGIN`), else
it stops the match before the first disk page and those tokens are recomputed.
Host-tier pages are always loaded: their copy runs under the forward, layer by
layer, at PCIe speed. Until both rates have been measured, every match loads.

A load that was admitted is weighed again while its reads wait
(:meth:`CostModel.gives_up`), at every call of the leader. It was admitted
against a deadline: its submission plus the time to recompute all its pages.
It gives up as soon as the bytes still ahead of its last page (the writes
running, the unread part of every load submitted before it, and its own),
read from now at the measured bandwidth, would land after that deadline (the
disk turned out slower under load than its rate said, or loads admitted
before it were slower), or would take longer than recomputing its unread
pages from now. It does not wait for the deadline to pass to find out (a
load given up only then has waited its recompute time and recomputes on top,
about twice the cost): it gives up at the first check whose prediction
misses the deadline. The leader then
cancels its reads that have not started and recomputes their blocks; reads
already running finish and leave their pages in the host tier. So no request
waits on the disk much beyond what recomputing would have cost it.

A bandwidth estimate can recover from a slow sample. The model only
measures a tier by loading from it, so once one slow window (a loaded
machine, a burst of writes, a store shared with a busy neighbour) makes it
refuse every match, nothing would ever measure the tier again, and it would
stay refused for good (seen on a 2-core VM, 2026-12-07: one shared-tier load
at 144 ms a page kept an engine off the store for the rest of its run). So
the estimate has an age: the time since its last sample. When the model would
refuse a match, nothing is being read from the tier, and the estimate is
older than ``probe_every_s`` (:data:`PROBE_EVERY_S`, and as long again since
the last probe), the model lets a **probe** through instead: the match's
first ``probe_pages`` (:data:`PROBE_PAGES`) pages are loaded, the rest are
recomputed. A probe is an ordinary load (the pages are read, checked and
used as any other); only its measurement is weighed differently: the first
bandwidth sample after it replaces the estimate instead of adding to its
sums, as an estimate that old says nothing of the tier now. A fast
probe so brings back full matches at once; a slow one keeps the model
refusing, and the next probe waits another interval. While its reads wait, a
probe gives up only once its deadline has passed (as before the bandwidth is
measured): the early give-up weighs the estimate the probe is there to test.
A request let through as a probe and looked up again (vLLM retries a request
it could not schedule) stays the probe (``probing``), so the retry does not
spend the interval's one probe on nothing.

Why probes rather than letting the estimate decay toward a reference over
time: there is no trustworthy reference to decay to (in the case above the
slow sample was the first; a sample taken idle at start could as well be the
outlier), and a decayed estimate admits whole matches on a guess, where the
shared tier has no give-up: the request would wait for every page of a tier
that may still be slow. A probe costs at most a few pages' wait, and what it
concludes is measured. A few pages rather than one, as a load's reads run
side by side on the tier's threads or in one store call: one page would time
one read's latency. Still, a tier whose bandwidth grows with the size of a
load reads lower in a probe than in a full match; there the probe errs
toward refusing.

All times come from a clock the caller passes (``time.perf_counter`` in the
leader, a simulated clock in the tests).
"""

from __future__ import annotations

import math

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LOAD_MARGIN", "MIN_STEP_TOKENS", "MIN_WINDOW_S", "PROBE_EVERY_S", "PROBE_PAGES", "CostModel", "Decision"]

MIN_STEP_TOKENS = 256  # a step that computes fewer tokens is not timed as prefill
LOAD_MARGIN = 1.0  # load when the estimated wait is below recompute time x this
_ALPHA = 0.2  # weight of the newest sample in the moving averages
MIN_WINDOW_S = 0.02  # busy time of the disk behind one bandwidth sample
BANDWIDTH_HORIZON_S = 1.0  # busy time over which the bandwidth estimate's sums fade by a factor e
PROBE_EVERY_S = 5.0  # an estimate that refuses is re-measured by a probe once it is this old (see the module)
PROBE_PAGES = 4  # pages a probe loads: the first of the match it would have refused


@dataclass(frozen=True)
class Decision:
    """What the model chose for one request's disk pages, and why (seconds estimated).

    With ``probe``, only the first ``disk_pages`` of the match are to be loaded (a probe, see the module);
    ``load_s`` and ``recompute_s`` are then those of the whole match, which the estimate refused.
    """

    load: bool
    disk_pages: int
    load_s: float | None = None
    recompute_s: float | None = None
    probe: bool = False


@dataclass
class _DiskJob:
    """One load's disk reads, in bytes: to serve (less what was cancelled), not yet read, as submitted."""

    nbytes: int
    unread: int
    total: int
    tokens: int
    page_bytes: int
    submitted: float
    probe: bool = False


class CostModel:
    """Prefill rate, disk bandwidth and disk queue of one engine; decides per request whether disk pages pay."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter, margin: float = LOAD_MARGIN,
                 writes_ahead: Callable[[], int] | None = None, probe_every_s: float = PROBE_EVERY_S,
                 probe_pages: int = PROBE_PAGES) -> None:
        if not margin > 0:
            raise ValueError(f"margin={margin!r}: expected a number > 0")
        if not probe_every_s > 0:
            raise ValueError(f"probe_every_s={probe_every_s!r}: expected a number of seconds > 0")
        if not (isinstance(probe_pages, int) and probe_pages >= 1):
            raise ValueError(f"probe_pages={probe_pages!r}: expected an integer >= 1")
        self._clock = clock
        self._writes_ahead = writes_ahead  # bytes of writes running on the disk now (None: the tier writes none)
        self.margin = margin
        self.probe_every_s = probe_every_s
        self.probe_pages = probe_pages
        self.prefill_tokens_per_s: float | None = None
        self._bytes_per_s: float | None = None
        self._sum_bytes = 0.0  # moving sums behind _bytes_per_s (see _bandwidth_sample)
        self._sum_busy = 0.0
        self._estimated_at = float("-inf")  # when the bandwidth was last sampled (or set)
        self._probed_at = float("-inf")  # when the last probe was let through
        self._probing = False  # a probe was submitted and has not been sampled yet: its sample replaces the estimate
        self.queue_bytes = 0
        self._steps: deque[tuple[float, int]] = deque(maxlen=64)  # handed over, not yet back
        self._inflight: dict[int, _DiskJob] = {}  # in submission order: the disk serves them first in, first out
        self._busy_since: float | None = None  # since when reads are outstanding (None: none are)
        self._window_bytes = 0  # read in the current bandwidth window
        self._window_busy = 0.0  # busy seconds of the window before _busy_since

    @property
    def disk_bytes_per_s(self) -> float | None:
        """The tier's measured read bandwidth (None until measured); setting it counts as a sample taken now."""
        return self._bytes_per_s

    @disk_bytes_per_s.setter
    def disk_bytes_per_s(self, value: float | None) -> None:
        self._bytes_per_s = value
        self._estimated_at = self._clock()
        # As one window's worth of reads, for the sums the next samples are added to.
        self._sum_busy = MIN_WINDOW_S if value is not None else 0.0
        self._sum_bytes = value * MIN_WINDOW_S if value is not None else 0.0

    def _bandwidth_sample(self, nbytes: float, busy: float) -> None:
        """``nbytes`` read in ``busy`` seconds of disk busy time: a new sample.

        The estimate is a ratio of sums (bytes over busy time, both fading
        with the busy time since, over :data:`BANDWIDTH_HORIZON_S`), not a
        moving average of ratios: reads run side by side finish in bursts, so a window often
        closes on one page after a long wait and the next takes a whole burst
        in a few milliseconds; averaging those ratios reads the disk 2-2.5x
        fast (16 threads at 1.5 GB/s read 3.3-3.7 GB/s in
        ``tests/leader/test_cost.py``; 4.1 GB/s on an H100 host whose disk
        reads 1.5). The first sample after a probe replaces the sums.
        """
        if self._probing or self._sum_busy <= 0:
            self._sum_bytes, self._sum_busy = float(nbytes), float(busy)
        else:
            keep = math.exp(-busy / BANDWIDTH_HORIZON_S)  # what came before fades with the busy time since
            self._sum_bytes = keep * self._sum_bytes + nbytes
            self._sum_busy = keep * self._sum_busy + busy
        self._bytes_per_s = self._sum_bytes / self._sum_busy
        self._estimated_at = self._clock()
        self._probing = False

    def writes_ahead(self) -> int:
        """Bytes of writes running on the disk now: ahead of any read submitted now."""
        return max(0, self._writes_ahead()) if self._writes_ahead is not None else 0

    @staticmethod
    def _average(old: float | None, sample: float) -> float:
        return sample if old is None else (1 - _ALPHA) * old + _ALPHA * sample

    def step_begin(self, tokens: int) -> None:
        """The scheduler hands a step of ``tokens`` tokens to the workers now (a step of none runs no model)."""
        if tokens > 0:
            self._steps.append((self._clock(), tokens))

    def step_end(self) -> None:
        """The oldest step handed over has come back (its output reached the scheduler)."""
        if not self._steps:
            return
        began, tokens = self._steps.popleft()
        now = self._clock()
        if tokens >= MIN_STEP_TOKENS and now > began:
            self.prefill_tokens_per_s = self._average(self.prefill_tokens_per_s, tokens / (now - began))

    def disk_submitted(self, job: int, nbytes: int, *, tokens: int = 0, page_bytes: int = 0,
                       probe: bool = False) -> None:
        """A load's disk reads of ``nbytes`` were submitted now: pages of ``page_bytes``, ``tokens`` tokens in all
        (without them, :meth:`gives_up` never gives the load up); ``probe``: the load is a probe that
        :meth:`disk_pays` let through."""
        if nbytes <= 0:
            return
        now = self._clock()
        if not self._inflight:
            self._busy_since = now
        self._inflight[job] = _DiskJob(nbytes, nbytes, nbytes, tokens, page_bytes, now, probe)
        self.queue_bytes += nbytes
        if probe:
            self._probing = True

    def disk_read(self, job: int, nbytes: int, *, cancelled: bool = False, at: float | None = None) -> None:
        """``nbytes`` of the load's reads left the queue: read (``at``: when the read completed, on this model's
        clock; default now), or ``cancelled`` before they started.

        Pass ``at`` where completions are applied later than they happen (the leader applies them at its
        next call): the bandwidth is the disk's, not the pace of whoever collects its completions.
        """
        entry = self._inflight.get(job)
        if entry is None:
            return
        nbytes = min(nbytes, entry.unread)
        entry.unread -= nbytes
        self.queue_bytes -= nbytes
        if cancelled:  # bytes never read: not part of the service the bandwidth measures
            entry.nbytes -= nbytes
        else:
            self._served(nbytes, self._clock() if at is None else at)

    def disk_done(self, job: int, *, at: float | None = None) -> None:
        """The load's last disk read completed ``at`` (default now; failed reads included: the disk did the work)."""
        entry = self._inflight.pop(job, None)
        if entry is None:
            return
        now = self._clock() if at is None else at
        self.queue_bytes -= entry.unread
        self._served(entry.unread, now)  # reads a caller did not report one by one
        if not self._inflight and self._busy_since is not None:  # the disk goes idle: its busy time stops,
            self._window_busy += max(0.0, now - self._busy_since)  # and what it read since the last sample is one
            self._busy_since = None
            if self._window_bytes > 0 and self._window_busy > 0:
                self._bandwidth_sample(self._window_bytes, self._window_busy)
            # With nothing read since the last sample (reads cancelled before they started), the busy time
            # was spent on something else: not carried into the next busy period's sample.
            self._window_bytes, self._window_busy = 0, 0.0
        if entry.probe:  # a probe that read nothing (cancelled) leaves the estimate as it was
            self._probing = False

    def _served(self, nbytes: int, now: float) -> None:
        """``nbytes`` were read by ``now``: a bandwidth sample once the window holds enough busy time."""
        self._window_bytes += nbytes
        busy = self._window_busy + (max(0.0, now - self._busy_since) if self._busy_since is not None else 0.0)
        if busy >= MIN_WINDOW_S and self._window_bytes > 0:
            self._bandwidth_sample(self._window_bytes, busy)
            self._window_bytes, self._window_busy = 0, 0.0
            if self._busy_since is not None:
                self._busy_since = max(self._busy_since, now)

    def gives_up(self, job: int) -> Decision | None:
        """Whether a load whose reads are under way should stop waiting for the rest (None: unknown job).

        ``load_s`` is what is still to read up to its last page (writes
        running included), at the measured bandwidth (0 before it is
        measured); ``recompute_s`` is the time to recompute its unread pages
        at the measured prefill rate. It gives up (``load`` False) when
        ``load_s`` exceeds ``recompute_s`` times the margin, or when now plus
        ``load_s`` passes its deadline: when it was submitted plus the time to
        recompute all its pages, times the margin (with the bandwidth not yet
        measured, or for a probe: once that deadline has passed). Before the
        prefill rate is measured it never gives up.
        """
        entry = self._inflight.get(job)
        if entry is None:
            return None
        pages_left = entry.unread // entry.page_bytes if entry.page_bytes else 0
        rate = self.prefill_tokens_per_s
        if rate is None or entry.unread <= 0 or entry.tokens <= 0:
            return Decision(True, pages_left)
        ahead = self.writes_ahead()
        for j, e in self._inflight.items():
            ahead += e.unread
            if j == job:
                break
        bw = None if entry.probe else self._bytes_per_s  # a probe tests the estimate: not weighed on it
        load_s = ahead / bw if bw else 0.0
        recompute_s = entry.tokens * entry.unread / entry.total / rate
        # The load is held to the recompute time the whole of it was weighed against when it was admitted.
        deadline = entry.submitted + entry.tokens / rate * self.margin
        late = self._clock() + load_s > deadline
        return Decision(load_s <= recompute_s * self.margin and not late, pages_left, load_s, recompute_s)

    def disk_pays(self, disk_pages: int, page_bytes: int, block_tokens: int, *, probing: bool = False) -> Decision:
        """Whether ``disk_pages`` pages (``page_bytes`` each, ``block_tokens`` tokens each) should be read.

        Where they do not, and the estimate is due a probe (see the module),
        the decision is a probe of the first ``probe_pages`` of them; the
        caller passes ``probe=True`` to :meth:`disk_submitted` for its reads.
        ``probing``: the request was let through as a probe and asks again
        (vLLM repeats the lookup of a request it could not schedule): it
        stays the probe while the estimate refuses.
        """
        if disk_pages <= 0:
            return Decision(True, 0)
        rate, bw = self.prefill_tokens_per_s, self._bytes_per_s
        if rate is None or bw is None:
            return Decision(True, disk_pages)  # nothing measured yet: load, as without a model
        load_s = (self.writes_ahead() + self.queue_bytes + disk_pages * page_bytes) / bw
        recompute_s = disk_pages * block_tokens / rate
        if load_s < recompute_s * self.margin:
            return Decision(True, disk_pages, load_s, recompute_s)
        if probing:
            return Decision(True, min(disk_pages, self.probe_pages), load_s, recompute_s, probe=True)
        now = self._clock()
        if not self._inflight and now - max(self._estimated_at, self._probed_at) >= self.probe_every_s:
            self._probed_at = now  # reads in flight measure the tier themselves: no probe beside them
            return Decision(True, min(disk_pages, self.probe_pages), load_s, recompute_s, probe=True)
        return Decision(False, disk_pages, load_s, recompute_s)
