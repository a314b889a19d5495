"""Micro-batch pipelining: a worker's running requests in about H groups, one per hop.

With R requests running over a route of H hops on H workers, a worker that runs all the
requests queued here in one step leaves the other workers idle meanwhile: all R travel
together and the workers take turns. Split into H groups of ceil(R / H), one group is at each
worker at any time: every worker computes while the others do. A step here takes at most one
group (`size`), and the compute loop waits for a group to fill (`wait_s`) only as long as a
step of the missing requests on their own would cost in fixed cost: the intercept `a` of this
worker's measured step times, fitted as a + k * items over its recent steps (with one batch
size seen so far, a fraction of the last step). H comes with each FORWARD (`Forward.hops`);
a broker that does not send it (0) means no groups.

Why H groups, no more and no fewer: a worker's cycle costs its own steps, G * a + k * R, and
a group's round trip costs every hop's step on R / G requests plus the transit o of each hop,
H * a + k * R * H / G + H * o. Fewer groups than hops idle the workers; more add a fixed cost
a per step while hiding only transit: with o < a (measured: transit ~1 ms, a step's fixed
cost ~10 ms on SmolLM2), H is the best count.
"""

from __future__ import annotations

import math
from collections import deque

FIT_STEPS = 64  # recent steps the fixed-cost fit uses


class Groups:
    """Compute thread only."""

    def __init__(self, fallback_fraction: float) -> None:
        self.fallback_fraction = fallback_fraction
        self.hops: dict[str, int] = {}  # running request -> hops of its route (FORWARD)
        self._steps: deque[tuple[int, float]] = deque(maxlen=FIT_STEPS)  # (items, seconds)

    def on_forward(self, request_id: str, hops: int) -> None:
        self.hops[request_id] = hops

    def forget(self, request_id: str) -> None:
        self.hops.pop(request_id, None)

    def clear(self) -> None:
        self.hops.clear()

    def size(self, running: int) -> int | None:
        """Items per step for `running` requests here: ceil(running / H), None (no limit) when
        the routes have one hop or fewer than two requests run."""
        h = max(self.hops.values(), default=0)
        if h < 2 or running < 2:
            return None
        return math.ceil(running / h)

    def on_step(self, items: int, seconds: float) -> None:
        self._steps.append((items, seconds))

    def fixed_cost_s(self) -> float | None:
        """The intercept of step seconds over items (least squares over recent steps), within
        [0, the cheapest step]; None until two batch sizes were seen."""
        steps = list(self._steps)
        sizes = {b for b, _ in steps}
        if len(sizes) < 2:
            return None
        n = len(steps)
        mb = sum(b for b, _ in steps) / n
        ms = sum(s for _, s in steps) / n
        var = sum((b - mb) ** 2 for b, _ in steps)
        k = sum((b - mb) * (s - ms) for b, s in steps) / var
        return min(max(ms - k * mb, 0.0), min(s for _, s in steps))

    def wait_s(self, last_step_s: float) -> float:
        """How long to wait for a group to fill: a step's fixed cost, as measured."""
        a = self.fixed_cost_s()
        return self.fallback_fraction * last_step_s if a is None else a
