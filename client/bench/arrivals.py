"""When the requests of a trace arrive at a system (pure: no models, no sockets).

- open loop (`clients` None): at the trace's own Poisson times, whatever the system does;
- closed loop (`clients` C, `bench multitenant --saturate C`): C clients, each sending its next
  request the moment its last one finished (or failed), in trace order; the first C arrive at
  once. A request's `Outcome.arrival_s` is then the moment it was sent, so latency is what its
  client waited, and tokens / makespan is the system's capacity under that load.

Every in-process system (per_model, hf_generate, hf_batched) pulls its requests from one
`Arrivals`; the `blockllm` client replay does the same with C threads (systems.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from blockllm.client.bench.trace import Outcome, TraceRequest


class Arrivals:
    """The requests of `trace` as they arrive; `now` is seconds since the replay started."""

    def __init__(self, trace: Sequence[TraceRequest], clients: int | None = None) -> None:
        if clients is not None and clients < 1:
            raise ValueError(f"closed loop needs at least one client, got {clients}")
        self.clients = clients
        self.outcomes = [Outcome(r.index, r.model, r.arrival_s) for r in trace]
        self._pending = deque(zip(trace, self.outcomes, strict=True))
        self._credits = clients or 0  # closed loop: clients free to send their next request

    @property
    def closed(self) -> bool:
        return self.clients is not None

    def due(self, now: float) -> list[tuple[TraceRequest, Outcome]]:
        """The requests that have arrived by `now` and were not handed out yet."""
        out: list[tuple[TraceRequest, Outcome]] = []
        if self.closed:
            while self._credits and self._pending:
                req, o = self._pending.popleft()
                self._credits -= 1
                o.arrival_s = now
                out.append((req, o))
            return out
        while self._pending and self._pending[0][0].arrival_s <= now:
            out.append(self._pending.popleft())
        return out

    def finished(self, _outcome: Outcome) -> None:
        """A request handed out by `due` is over (done or failed): its client may send again."""
        if self.closed:
            self._credits += 1

    def next_at(self) -> float | None:
        """When the next request arrives on its own (open loop); None when none will before a
        request finishes (closed loop) or none is left."""
        if self.closed or not self._pending:
            return None
        return self._pending[0][0].arrival_s

    def exhausted(self) -> bool:
        """Every request has been handed out."""
        return not self._pending
