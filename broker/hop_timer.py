"""The hedging timer's record of sent hops: which requests' current hop has been out longer
than a deadline, found without a scan of every request and without one entry per hop sent.

A heap of (send time, request id) holds at most one entry per request: the send time of a hop
of it not yet looked at. A hop sent while the request has an entry pushes nothing; when the
entry comes due, a request whose current hop is that one is late; one whose hop moved on is
pushed again at its current hop's send time (due at once if that is past the deadline too).
So a request's current hop is found late at the first `due` call where it has been out for
the deadline, as with one entry per hop sent (and as a scan of every request would find it),
while the heap's work is one pop per request per deadline, not one per hop sent (a decode hop
lasts a few ms, the deadline half a second or more). Pinned by
`tests/unit/test_hop_timer.py` against that scan on a random trace.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class HopTimer:
    """Per request: when its current hop was sent (`sent`), and which are late (`due`)."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, str]] = []
        self.queued: dict[str, float] = {}  # request id -> the send time of its entry
        self.pops = 0  # entries looked at (tests, benches)

    def sent(self, rid: str, now: float) -> None:
        """A hop of request `rid` was sent at `now` (no earlier send time than its last)."""
        if rid not in self.queued:
            self.queued[rid] = now
            heapq.heappush(self.heap, (now, rid))

    def due(self, now: float, deadline: float, current: Callable[[str], float | None]) -> list:
        """[(request id, its current hop's send time)] of the requests whose current hop was
        sent `deadline` or longer ago and not listed before. `current(rid)`: the send time of
        its current hop, None for a request gone."""
        heap, queued = self.heap, self.queued
        out = []
        while heap and now - heap[0][0] >= deadline:
            at, rid = heapq.heappop(heap)
            self.pops += 1
            del queued[rid]
            cur = current(rid)
            if cur is None:
                continue
            if cur == at:
                out.append((rid, at))
            else:  # its hop moved on: looked at again when that one is due
                queued[rid] = cur
                heapq.heappush(heap, (cur, rid))
        return out

    def clear(self) -> None:
        self.heap.clear()
        self.queued.clear()
