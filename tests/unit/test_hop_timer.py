"""The hedging timer (broker/hop_timer.py) lists the requests whose current hop is late at
the tick where the old timer (one heap entry per hop sent) and a scan of every request list
them, while looking at far fewer entries than hops sent."""

from __future__ import annotations

import heapq
import random

from blockllm.broker.hop_timer import HopTimer


class OneEntryPerHop:
    """The timer as it was: every hop sent pushed, each popped once due."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, str]] = []
        self.pops = 0

    def sent(self, rid: str, now: float) -> None:
        heapq.heappush(self.heap, (now, rid))

    def due(self, now: float, deadline: float, current) -> list:
        out = []
        while self.heap and now - self.heap[0][0] >= deadline:
            at, rid = heapq.heappop(self.heap)
            self.pops += 1
            if current(rid) == at:
                out.append((rid, at))
        return out


def test_late_hops_are_the_ones_the_old_timer_and_a_scan_find() -> None:
    rng = random.Random(3)
    timer, old = HopTimer(), OneEntryPerHop()
    live: list[str] = []  # requests running
    current: dict[str, float] = {}  # request -> its current hop's send time
    listed: set[tuple[str, float]] = set()  # (request, send time) found late so far
    stuck: dict[str, float] = {}  # request -> until when its next hop waits (a late one)
    now, hops, late = 0.0, 0, 0
    ids = iter(range(10**9))
    for _ in range(3000):  # ticks, ~10 ms apart; hops every few ms per request (decode)
        while len(live) < 30:
            live.append(f"r{next(ids)}")
        for rid in [r for r in live if rng.random() < 0.01]:  # finished
            live.remove(rid)
            current.pop(rid, None)
        for _ in range(rng.randrange(0, 8)):
            now += rng.random() * 0.002
            for rid in live:
                if stuck.get(rid, 0.0) > now or rng.random() < 0.3:
                    continue
                if rng.random() < 0.004:  # its worker stalls for a while
                    stuck[rid] = now + rng.random() * 0.8
                current[rid] = now
                timer.sent(rid, now)
                old.sent(rid, now)
                hops += 1
        now += rng.random() * 0.02
        deadline = rng.choice((0.05, 0.1, 0.1, 0.3, 0.5))  # (it follows the workers' p50s)
        got = timer.due(now, deadline, current.get)
        assert got == old.due(now, deadline, current.get)  # (same order: hedges' order)
        scan = {(r, at) for r, at in current.items() if now - at >= deadline} - listed
        assert set(got) == scan
        listed |= scan
        late += len(got)
    assert late > 500 and hops > 40_000, (late, hops)
    assert timer.pops < old.pops / 4, (timer.pops, old.pops)
