"""BatchQueue: a stage's bounded admission queue and its per-step batch former (pure logic).

A batch is formed from the queue in this order:
1. the oldest entry if it has been passed over `max_skips` times (no entry waits forever);
2. decodes (single-token entries) in FIFO order, while batch slots and the token budget last;
3. prefills in FIFO order while they fit (a prefill that does not fit is skipped, a later,
   smaller one may still go: the skipped one's skip count makes it first soon);
4. if still nothing was taken and nothing else runs in the stage this step, the oldest entry
   alone, however long: at least one entry always progresses.
Entries are opaque to the queue; it only knows each one's token count.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from blockllm.worker.errors import QueueFull

E = TypeVar("E")


@dataclass(slots=True)
class _Slot(Generic[E]):
    entry: E
    n_tokens: int
    skips: int = 0


class BatchQueue(Generic[E]):
    """Bounded FIFO of one stage. Not thread-safe: the compute thread owns it."""

    def __init__(
        self, capacity: int, max_batch_size: int, max_batch_tokens: int, max_skips: int = 4
    ) -> None:
        if capacity < 1 or max_batch_size < 1 or max_batch_tokens < 1 or max_skips < 0:
            raise ValueError("queue capacity, batch size and token budget must be >= 1")
        self.capacity = capacity
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_skips = max_skips
        self._slots: deque[_Slot[E]] = deque()

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self._slots)

    def entries(self) -> list[E]:
        """Queued entries, oldest first (a snapshot)."""
        return [s.entry for s in self._slots]

    def push(self, entry: E, n_tokens: int) -> None:
        """Append `entry` (with `n_tokens` new tokens); QueueFull when at capacity."""
        if n_tokens < 1:
            raise ValueError("an entry carries at least one token")
        if len(self._slots) >= self.capacity:
            raise QueueFull(f"stage queue full ({self.capacity} queued)")
        self._slots.append(_Slot(entry, n_tokens))

    def remove_if(self, pred: Callable[[E], bool]) -> list[E]:
        """Drop and return the entries for which `pred(entry)` is true."""
        dropped = [s.entry for s in self._slots if pred(s.entry)]
        if dropped:
            self._slots = deque(s for s in self._slots if not pred(s.entry))
        return dropped

    def take(self, busy_size: int = 0, busy_tokens: int = 0, limit: int | None = None) -> list[E]:
        """Remove and return the next batch; `busy_*` = what already runs in this stage now;
        `limit`: at most this many items in all (below `max_batch_size`; a pipelining group).

        The batch lists decodes first, then prefills, each in arrival order.
        """
        cap = self.max_batch_size if limit is None else min(limit, self.max_batch_size)
        slots = cap - busy_size
        budget = self.max_batch_tokens - busy_tokens
        queued = list(self._slots)
        chosen: set[int] = set()  # indices into `queued`

        def choose(i: int) -> None:
            nonlocal budget
            chosen.add(i)
            budget -= queued[i].n_tokens

        if queued and queued[0].skips >= self.max_skips and slots > 0:
            choose(0)
        for want_decode in (True, False):
            for i, s in enumerate(queued):
                if i in chosen or (s.n_tokens == 1) != want_decode:
                    continue
                if len(chosen) < slots and s.n_tokens <= budget:
                    choose(i)
        if not chosen and busy_size == 0 and queued:
            choose(0)
        self._slots = deque(s for i, s in enumerate(queued) if i not in chosen)
        for s in self._slots:
            s.skips += 1
        order = sorted(chosen, key=lambda i: (queued[i].n_tokens != 1, i))
        return [queued[i].entry for i in order]
