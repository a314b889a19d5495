"""The broker process's garbage-collector policy (BrokerProc calls it; so does the scale
simulation, client/bench/scale_sim.py, so that its broker figures are taken under it).

The broker keeps a large, long-lived state (the models, the routing index and its cached edges,
the shown routes, STATS' kept entries, the running requests) and allocates a few objects per
message, most freed at once by reference counting. CPython's collector still walks the
long-lived state: a full collection visits every tracked object, and one starts inside whatever
message happened to allocate past the thresholds (at 2,020 models x 256 workers, with the
simulated cluster in the same process, 0.14 s inside a GENERATE). The policy:

- `start()`, once the process has built what it keeps for good (imports, tokenizers): freeze it
  (`gc.freeze`: out of every collection's reach; still freed by reference counting), and leave
  the oldest generation to the policy: the collector's own full collections are off (its third
  threshold out of reach), the youngest two generations collect as CPython sets them;
- `first_s` after the start (the cluster has registered, the first placement is loaded), then
  every `every_s`, at a `tick`: collect everything, frozen objects included, and freeze the
  survivors (`full`). Reference cycles that died, frozen or old, are reclaimed then, so memory
  stays bounded (by what the broker keeps plus the cycles one period leaves); the pause
  (`last_full_s`) is one full collection per period, at a tick rather than inside whatever
  message crossed the collector's thresholds.

Freezing after each of the collector's own full collections was tried and dropped: CPython
then counts only the unfrozen survivors as the long-lived heap, so the next full collection
comes after a quarter of that, ever sooner (59 of them in a 45 s simulation at 2,020 x 256).
What the youngest generations walk is what was allocated since, whatever the size of the
broker's state.
"""

from __future__ import annotations

import gc
import time

NO_FULL = 1 << 30  # the oldest generation's threshold while the policy runs: never reached


class GcPolicy:
    """The broker's collector policy (module docstring). The broker's loop thread only."""

    def __init__(self, first_s: float = 60.0, every_s: float = 600.0) -> None:
        self.first_s = first_s
        self.every_s = every_s
        self._next: float | None = None
        self.started = False  # `tick` does nothing before `start` (a BrokerProc in a test)
        self.fulls = 0  # full collections made (`full`)
        self.last_full_s = 0.0  # CPU seconds of the last one
        self._thresholds = gc.get_threshold()  # (put back by `stop`)

    def start(self) -> None:
        """Freeze what is alive now and turn the collector's own full collections off; `tick`
        makes them from then on."""
        gc.freeze()
        self._thresholds = gc.get_threshold()
        young, middle, _ = self._thresholds
        gc.set_threshold(young, middle, NO_FULL)
        self.started = True
        self._next = None

    def stop(self) -> None:
        """Hand every frozen object back to the collector and its thresholds back (a
        simulation ending in a process that goes on)."""
        gc.unfreeze()
        gc.set_threshold(*self._thresholds)
        self.started = False

    def tick(self, now: float) -> None:
        """Called at the broker's timer tick (`now`: its clock)."""
        if not self.started:
            return
        if self._next is None:
            self._next = now + self.first_s
        elif now >= self._next:
            self._next = now + self.every_s
            self.full()

    def full(self) -> None:
        """Collect everything, frozen objects included, and freeze the survivors."""
        t0 = time.process_time()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.fulls += 1
        self.last_full_s = time.process_time() - t0
