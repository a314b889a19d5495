"""The broker process's garbage-collector policy (BrokerProc calls it; so does the scale
simulation, client/bench/scale_sim.py, so that its broker figures are taken under it).

The broker keeps a large, long-lived state (the models, the routing index and its cached edges,
the shown routes, STATS' kept entries, the running requests) and allocates a few objects per
message, most freed at once by reference counting. CPython's collector still walks the
long-lived state: a full collection visits every tracked object, and one starts inside whatever
message happened to allocate past the thresholds (at 2,020 models x 256 workers, with the
simulated cluster in the same process, 0.14 s inside a GENERATE). The policy:

- `start()`, once the process has built what it keeps for good (imports, tokenizers): freeze it
  (`gc.freeze`: out of every collection's reach; still freed by reference counting);
- after each full collection the collector ran by itself, its survivors (what the broker
  keeps) are frozen at the next `tick`: the next full collections walk only what was kept since;
- every `full_every_s` (default 10 minutes) at a `tick`: unfreeze, collect everything, freeze
  again: reference cycles among frozen objects that died since are reclaimed then, so memory
  stays bounded (one full collection's pause per period, `last_full_s`, instead of one every
  few seconds at some message's expense).

The youngest generations are left as CPython sets them: what they walk is what was allocated
since, whatever the size of the broker's state.
"""

from __future__ import annotations

import gc
import time
from typing import Any


class GcPolicy:
    """The broker's collector policy (module docstring). The broker's loop thread only."""

    def __init__(self, full_every_s: float = 600.0) -> None:
        self.full_every_s = full_every_s
        self._next_full: float | None = None
        self.started = False  # `tick` does nothing before `start` (a BrokerProc in a test)
        self._full_ran = False  # the collector ran a full collection since the last tick
        self.frozen = 0  # freezes after the collector's own full collections
        self.fulls = 0  # periodic full collections (`full_every_s`)
        self.last_full_s = 0.0  # CPU seconds of the last one

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info.get("generation") == 2:
            self._full_ran = True

    def start(self) -> None:
        """Freeze what is alive now and watch the collector's full collections."""
        gc.freeze()
        self.started = True
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def stop(self) -> None:
        """Stop watching and hand every frozen object back to the collector (a simulation
        ending in a process that goes on)."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        gc.unfreeze()
        self.started = False

    def tick(self, now: float) -> None:
        """Called at the broker's timer tick (`now`: its clock)."""
        if not self.started:
            return
        if self._next_full is None:
            self._next_full = now + self.full_every_s
        elif now >= self._next_full:
            self._next_full = now + self.full_every_s
            self.full()
            return
        if self._full_ran:
            self._full_ran = False
            self.frozen += 1
            gc.freeze()

    def full(self) -> None:
        """Collect everything, frozen objects included, and freeze the survivors."""
        t0 = time.process_time()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._full_ran = False
        self.fulls += 1
        self.last_full_s = time.process_time() - t0
