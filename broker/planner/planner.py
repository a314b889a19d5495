"""Planner: the cluster's policy, a pure control loop (no sockets, no clock; STYLE 7.1).

`Planner.on_stats(body, now)` takes one STATS snapshot of the broker (broker/stats.py) and
returns the commands to send it (broker/commands.py). It keeps a **target** placement
(planner/placement.py) and reconciles the cluster towards it:
1. **When to (re)plan**: a model not covered, a worker lost or joined, a model added or
   removed, or, at most every `replan_interval_s`, demand that changed the replicas each model
   should have. An idle cluster whose models are all covered keeps the placement it started
   with (no demand, nothing to improve). A re-placement for demand alone is made only when it
   cuts the estimated cost per token of the live routes by `min_gain` (plan.layout_cost:
   the busiest worker's batched work plus a fixed cost per hop): loads, unloads and moved
   requests are not free, and splitting tenants that share blocks over workers loses batching.
   After a lost worker only the replicas it had are re-placed (planner/replan.py), a full
   placement only when that leaves a model uncovered a full one would cover.
2. **Coverage first**: missing stages are loaded (LOAD_STAGE) within each worker's memory
   budget (room is not made from a sent route of a model whose new routes are loading); each
   planned route is sent (SET_ROUTES) once every stage it names is hosted, a model keeping its
   previous routes meanwhile (planner/hosted.py), and the assembled chains (SET_CHAIN) once
   every load is done; stages the target no longer has are unloaded
   (UNLOAD_STAGE, which the broker drains) last, so no model loses its route on the way.
3. **Stragglers** (planner/stragglers.py): a worker much slower than the others gets its stages
   duplicated on a healthy worker and its routes moved there (running requests move at their
   next step); the duplicate is retired once the worker is healthy again.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from blockllm.broker.planner.assembly import assemble
from blockllm.broker.planner.batching import BatchTuner, shared_keys
from blockllm.broker.planner.budgets import Room, removable
from blockllm.broker.planner.config import PlannerConfig
from blockllm.broker.planner.coverage import Coverage
from blockllm.broker.planner.facts import WorkerFacts, current_routes, live_routes
from blockllm.broker.planner.hosted import resolves, routes_to_send, spared
from blockllm.broker.planner.inputs import model_info, worker_info
from blockllm.broker.planner.owners import Owners
from blockllm.broker.planner.pacing import load_order, loads_on_way, paced, take_load
from blockllm.broker.planner.pins import pin_covered, pinned_keys
from blockllm.broker.planner.placement import (
    ModelInfo,
    Placement,
    placement_gain,
    replica_targets,
)
from blockllm.broker.planner.placement_index import Cluster
from blockllm.broker.planner.replan import DEMAND_REASONS, placement
from blockllm.broker.planner.spawn import SpawnPolicy
from blockllm.broker.planner.stragglers import Duplicates
from blockllm.broker.protocol import (
    LoadStage,
    Message,
    ModelStats,
    PlannedRoute,
    SetChain,
    SetRoutes,
    StatsBody,
    UnloadStage,
)
from blockllm.broker.ratelog import few
from blockllm.broker.routing import WorkerView, find_route

logger = logging.getLogger(__name__)

Catalog = Callable[[], tuple[Mapping[str, Any], list[Any]]]  # -> (manifests, equivalences)
Key = tuple[str, str]  # (worker name, stage key)


@dataclass
class Target:
    """The placement being applied, and how far it got."""

    plan: Placement
    workers: frozenset[str]
    models: frozenset[str]
    replicas: dict[str, int]
    chains: dict[str, tuple[str, ...]]
    at: float
    stage_keys: dict[Key, tuple[str, int, int]] = field(default_factory=dict)
    complete: bool = False  # every load done or given up (its chains sent)
    complete_at: float = 0.0
    refused: dict[str, frozenset[str]] = field(default_factory=dict)  # worker -> blocks
    state: Cluster | None = None  # the search state `plan` ends in (replan.py re-places from)


class Planner:
    """Policy of the cluster (module docstring). Feed it every STATS body; send what it returns.

    Single-threaded; never raises on a malformed snapshot entry (it is skipped and logged).
    """

    def __init__(self, cfg: PlannerConfig, catalog: Catalog) -> None:
        self.cfg = cfg
        self._catalog = catalog
        self.manifests: dict[str, Any] = {}
        self.owners = Owners()  # who can load a block; stage keys (memoized per catalog)
        self.equivalences: list[Any] = []
        self.demand: dict[str, float] = {}
        self.target: Target | None = None
        self.chains_sent: dict[str, tuple[str, ...]] = {}
        # the routes last sent, before the duplicates' twins (None: take the broker's)
        self.routes_sent: dict[str, tuple[PlannedRoute, ...]] | None = None
        self.hosted: dict[str, frozenset[str]] = {}  # worker -> keys new routes may use
        self.pending_loads: dict[Key, tuple[float, int]] = {}  # -> (retry at, tries)
        self.pending_unloads: dict[Key, float] = {}
        self.waiting_room: dict[Key, float] = {}  # loads waiting for memory, since when
        self.duplicates = Duplicates(cfg)
        self.spawns = SpawnPolicy(cfg)  # worker processes it may start (broker/planner/spawn.py)
        self.batching = BatchTuner(cfg)
        self._ids = itertools.count(1)
        self._last_time: float | None = None
        self._last_catalog = -math.inf
        self._catalog_gen: Any = None  # the broker's STATS "catalog_gen" the catalog is from
        self._hot_since: float | None = None
        self.replans = 0
        self.declined = 0  # demand re-placements not worth their cost (placement_gain)
        self.incremental = 0  # re-placements after a lost worker that moved only what it had
        self._declined_at = -math.inf

    def command_id(self) -> str:
        return f"p{next(self._ids)}"

    # -- the loop --------------------------------------------------------------------------
    def on_stats(self, body: StatsBody, now: float) -> list[Message]:
        """Commands for one snapshot (module docstring)."""
        workers = self._parse_workers(body)
        models = body.models
        self.hosted = {n: frozenset(w.stages).difference(w.draining) for n, w in workers.items()}
        if self.routes_sent is None:  # what the broker has (from a planner before this one)
            self.routes_sent = {n: m.planned_routes for n, m in models.items() if m.planned_routes}
        self._refresh_catalog(models, now, body.catalog_gen)
        self._update_demand(models, now)
        served = sorted(m for m in models if m in self.manifests)
        why = self._replan_reason(workers, models, served, now)
        out: list[Message] = []
        if why is not None:
            self._adopt(workers, served, now, why, models)
        if self.target is not None:
            out += self._reconcile(workers, now)
        out += self.duplicates.step(self, workers, current_routes(models), now)
        self.spawns.step(self, workers, models, served, now)  # actions: PlannerProc
        if self.cfg.batch_target_ms > 0:
            entries = {w.name: w for w in body.workers}
            shared = shared_keys(workers, self.manifests, self._key)
            out += self.batching.step(entries, shared, now, self.command_id)
        return out

    def _parse_workers(self, body: StatsBody) -> dict[str, WorkerFacts]:
        memory = self.cfg.worker_memory_bytes
        return {w.name: WorkerFacts.parse(w, memory) for w in body.workers}

    def _refresh_catalog(self, models: Mapping[str, ModelStats], now: float, gen: Any) -> None:
        """Re-read the catalog (rate-limited) on unseen models or a new STATS `catalog_gen`."""
        fresh = set(models) <= set(self.manifests) and self.manifests and gen == self._catalog_gen
        if fresh or now - self._last_catalog < self.cfg.catalog_interval_s:
            return
        self._last_catalog = now
        try:
            manifests, equivalences = self._catalog()
        except Exception as e:  # a zoo being written, a broker not answering: try again later
            logger.warning("[planner] reading the catalog failed: %s", e)
            return
        self.manifests, self.equivalences = dict(manifests), list(equivalences)
        self._catalog_gen = gen

    def _update_demand(self, models: Mapping[str, ModelStats], now: float) -> None:
        """Demand per model: tokens/s (and waiting requests), smoothed with a half-life."""
        dt = 0.0 if self._last_time is None else max(0.0, now - self._last_time)
        self._last_time = now
        keep = 0.5 ** (dt / self.cfg.demand_halflife_s) if dt else 0.0
        for name, m in models.items():
            seen = m.token_rate + m.waiting
            old = self.demand.get(name, seen)
            self.demand[name] = keep * old + (1 - keep) * seen
        for name in [n for n in self.demand if n not in models]:
            del self.demand[name]

    # -- planning ----------------------------------------------------------------------------
    def _hot(self) -> bool:
        return sum(self.demand.values()) >= self.cfg.min_demand

    def _settled(self, now: float) -> bool:
        """Demand has been at least `min_demand` for `settle_s` without a break."""
        if not self._hot():
            self._hot_since = None
            return False
        if self._hot_since is None:
            self._hot_since = now
        return now - self._hot_since >= self.cfg.settle_s

    def _replan_reason(
        self,
        workers: Mapping[str, WorkerFacts],
        models: Mapping[str, ModelStats],
        served: list[str],
        now: float,
    ) -> str | None:
        t = self.target
        uncovered = [m for m in served if m not in models or not models[m].covered]
        settled = self._settled(now)
        if not workers or not served:
            return None
        if self.duplicates.retried:
            self.duplicates.retried.clear()
            return "a straggler is retried"
        if t is None:
            if uncovered:
                return f"not covered: {few(uncovered)}"
            return "demand" if settled and self._may_reconsider(now) else None
        if t.workers != frozenset(workers):
            return "workers changed"
        refused = {w.name: w.refused for w in workers.values() if w.refused}
        if refused != t.refused:
            return "a worker cannot get some blocks"
        if t.models != frozenset(served):
            return "models changed"
        due = now - t.at >= self.cfg.replan_interval_s and settled and self._may_reconsider(now)
        if due and self._replica_targets(served, len(workers)) != t.replicas:
            return "demand changed"
        return None

    def _may_reconsider(self, now: float) -> bool:
        """A declined demand re-placement is looked at again only a replan interval later."""
        return now - self._declined_at >= self.cfg.replan_interval_s

    def _worth_it(
        self, infos: list[ModelInfo], plan: Placement, models: Mapping[str, ModelStats], now: float
    ) -> bool:
        """Whether a demand-driven placement is worth its loads, unloads and moves: it must cut
        the estimated cost per token of the live routes by `min_gain` (plan.layout_cost)."""
        gain = placement_gain(
            infos,
            live_routes(models),
            plan.routes,
            self.cfg.batch_exponent,
            self.cfg.hop_cost_bytes,
        )
        if gain >= self.cfg.min_gain:
            logger.info("[planner] re-placing: estimated cost -%.0f%%", 100 * gain)
            return True
        self.declined += 1
        self._declined_at = now
        logger.info(
            "[planner] keeping the placement: a new one would change the estimated cost by "
            "%+.0f%% (needs -%.0f%%)",
            -100 * gain,
            100 * self.cfg.min_gain,
        )
        return False

    def _replica_targets(self, served: list[str], n_workers: int) -> dict[str, int]:
        demand = self._demands(served)
        infos = [ModelInfo(m, (), (), demand=demand[m]) for m in served]
        targets = replica_targets(infos, n_workers)
        if not self.cfg.replicate:
            return dict.fromkeys(targets, 1)
        return targets

    def _demands(self, models: list[str]) -> dict[str, float]:
        hot = self._hot()  # once: it sums every model's demand
        return {m: self.demand.get(m, 0.0) if hot else 0.0 for m in models}

    def _adopt(
        self,
        workers: Mapping[str, WorkerFacts],
        served: list[str],
        now: float,
        why: str,
        models: Mapping[str, ModelStats] | None = None,
    ) -> None:
        chains = {m: assemble(self, m) for m in served}
        mine = [m for m in served if not pin_covered(self, m, workers)]  # pins.py
        demand = self._demands(mine)
        infos = [model_info(self.manifests, self.owners, m, chains[m], demand[m]) for m in mine]
        infos = [i for i in infos if i is not None]
        nodes = [
            worker_info(self.manifests, w)
            for w in workers.values()
            if w.name not in self.duplicates.slow
        ] or [worker_info(self.manifests, w) for w in workers.values()]
        plan, state = placement(self, infos, nodes, why)  # replan.py
        if why in DEMAND_REASONS and not self._worth_it(infos, plan, models or {}, now):
            return
        target = Target(
            plan=plan,
            workers=frozenset(workers),
            models=frozenset(served),
            replicas=self._replica_targets(served, len(workers)),
            chains={m: c for m, c in chains.items() if c != tuple(self.manifests[m].chain)},
            at=now,
            refused={w.name: w.refused for w in workers.values() if w.refused},
            state=state,
        )
        for w, stages in plan.stages.items():
            for owner, s, e in stages:
                key = self._key(owner, s, e)
                if key is not None:
                    target.stage_keys[(w, key)] = (owner, s, e)
        target.stage_keys = load_order(target.stage_keys, plan.routes, self._key, demand)
        self.target = target
        self.replans += 1
        hops = few(f"{m}:{len(r)}x{plan.hops(m)}" for m, r in sorted(plan.replicas.items()))
        logger.info("[planner] new placement (%s): replicas x hops %s", why, hops or "-")
        if plan.uncovered:
            logger.warning("[planner] cannot place %s within the budgets", few(plan.uncovered))

    def _key(self, model: str, start: int, end: int) -> str | None:
        return self.owners.key(self.manifests, model, start, end)  # memoized per catalog

    # -- reconciling ---------------------------------------------------------------------------
    def _reconcile(self, workers: Mapping[str, WorkerFacts], now: float) -> list[Message]:
        t = self.target
        assert t is not None
        have = {(w.name, k) for w in workers.values() for k in w.stages}
        for k in [k for k in self.pending_loads if k in have or k[0] not in workers]:
            del self.pending_loads[k]
        for k in [
            k for k in self.pending_unloads if k not in have or now >= self.pending_unloads[k]
        ]:
            del self.pending_unloads[k]
        out: list[Message] = []
        missing = [k for k in t.stage_keys if k not in have and k[0] in workers]
        room = Room(self.manifests, workers, self._loading())
        waiting: list[Key] = []
        on_way = loads_on_way(self.pending_loads, now)
        for k in missing:
            if room.fits(k[0], t.stage_keys[k]):
                self.waiting_room.pop(k, None)
                if paced(self.pending_loads, k, on_way, now, self.cfg.loads_in_flight):
                    continue  # a later snapshot sends it (pacing.py)
                room.take(k[0], t.stage_keys[k])
                sent = self._load(k, t.stage_keys[k], workers, now)
                on_way[k[0]] += len(sent)
                out += sent
            else:
                self.waiting_room.setdefault(k, now)
                waiting.append(k)
        if waiting:  # room is made once this snapshot's loads are sent (what is on its way)
            keep = set(t.stage_keys) | self.duplicates.stage_keys() | pinned_keys(workers)
            cov = Coverage(workers, self._key, self.manifests)
            spare = self._spared(have)
            for k in waiting:
                waited = now - self.waiting_room[k]
                out += self._make_room(workers[k[0]], cov, keep, spare, waited, now)
        given_up = [
            k for k in missing if self.pending_loads.get(k, (0, 0))[1] > self.cfg.load_tries
        ]
        if len(given_up) == len(missing) and not t.complete:
            out += self._send_chains(t)
            t.complete, t.complete_at = True, now
        unloads: list[Message] = []
        # superseded stages stay a while: the requests routed through them finish there
        if t.complete and not missing and now - t.complete_at >= self.cfg.unload_delay_s:
            unloads = self._unload_extra(workers, have, now)
        return out + self._send_routes(t) + unloads  # routes first, without what unloads

    def _loading(self) -> dict[str, list[tuple[str, int, int]]]:
        """Stages whose LOAD_STAGE is on its way, per worker (they will take memory)."""
        stages = dict(self.target.stage_keys) if self.target is not None else {}
        for d in self.duplicates.active.values():
            stages.update(d.stages)
        out: dict[str, list[tuple[str, int, int]]] = {}
        for k, (retry_at, _tries) in self.pending_loads.items():
            if k in stages and retry_at != math.inf:
                out.setdefault(k[0], []).append(stages[k])
        return out

    def _make_room(
        self,
        w: WorkerFacts,
        cov: Coverage,
        keep: set[Key],
        spare: set[Key],
        waited: float,
        now: float,
    ) -> list[Message]:
        """Unload stages of `w` the target does not keep (`keep`: the target's, the
        duplicates' and the pinned stages) so that a load fits (see budgets.py), none a
        covered model needs, nor one a sent route uses while its model's new routes are on
        their way (`spare`, hosted.py `spared`), unless the load waited long; `cov`: the
        snapshot's coverage."""
        t = self.target
        assert t is not None

        def covered_without(worker: str, key: str) -> bool:
            st = w.stages[key]  # only the models this stage serves can lose coverage
            return cov.still_covered(worker, key, st.start, st.end, t.models, st.model)

        force = waited >= self.cfg.load_timeout_s
        kept = keep if force else keep | spare
        out: list[Message] = []
        for key in removable(w, kept, set(self.pending_unloads), covered_without, force):
            self.pending_unloads[(w.name, key)] = now + self.cfg.drain_s + self.cfg.load_timeout_s
            logger.info("[planner] unload %s from %s to make room", w.stages[key], w.name)
            out.append(UnloadStage(key, w.name, self.command_id(), self.cfg.drain_s))
        return out

    def _spared(self, have: set[Key]) -> set[Key]:
        """The stages of sent routes that making room spares (hosted.py `spared`)."""
        t = self.target
        assert t is not None

        def coming(worker: str, key: str) -> bool:  # hosted, or loading (not waiting for room)
            if (worker, key) in have:
                return key in self.hosted.get(worker, ())  # live, not draining
            loading = self.pending_loads.get((worker, key), (math.inf, 0))[0] != math.inf
            return loading and (worker, key) not in self.waiting_room

        trusted = self._assembled()
        sent = {m: rs for m, rs in (self.routes_sent or {}).items() if m not in trusted}
        return spared(sent, t.plan.routes, self._key, coming)

    def _load(
        self, k: Key, stage: tuple[str, int, int], workers: Mapping[str, WorkerFacts], now: float
    ) -> list[Message]:
        if not take_load(self.pending_loads, k, stage, now, self.cfg):
            return []
        owner, s, e = stage
        logger.info("[planner] load %s:%d-%d on %s", owner, s, e, k[0])
        return [LoadStage(owner, s, e, 0, k[0], self.command_id())]

    def routes(self) -> dict[str, tuple[PlannedRoute, ...]]:
        """The routes sent with the duplicates' changes (what SET_ROUTES sends): of the
        duplicates' twins, only those the helper hosts."""
        out = {}
        trusted, hosted = self._assembled(), self._hosted()
        for model, rs in self.duplicates.adjust(dict(self.routes_sent or {})).items():
            if model not in trusted:
                rs = tuple(r for r in rs if resolves(model, r, hosted, self._key))
            if rs:
                out[model] = rs
        return out

    def _hosted(self) -> dict[str, frozenset[str]]:
        """The snapshot's live stages per worker, less those being unloaded (UNLOAD_STAGE sent)."""
        hosted = dict(self.hosted)
        for w, key in self.pending_unloads:
            if key in hosted.get(w, ()):
                hosted[w] = hosted[w] - {key}
        return hosted

    def _assembled(self) -> set[str]:
        """Models served through an assembled chain (the broker keys their spans by it)."""
        t = self.target
        return {m for m, c in self.chains_sent.items() if c} | set(t.chains if t else ())

    def _send_chains(self, t: Target) -> list[Message]:
        out: list[Message] = []
        for model in sorted(set(t.chains) | set(self.chains_sent)):
            chain = t.chains.get(model, ())
            if self.chains_sent.get(model, ()) != chain and model in self.manifests:
                out.append(SetChain(self.command_id(), model, chain))
                self.chains_sent[model] = chain
        return out

    def _send_routes(self, t: Target) -> list[Message]:
        """SET_ROUTES when the routes to send changed (planner/hosted.py)."""
        new = routes_to_send(
            t.plan.routes,
            self.routes_sent or {},
            self._hosted(),
            self._key,
            t.complete,
            self._assembled(),
        )
        if new == self.routes_sent:
            return []
        self.routes_sent = new
        return [SetRoutes(self.command_id(), self.routes(), False)]

    def _unload_extra(
        self, workers: Mapping[str, WorkerFacts], have: set[Key], now: float
    ) -> list[Message]:
        """Unload stages neither the target nor a duplicate needs, one model's cover kept. A
        stage with work queued is still in use (requests routed before the new routes): it
        goes once that traffic has left, rather than by draining (each move is a replay)."""
        t = self.target
        assert t is not None
        keep = set(t.stage_keys) | self.duplicates.stage_keys() | pinned_keys(workers)
        out: list[Message] = []
        for k in sorted(have - keep):
            w = workers[k[0]]
            if k in self.pending_unloads or k[1] in w.draining or w.queues.get(k[1], 0) > 0:
                continue
            self.pending_unloads[k] = now + self.cfg.drain_s + self.cfg.load_timeout_s
            logger.info("[planner] unload %s from %s", w.stages[k[1]], k[0])
            out.append(UnloadStage(k[1], k[0], self.command_id(), self.cfg.drain_s))
        return out

    def covered(self, model: str, workers: Mapping[str, WorkerFacts]) -> bool:
        """Whether `workers`' stages cover `model`'s own chain (routing as the broker does)."""
        m = self.manifests.get(model)
        if m is None:
            return False
        views = {w.name: WorkerView(list(w.stages.values())) for w in workers.values()}
        return find_route(model, len(m.chain), views, self._key) is not None
