"""The workload of ``dynkv bench load``: conversations, their prompts, the closed loop, the sizes of the caches.

Each conversation opens with a prefix of its own (``prefix_tokens``: a system
prompt, a document), then runs ``turns`` turns. A turn's prompt is the prefix,
every earlier user message and answer, and a new user message. Answers are
fixed: the history holds ``answer_tokens`` tokens drawn from the seed, and the
engine is asked for exactly that many (``ignore_eos``), so every engine of a
run sees the same prompts and does the same decode work whatever it samples.

:class:`ClosedLoop` sends them: at most ``concurrency`` requests in flight,
the next turn of a conversation only once its previous turn finished, ready
turns in the order they became ready. The first turns go out in a seeded
shuffled order, so a conversation comes back after the others had their
turn: once the working set (every conversation's last prompt) exceeds the
device cache, a returning conversation finds its prefix evicted, and only a
lower tier can spare its prefill.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

__all__ = ["ClosedLoop", "Sizes", "Workload", "plan_sizes"]


@dataclass(frozen=True)
class Workload:
    """What to send; token ids are drawn in ``[token_range[0], token_range[1])``."""

    conversations: int = 16
    turns: int = 3
    prefix_tokens: int = 1024
    user_tokens: int = 64
    answer_tokens: int = 32
    concurrency: int = 4
    seed: int = 0
    token_range: tuple[int, int] = (16, 1000)

    def __post_init__(self) -> None:
        for name in ("conversations", "turns", "user_tokens", "answer_tokens", "concurrency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')}={v!r}: expected an integer >= 1")
        if isinstance(self.prefix_tokens, bool) or not isinstance(self.prefix_tokens, int) or self.prefix_tokens < 0:
            raise ValueError(f"--prefix-tokens={self.prefix_tokens!r}: expected an integer >= 0")
        lo, hi = self.token_range
        if not 0 <= lo < hi:
            raise ValueError(f"token range {self.token_range}: expected 0 <= lo < hi")

    @property
    def num_requests(self) -> int:
        return self.conversations * self.turns

    def prompt_tokens(self, turn: int) -> int:
        """Length of every conversation's prompt at ``turn`` (0-based)."""
        return self.prefix_tokens + turn * (self.user_tokens + self.answer_tokens) + self.user_tokens

    @property
    def max_len(self) -> int:
        """Tokens of the longest request: the last turn's prompt and its answer."""
        return self.prompt_tokens(self.turns - 1) + self.answer_tokens

    def prompts(self) -> list[list[list[int]]]:
        """``prompts()[c][t]``: the token ids of conversation ``c``'s turn ``t`` (the same for every engine)."""
        rng = random.Random(self.seed)
        lo, hi = self.token_range

        def draw(n: int) -> list[int]:
            return [rng.randrange(lo, hi) for _ in range(n)]

        out = []
        for _ in range(self.conversations):
            history, turns = draw(self.prefix_tokens), []
            for _ in range(self.turns):
                prompt = history + draw(self.user_tokens)
                turns.append(prompt)
                history = prompt + draw(self.answer_tokens)
            out.append(turns)
        return out

    def first_order(self) -> list[int]:
        """The seeded order in which the conversations' first turns are sent."""
        order = list(range(self.conversations))
        random.Random(self.seed + 1).shuffle(order)
        return order


class ClosedLoop:
    """Which turn goes next: at most ``concurrency`` in flight, a conversation's turns one after the other."""

    def __init__(self, w: Workload) -> None:
        self.w = w
        self._ready: deque[tuple[int, int]] = deque((c, 0) for c in w.first_order())
        self.in_flight = 0
        self.finished = 0

    def take(self) -> tuple[int, int] | None:
        """``(conversation, turn)`` to send now, or None while the loop is full or nothing is ready."""
        if self.in_flight >= self.w.concurrency or not self._ready:
            return None
        self.in_flight += 1
        return self._ready.popleft()

    def done(self, conversation: int, turn: int) -> None:
        """The request of ``(conversation, turn)`` finished: its conversation's next turn is ready."""
        if self.in_flight <= 0:
            raise RuntimeError("done() without a request in flight")
        self.in_flight -= 1
        self.finished += 1
        if turn + 1 < self.w.turns:
            self._ready.append((conversation, turn + 1))

    @property
    def complete(self) -> bool:
        return self.finished == self.w.num_requests


@dataclass(frozen=True)
class Sizes:
    """Caches of a run in blocks (pages), from shares of the working set."""

    block_size: int
    page_bytes: int
    working_set_pages: int
    device_blocks: int
    host_pages: int
    disk_pages: int
    max_model_len: int


def plan_sizes(w: Workload, block_size: int, page_bytes: int, device_share: float, host_share: float,
               disk_share: float) -> Sizes:
    """Device cache, host tier and disk tier as shares of the working set (every conversation's longest request).

    The device cache must hold the blocks of ``concurrency`` longest requests
    at once (else vLLM preempts, and the run measures preemption): a share that
    gives less raises ``ValueError`` naming the smallest share that fits.
    """
    for name, v in (("--device-share", device_share), ("--host-share", host_share), ("--disk-share", disk_share)):
        if not v >= 0 or math.isinf(v):
            raise ValueError(f"{name}={v!r}: expected a finite share >= 0 of the working set")
    per_conv = math.ceil(w.max_len / block_size)
    ws = w.conversations * per_conv
    device = math.ceil(device_share * ws)
    need = w.concurrency * per_conv + 1
    if device < need:
        raise ValueError(f"--device-share={device_share:g} gives {device} device blocks, but {w.concurrency} requests "
                         f"of up to {per_conv} blocks run at once: give --device-share >= {need / ws:.3f} "
                         f"(working set {ws} blocks of {block_size} tokens), or lower --concurrency")
    host = math.ceil(host_share * ws)
    if host_share > 0 and host < 1:
        host = 1
    return Sizes(block_size, page_bytes, ws, device, host, math.ceil(disk_share * ws),
                 math.ceil((w.max_len + block_size) / block_size) * block_size)
