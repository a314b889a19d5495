"""Speculative duplicates of stragglers: part of the Planner's policy (pure).

A worker is a straggler when its recent step latency (p50 over the last seconds, from its
heartbeats) is above `dup_step_ms`, or when it is `dup_factor` x slower than the median of the
other busy workers (and its step p50 above `dup_min_ms`), in every snapshot for
`dup_confirm_s`. "Slower" compares the per-stage pace (ms per forward per MiB of the stages it
ran, from the workers' `stage_step_ms`) when every busy worker reports it, else the step p50:
a worker running more stages per step is not slow for it. Then the stages the target placement
gives it are loaded on a healthy helper (the one needing the fewest new bytes, then the least
queued); once they are there, every planned route through the straggler gets a twin through
the helper, and the straggler's routes keep only `probe_weight` of the new requests (enough to
see it recover); running requests move at their next step (SET_ROUTES with move_running) only
when it is `dup_move_factor` x slower or over `dup_step_ms` (a move is a replay-prefill; a
mildly slow worker finishes what it runs). When the straggler
has been healthy for `dup_hold_s`, the twins go, and the planner unloads the helper's
duplicate stages the target does not need.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from blockllm.broker.planner.config import PlannerConfig
from blockllm.broker.planner.inputs import resident_blocks
from blockllm.broker.protocol import Message, PlannedHop, PlannedRoute, SetRoutes

if TYPE_CHECKING:
    from blockllm.broker.planner.facts import WorkerFacts
    from blockllm.broker.planner.planner import Planner

logger = logging.getLogger(__name__)

Key = tuple[str, str]


@dataclass
class Dup:
    """The duplicate of one straggler's stages on a helper."""

    slow: str
    helper: str
    stages: dict[Key, tuple[str, int, int]] = field(default_factory=dict)  # on the helper
    # the routes through the straggler when there is no target placement (from the stats)
    base_routes: dict[str, PlannedRoute] = field(default_factory=dict)
    since: float = 0.0
    routed: bool = False
    healthy_since: float | None = None


def pace(w: WorkerFacts) -> tuple[float, float] | None:
    """(forward pace, step pace) of a worker from its per-stage facts, or None without them:
    ms per MiB of the stages that ran lately, of their forwards (`stage_step_ms`: compute) and
    of the whole step (step p50: also what happens between forwards). Unlike the step time,
    neither grows with the number of stages a worker runs, so workers with different stages
    compare."""
    ran = [(ms, w.stages[k].nbytes) for k, ms in w.stage_ms.items() if k in w.stages and ms > 0]
    mib = sum(b for _, b in ran) / 2**20
    if mib <= 0:
        return None
    return sum(ms for ms, _ in ran) / mib, w.step_ms_p50 / mib


def slowness(workers: Mapping[str, WorkerFacts], cfg: PlannerConfig) -> dict[str, float]:
    """How many times slower than the median of the other busy workers each busy worker is
    (math.inf: its step p50 is over `dup_step_ms`): by `pace` (the larger of the forward and
    the step ratio) when every busy worker reports per-stage facts, else by step p50."""
    busy = {n: w for n, w in workers.items() if w.step_ms_p50 > 0}
    paces = {n: pace(w) for n, w in busy.items()}
    if paces and all(p is not None for p in paces.values()):
        figures = [{n: p[i] for n, p in paces.items() if p} for i in (0, 1)]
    else:
        figures = [{n: w.step_ms_p50 for n, w in busy.items()}]
    out: dict[str, float] = {}
    for name, w in busy.items():
        if cfg.dup_step_ms > 0 and w.step_ms_p50 > cfg.dup_step_ms:
            out[name] = math.inf
        elif w.step_ms_p50 > cfg.dup_min_ms:
            ratios = [_ratio(f, name) for f in figures]
            if any(r is not None for r in ratios):
                out[name] = max(r for r in ratios if r is not None)
    return out


def _ratio(figure: Mapping[str, float], name: str) -> float | None:
    others = [v for n, v in figure.items() if n != name and v > 0]
    return figure[name] / statistics.median(others) if others else None


def stragglers(workers: Mapping[str, WorkerFacts], cfg: PlannerConfig) -> set[str]:
    """Names of the workers whose recent latency marks them as stragglers (`slowness`)."""
    return {n for n, x in slowness(workers, cfg).items() if x > cfg.dup_factor}


class Duplicates:
    """Duplicates being launched, serving, or retired (Planner's loop only)."""

    def __init__(self, cfg: PlannerConfig) -> None:
        self.cfg = cfg
        self.active: dict[str, Dup] = {}
        self.launched = 0
        self.retired = 0
        self.strikes: dict[str, int] = {}  # times each worker was found straggling
        self.retried: set[str] = set()  # stragglers given another chance: re-place them
        self.slow_since: dict[str, float] = {}  # found slow in every snapshot since
        self.slowness: dict[str, float] = {}  # of the last snapshot (`slowness`)
        self.no_helper: set[str] = set()  # stragglers no worker has room for (spawn.py)

    @property
    def slow(self) -> set[str]:
        return set(self.active)

    def stage_keys(self) -> set[Key]:
        return {k for d in self.active.values() for k in d.stages}

    def step(
        self,
        planner: Planner,
        workers: Mapping[str, WorkerFacts],
        routes: Mapping[str, PlannedRoute],
        now: float,
    ) -> list[Message]:
        """Commands for one snapshot; `routes`: each model's current route (from the stats)."""
        if not self.cfg.duplicates:
            return []
        self.slowness = slowness(workers, self.cfg)
        slow_now = {n for n, x in self.slowness.items() if x > self.cfg.dup_factor}
        for name in set(self.slow_since) - slow_now:
            del self.slow_since[name]
        self.no_helper &= slow_now - set(self.active)
        out: list[Message] = []
        resident: dict[str, set[str]] = {}  # per helper, once per snapshot (many may launch)
        for name in sorted(slow_now - set(self.active)):
            # a slow snapshot or two (a GC pause, a neighbour's burst) launches nothing
            since = self.slow_since.setdefault(name, now)
            if now - since >= self.cfg.dup_confirm_s:
                self._launch(planner, workers, routes, name, now, resident)
        changed = False
        moves: list[bool] = []  # per duplicate routed now: whether running requests move
        for dup in list(self.active.values()):
            if dup.slow not in workers or dup.helper not in workers:
                del self.active[dup.slow]  # a lost worker: the re-placement takes over
                changed = True
                continue
            out += self._progress(planner, workers, dup, now, moves)
            changed |= self._maybe_retire(dup, workers, slow_now, now)
        if changed or moves:  # one SET_ROUTES, every model's routes, for all of them
            out.append(SetRoutes(planner.command_id(), planner.routes(), any(moves)))
        return out

    def _launch(
        self,
        planner: Planner,
        workers: Mapping[str, WorkerFacts],
        routes: Mapping[str, PlannedRoute],
        slow: str,
        now: float,
        resident_of: dict[str, set[str]],
    ) -> None:
        if planner.target is not None:
            stages = list(planner.target.plan.stages.get(slow) or [])
        else:  # no placement of its own yet: what the straggler hosts now
            stages = [(s.model, s.start, s.end) for s in workers[slow].stages.values()]
        if not stages:
            return
        helpers = [w for n, w in workers.items() if n != slow and n not in self.active]
        best = None
        blocks = {b for owner, s, e in stages for b in tuple(planner.manifests[owner].chain)[s:e]}
        size = {b: _block_bytes(planner, b) for b in blocks}
        for w in helpers:
            resident = resident_of.get(w.name)
            if resident is None:
                resident = resident_of[w.name] = resident_blocks(planner.manifests, w)
            nbytes = sum(size[b] for b in blocks.difference(resident))
            if nbytes + w.weight_bytes > w.capacity:
                continue
            rank = (nbytes, w.queued, w.name)
            if best is None or rank < best[0]:
                best = (rank, w)
        if best is None:
            if slow not in self.no_helper:
                logger.warning("[planner] straggler %s: no worker can host a duplicate", slow)
            self.no_helper.add(slow)
            return
        self.no_helper.discard(slow)
        helper = best[1].name
        via = {m: r for m, r in routes.items() if any(h.worker == slow for h in r.hops)}
        dup = Dup(slow, helper, base_routes=via, since=now)
        for owner, s, e in stages:
            key = planner._key(owner, s, e)
            if key is not None:
                dup.stages[(helper, key)] = (owner, s, e)
        self.active[slow] = dup
        self.launched += 1
        logger.warning(
            "[planner] straggler %s (step p50 %.0f ms): duplicating %d stages on %s",
            slow,
            workers[slow].step_ms_p50,
            len(stages),
            helper,
        )

    def _progress(
        self,
        planner: Planner,
        workers: Mapping[str, WorkerFacts],
        dup: Dup,
        now: float,
        moves: list[bool],
    ) -> list[Message]:
        """Load the duplicate's missing stages; route through it once all are there (`moves`
        gets whether its running requests move: `step` sends the routes once per snapshot)."""
        hosted = set(workers[dup.helper].stages)
        missing = [k for k in dup.stages if k[1] not in hosted]
        out: list[Message] = []
        for k in missing:
            out += planner._load(k, dup.stages[k], workers, now)
        if not missing and not dup.routed:
            dup.routed = True
            move = self.slowness.get(dup.slow, 0.0) >= self.cfg.dup_move_factor
            logger.info(
                "[planner] duplicate of %s on %s serving (running requests %s)",
                dup.slow,
                dup.helper,
                "move" if move else "stay",
            )
            moves.append(move)
        return out

    def hold_s(self, worker: str) -> float:
        """How long a straggler stays set aside: doubling with every time it was found slow."""
        strikes = max(1, self.strikes.get(worker, 1))
        return min(self.cfg.dup_hold_s * 2 ** (strikes - 1), 64 * self.cfg.dup_hold_s)

    def _maybe_retire(
        self, dup: Dup, workers: Mapping[str, WorkerFacts], slow_now: set[str], now: float
    ) -> bool:
        if not workers[dup.slow].stages and now - dup.since >= self.hold_s(dup.slow):
            # a re-placement left it nothing to show its health with: give it another chance
            logger.info(
                "[planner] straggler %s set aside %.0f s: retrying it", dup.slow, now - dup.since
            )
            del self.active[dup.slow]
            self.retried.add(dup.slow)
            return True
        fresh = workers[dup.slow].step_ms_p50 > 0  # it ran steps lately (probe traffic)
        if dup.slow in slow_now or not fresh or not dup.routed:
            dup.healthy_since = None
            return False
        if dup.healthy_since is None:
            dup.healthy_since = now
        if now - dup.healthy_since < self.cfg.dup_hold_s:
            return False
        logger.info(
            "[planner] %s healthy again: retiring its duplicate on %s", dup.slow, dup.helper
        )
        del self.active[dup.slow]
        self.retired += 1
        return True

    def adjust(
        self, routes: dict[str, tuple[PlannedRoute, ...]]
    ) -> dict[str, tuple[PlannedRoute, ...]]:
        """Routes with a twin through the helper for every route through a routed straggler
        (the target's routes, or, for a model without any, the route it had at the launch)."""
        for dup in self.active.values():
            if not dup.routed:
                continue
            for model, route in dup.base_routes.items():
                routes.setdefault(model, (route,))
            for model, rs in list(routes.items()):
                new: list[PlannedRoute] = []
                for r in rs:
                    if all(h.worker != dup.slow for h in r.hops):
                        new.append(r)
                        continue
                    twin = _merge(
                        replace(h, worker=dup.helper) if h.worker == dup.slow else h for h in r.hops
                    )
                    new.append(replace(r, weight=r.weight * self.cfg.probe_weight))
                    if all(t.hops != twin for t in new):
                        new.append(PlannedRoute(twin, r.weight))
                routes[model] = tuple(new)
        return routes


def _merge(hops: Iterable[PlannedHop]) -> tuple[PlannedHop, ...]:
    """Consecutive hops on one worker become one hop (one message, one step)."""
    merged: list[PlannedHop] = []
    for h in hops:
        if merged and merged[-1].worker == h.worker:
            merged[-1] = PlannedHop(h.worker, (*merged[-1].spans, *h.spans))
        else:
            merged.append(h)
    return tuple(merged)


def _block_bytes(planner: Planner, block: str) -> int:
    """A block's size (from an index of the catalog: planner/owners.py)."""
    return planner.owners.nbytes(planner.manifests, block)
