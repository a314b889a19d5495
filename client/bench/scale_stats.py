"""The simulated broker loop's STATS (`blockllm bench scale`, client/bench/scale_sim.py): as the
broker process does (broker/stats_send.py), a snapshot is built on one turn of the loop and
encoded over the turns after it, at most about `stats_turn_s` each, the loop going on in
between (here: the events due at the same simulated time); its messages go to the planner's
StatsView on the turn that finishes them. Each turn's CPU time is measured, and the garbage
collector's within it (the Sim's `GcMeter`, client/bench/scale_gc.py: in this process it sweeps
the planner's and the simulated cluster's objects too, which a broker process does not hold).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from blockllm.broker import frames
from blockllm.broker.protocol import StatsDelta
from blockllm.broker.stats_delta import DeltaPublisher, StatsView

if TYPE_CHECKING:
    from blockllm.client.bench.scale_sim import Sim


class SimStats:
    """The broker's STATS in a Sim: `snapshot()` when one is due."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.seq = 0
        self.deltas = DeltaPublisher(sim.cfg.stats_full_every)
        self.view = StatsView()

    def snapshot(self) -> None:
        """The build: this turn; its encoding: `_turn` from the next on."""
        sim = self.sim
        t0, gc0 = time.process_time(), sim.gc_meter.spent
        body = sim.broker.stats(sim.now)
        build = time.process_time() - t0
        self.seq += 1
        encoding = self.deltas.start(self.seq, body)
        sim.at(sim.now, self._turn, encoding, [(build, sim.gc_meter.spent - gc0)])

    def _turn(self, encoding: Any, turns: list[tuple[float, float]]) -> None:
        """One turn of a snapshot's encoding; `turns`: each turn's CPU and GC time so far."""
        sim, c = self.sim, self.sim.c
        t0, gc0 = time.process_time(), sim.gc_meter.spent
        sent = encoding.step(sim.cfg.stats_turn_s or None)
        turns.append((time.process_time() - t0, sim.gc_meter.spent - gc0))
        if sent is None:
            sim.at(sim.now, self._turn, encoding, turns)
            return
        c.stats_build_s.append(turns[0][0])
        c.stats_turn_max_s.append(max(cpu for cpu, _gc in turns))
        c.stats_turn_max_less_gc_s.append(max(cpu - gc for cpu, gc in turns))
        c.stats_gc_s.append(max(gc for _cpu, gc in turns))
        c.stats_cpu_s.append(sum(cpu for cpu, _gc in turns))
        c.stats_turns.append(len(turns))
        body = None
        for msg, wire in sent:
            nbytes = len(wire[1])
            c.stats_bytes.append(nbytes)
            msg = frames.decode(wire)[0]  # what the planner's socket gives it
            if isinstance(msg, StatsDelta):
                c.delta_bytes.append(nbytes)
                body = self.view.apply(msg)
            else:
                c.full_bytes.append(nbytes)
                body = self.view.full(msg)
        c.stats_parts = max(c.stats_parts, len(sent))
        if body is not None:
            sim.on_stats(body)
