"""The compute loop's share of a decode item's time (`bench pipeline --breakdown`).

A decode FORWARD is timed from the moment the IO thread has it ready (decoded, copied out:
`IOThread.arrived`) to the moment its RESULT is handed back to the IO thread:
  queue        ready -> the engine step that runs it starts (inbox wait, the step before it,
               gathering, submitting)
  compute      the batched forwards of that step (the engine's `forward_s`)
  step_python  the rest of that step (admission, batching, splitting: Python around torch)
  after_step   the step's end -> its RESULT queued for the IO thread (facts, messages)
The IO thread adds deserialise, handoff and serialise (worker/proc_io.py). Sums and counts go
out with the heartbeat facts (broker/timings.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from blockllm.broker.timings import Timings, clock

PENDING_MAX = 4096  # decode items submitted and not answered yet (a bound, never reached)


class StepClock:
    """Compute thread only (the IO thread fills `arrived`, a dict, and never reads it back)."""

    def __init__(self, arrived: dict[str, float]) -> None:
        self.arrived = arrived
        self.timings = Timings()
        self._pending: dict[str, float] = {}  # request id -> when it was ready

    def on_submit(self, request_id: str) -> None:
        """A FORWARD was submitted: keep its ready time if it was a timed (decode) one."""
        ready = self.arrived.pop(request_id, None)
        if ready is None:
            return
        if len(self._pending) >= PENDING_MAX:
            self._pending.clear()
        self._pending[request_id] = ready

    def on_step(self, t0: float, t1: float, compute_s: float, results: Iterable[Any]) -> set[str]:
        """A step from `t0` to `t1` whose forwards took `compute_s` finished `results`: their
        queue, compute and step overhead; returns the request ids of the timed ones."""
        timed = set()
        queued = 0.0
        for r in results:
            ready = self._pending.pop(r.request_id, None)
            if ready is not None:
                timed.add(r.request_id)
                queued += t0 - ready
        n = len(timed)
        if n:
            self.timings.add("queue", queued, n)
            self.timings.add("compute", compute_s * n, n)
            self.timings.add("step_python", (t1 - t0 - compute_s) * n, n)
            self.timings.count("steps")
        return timed

    def answered(self, step_end: float) -> None:
        """A timed item's RESULT was just queued for the IO thread."""
        self.timings.add("after_step", clock() - step_end)

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def clear(self) -> None:
        self._pending.clear()
