"""Cumulative time counters of one process: where a decode token's time goes, per phase.

Each process keeps named sums of seconds (and counts) of the phases a decode item passes
through it (a worker: deserialise, queue, compute, ...; the broker: decode, handle, send of a
RESULT), cheaply (two clock reads per phase). They travel as plain data: a worker's in its
HEARTBEAT facts (`Heartbeat.timings`), the broker's in STATUS (`"timings"`), and
`blockllm bench pipeline --breakdown` turns the differences between two reads into a per-token
table (client/bench/breakdown.py). The clock is `time.perf_counter` (monotonic, one clock for
all processes of a machine on Linux); only differences taken in one process are reported.

Names: `<phase>_s` is seconds, `<phase>_n` how many items (or messages) the sum covers.
"""

from __future__ import annotations

import time

clock = time.perf_counter


class Timings:
    """Named sums of seconds and counts; `add` from one thread, `snapshot` from any (a copy)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}

    def add(self, phase: str, seconds: float, n: int = 1) -> None:
        s = self._sums
        s[phase + "_s"] = s.get(phase + "_s", 0.0) + seconds
        s[phase + "_n"] = s.get(phase + "_n", 0) + n

    def count(self, name: str, n: int = 1) -> None:
        self._sums[name] = self._sums.get(name, 0) + n

    def snapshot(self) -> dict[str, float]:
        """A copy (safe to read while the owner adds: dict.copy holds the GIL throughout)."""
        return self._sums.copy()


def difference(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """`after - before` per name (names only in `after` count from 0)."""
    return {k: v - before.get(k, 0) for k, v in after.items()}
