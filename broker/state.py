"""What the broker knows, in one object: the registries of workers and requests, the waiting
queue, counters and metrics, the models (zoo manifests) and the planner's inputs (preferred
routes, assembled chains). Pure: no sockets, no clock. The parts of the `Broker` (the request
flow, hedging, KV migration, commands) each receive this object and read and change it on the
broker's loop thread only.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from blockllm.broker.config import BrokerConfig
from blockllm.broker.hop_timer import HopTimer
from blockllm.broker.models import Catalog, ModelSpec
from blockllm.broker.protocol import Error, ErrorCode, Message, PlannedRoute, Substitution
from blockllm.broker.ratelog import few
from blockllm.broker.requests import RequestState, split_wire_id
from blockllm.broker.rewire import PlannedKeys, signature
from blockllm.broker.routing import Hop
from blockllm.broker.shown import ShownRoutes
from blockllm.broker.stage_index import StageIndex
from blockllm.broker.stats import Metrics, StatsEntries
from blockllm.broker.status import COUNTERS
from blockllm.broker.timings import Timings
from blockllm.broker.waiting import WaitQueue
from blockllm.broker.workers import Registry, WorkerState

logger = logging.getLogger(__name__)

StageKeyFn = Callable[[Any, int, int], str]


class Out(NamedTuple):
    """One message to send: to `peer` (a ROUTER identity), `msg`, then `frames` as they are."""

    peer: bytes
    msg: Message
    frames: tuple[Any, ...] = ()


def error_code(code: str) -> ErrorCode:
    """A protocol ErrorCode for a peer's code string (INTERNAL when it is not one)."""
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL


def _keyed(spec: ModelSpec | None) -> Any:
    """What a model's stage keys depend on (None: no model)."""
    m = None if spec is None else spec.manifest
    if m is None:
        return None if spec is None else (spec.name,)
    chain = tuple(getattr(m, "chain", ()))
    fingerprint = getattr(m, "fingerprint", "")
    config = None if fingerprint else getattr(m, "config", None)  # the family, if no fingerprint
    return chain, fingerprint, getattr(m, "tie_word_embeddings", False), config


class ChainView:
    """A manifest seen through an assembled chain (SET_CHAIN): what `stage_key` reads."""

    def __init__(self, manifest: Any, chain: tuple[str, ...]) -> None:
        self.chain = chain
        self.name = manifest.name
        self.fingerprint = getattr(manifest, "fingerprint", "")
        self.config = getattr(manifest, "config", {})
        self.tie_word_embeddings = getattr(manifest, "tie_word_embeddings", False)


class BrokerState:
    """Registries, queues and counters of one broker (its loop thread only)."""

    def __init__(
        self, cfg: BrokerConfig, catalog: Catalog, stage_key: StageKeyFn, now: float = 0.0
    ) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.stage_key = stage_key
        self.models: dict[str, ModelSpec] = {}
        self.workers: Registry = Registry()  # identity -> WorkerState
        self.stage_index = StageIndex(self.family_of)
        self.keys_gen = 0  # moves when stage keys of models may change (reload, SET_CHAIN)
        self.requests: dict[str, RequestState] = {}
        # request ids without a route, in arrival order, retried when woken (broker/waiting.py)
        self.waiting = WaitQueue(lambda rid: self.requests[rid].model)
        self.by_client: dict[tuple[bytes, str], str] = {}  # (client, its id) -> request id
        self.by_model: dict[str, set[str]] = {}  # model -> its request ids
        # model -> route signature -> its requests on that route (set_route keeps it; the
        # planned routes are chosen by it: broker/rewire.py)
        self.running: dict[str, Counter] = {}
        # (worker, stage key) -> the hops of routes that run it (set_route keeps it): a drain
        # ends once its stage is unused (broker/commands.py), with no scan of the requests
        self.using: dict[tuple[Any, str], int] = {}
        # (deadline, request id) of every request, earliest first: the timer pops the ones
        # past due instead of scanning every request (entries of finished ones are skipped)
        self.deadlines: list[tuple[float, str]] = []
        # the hops sent while hedging is on, at most one entry per request: the hedge timer
        # pops the ones older than its deadline instead of scanning every request
        # (broker/hop_timer.py, broker/hedge.py)
        self.sent = HopTimer()
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.metrics = Metrics()
        self.timings = Timings()  # the loop's phases of decode RESULTs (broker/timings.py)
        self.shutting_down = False
        self.ids = itertools.count(1)
        # SET_ROUTES: the planner's preferred routes per model; routes_gen bumps on every change,
        # move_gen is the last routes_gen that asked running requests to move
        self.preferred: dict[str, tuple[PlannedRoute, ...]] = {}
        self.planned_keys = PlannedKeys()  # their hops' stage keys, kept per model
        self.routes_gen = 0
        self.move_gen = 0
        self.chains: dict[str, tuple[str, ...]] = {}  # SET_CHAIN: assembled chains
        self.stats_endpoint = ""  # set by BrokerProc once its PUB socket is bound
        # model -> (start, end) -> its stage key (`key_of`): per model, so that a model that
        # changed or went is forgotten alone, and the cache stays one long-lived object (a
        # copy of it, 130,000 keys at 2,020 models, was walked by every young collection)
        self.key_cache: dict[str, dict[tuple[int, int], str | None]] = {}
        self.last_reload = now
        self.catalog_gen = 0  # reloads so far: the planner's catalog version
        self.shown = ShownRoutes()  # the routes STATUS and STATS show, cached (broker/shown.py)
        self.stats_entries = StatsEntries()  # STATS' model entries, kept (broker/stats.py)
        self.planner_notes: dict[str, str] = {}  # PLANNER_REPORT: model -> why uncovered
        self.planner_seen: float | None = None  # when the last PLANNER_REPORT came

    # -- peers -------------------------------------------------------------------------------
    def bad_message(self, peer: bytes, reason: str, now: float) -> list[Out]:
        """A message that failed to decode (or makes no sense here): count it, answer it."""
        self.counters["bad_messages"] += 1
        worker = self.workers.get(peer)
        if worker is not None:
            worker.touch(now, self.cfg.expiry_s)
        logger.debug("bad message from %r: %s", peer, reason)
        return [Out(peer, Error("", ErrorCode.BAD_REQUEST.value, reason[:200]))]

    def requests_on(self, peer: bytes, worker: WorkerState | None = None) -> list[RequestState]:
        """The requests whose route (or hedged attempt's) passes `peer`: found from the worker's
        reservations (every hop of a route reserves on its worker until released), not a scan
        of every request. `worker`: the peer's state when it has left the registry."""
        w = worker if worker is not None else self.workers.get(peer)
        if w is None:
            return []
        out = []
        for rid in dict.fromkeys(split_wire_id(wire)[0] for wire in w.inflight):
            r = self.requests.get(rid)
            if r is not None and peer in r.workers():
                out.append(r)
        return out

    def named(self, name: str) -> WorkerState | None:
        peer = self.names().get(name)
        return None if peer is None else self.workers.get(peer)

    def family_of(self, model: str) -> Any:
        """(fingerprint, chain length) of a model: stages of one family serve only its models;
        None for a model not in the catalog."""
        spec = self.models.get(model)
        if spec is None:
            return None
        return getattr(spec.manifest, "fingerprint", "") or None, spec.chain_len

    def names(self) -> dict[str, Any]:
        """Worker name -> peer (from the routing index; no scan)."""
        return self.stage_index.peers(self.workers, self.keys_gen)

    def add_request(self, req: RequestState) -> None:
        self.requests[req.rid] = req
        self.by_model.setdefault(req.model, set()).add(req.rid)
        heapq.heappush(self.deadlines, (req.deadline, req.rid))
        if len(self.deadlines) > 2 * len(self.requests) + 64:  # mostly finished ones: compact
            self.deadlines = [(d, r) for d, r in self.deadlines if r in self.requests]
            heapq.heapify(self.deadlines)

    def set_route(self, req: RequestState, route: list[Hop] | None) -> None:
        """Give the request `route` (None: none), counting the model's requests per route and
        the routes on each (worker, stage key)."""
        counts = self.running.get(req.model)
        if req.route:
            assert counts is not None
            sig = signature(req.route)
            counts[sig] -= 1
            if counts[sig] <= 0:
                del counts[sig]
                if not counts:
                    del self.running[req.model]
            self._use(req.route, -1)
        req.route = route
        if route:
            self.running.setdefault(req.model, Counter())[signature(route)] += 1
            self._use(route, 1)

    def _use(self, route: list[Hop], step: int) -> None:
        """Count `route`'s (worker, stage key) pairs up or down; a stage being drained that no
        route runs any more puts its worker on the drain timer's list (workers.Registry)."""
        using = self.using
        for hop in route:
            for key in hop.stage_keys:
                pair = (hop.worker, key)
                n = using.get(pair, 0) + step
                if n > 0:
                    using[pair] = n
                    continue
                using.pop(pair, None)
                w = self.workers.get(hop.worker)
                if w is not None and key in w.draining:
                    self.workers.drains.add(hop.worker)

    def hop_sent(self, req: RequestState, now: float) -> None:
        """The request's current hop was sent at `now` (what hedging measures lateness from)."""
        req.hop_sent_at = now
        if self.cfg.hedge_after_s > 0:
            self.sent.sent(req.rid, now)

    def past_deadline(self, now: float) -> list[RequestState]:
        """The requests whose deadline is `now` or earlier, earliest first (popped from the
        deadline heap: the cost is in the requests due and the finished ones skipped)."""
        due = []
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, rid = heapq.heappop(self.deadlines)
            req = self.requests.get(rid)
            if req is not None and req.deadline == deadline:
                due.append(req)
        return due

    def drop_request(self, req: RequestState) -> None:
        self.requests.pop(req.rid, None)
        rids = self.by_model.get(req.model)
        if rids is not None:
            rids.discard(req.rid)
            if not rids:
                del self.by_model[req.model]

    # -- models and chains -------------------------------------------------------------------
    def reload(self, now: float = 0.0) -> None:
        """Re-read the models (zoo manifests and tokenizers); requests keep the spec they had."""
        self.last_reload = now
        old = self.models
        self.catalog_gen += 1  # the planner re-reads its catalog (STATS "catalog_gen")
        try:
            self.models = dict(self.catalog())
        except Exception:  # a broken zoo must not take the broker down: keep the old view
            logger.exception("[models] reading the zoo failed; keeping %d models", len(self.models))
        # forget the stage keys of models that changed or went (and the None cached for a
        # name unknown until now); routes cached over keys are stale only in the first case
        # (a model that went changes no other model's keys: no `keys_gen`, which drops every
        # routing cache, for a tenant leaving)
        went = old.keys() - self.models.keys()
        changed = {
            n for n, spec in old.items() if n not in went and _keyed(self.models[n]) != _keyed(spec)
        }
        drop = changed | went | (self.models.keys() - old.keys())
        if drop:
            for name in drop:
                self.key_cache.pop(name, None)
            self.stage_index.forget(drop)
            self.planned_keys.forget(drop)
        if changed:
            self.keys_gen += 1
        logger.info("[models] %d: %s", len(self.models), few(sorted(self.models)) or "-")

    def reload_for(
        self, names: Sequence[str], now: float, want: str | None = None
    ) -> ModelSpec | None:
        """Re-read the zoo (rate-limited) when a name is unknown; the spec of `want` if any."""
        missing = [n for n in names if n not in self.models]
        if missing and now >= self.last_reload + self.cfg.reload_min_interval_s:
            self.reload(now)
        return self.models.get(want) if want is not None else None

    def key_of(self, model: str, start: int, end: int) -> str | None:
        """stage_key over the chain `model` is served with (its own, or the assembled one of
        SET_CHAIN), memoized; None for an unknown model or span."""
        keys = self.key_cache.get(model)
        if keys is None:
            keys = self.key_cache[model] = {}
        k = (start, end)
        if k not in keys:
            spec = self.models.get(model)
            manifest = None if spec is None else spec.manifest
            if manifest is not None and model in self.chains:
                manifest = ChainView(manifest, self.chains[model])
            try:
                keys[k] = None if spec is None else self.stage_key(manifest, start, end)
            except Exception:  # a span the model does not have
                keys[k] = None
        return keys[k]

    def own_key(self, spec: ModelSpec, start: int, end: int) -> str | None:
        """stage_key over the model's own chain (what a worker loading it computes)."""
        if spec.name not in self.chains:
            return self.key_of(spec.name, start, end)
        try:
            return self.stage_key(spec.manifest, start, end)
        except Exception:
            return None

    def set_chain(self, model: str, chain: tuple[str, ...]) -> None:
        """Serve `model` with `chain` (its own chain or () = exactly)."""
        own = tuple(getattr(self.models[model].manifest, "chain", ()))
        if not chain or chain == own:
            self.chains.pop(model, None)
        else:
            self.chains[model] = tuple(chain)
        self.key_cache.clear()
        self.keys_gen += 1

    def substitutions(self, model: str) -> list[Substitution]:
        """Positions where `model` is served by another block than its own, and whose it is."""
        chain = self.chains.get(model)
        spec = self.models.get(model)
        if not chain or spec is None:
            return []
        own = tuple(getattr(spec.manifest, "chain", ()))
        subs = []
        for pos, (mine, used) in enumerate(zip(own, chain, strict=False)):
            if mine != used:
                subs.append(Substitution(pos, used, self._owner(pos, used)))
        return subs

    def _owner(self, pos: int, block: str) -> str | None:
        """The first model (by name) whose own chain has `block` at `pos`."""
        for name, s in sorted(self.models.items()):
            if len(s.manifest.chain) > pos and s.manifest.chain[pos] == block:
                return name
        return None
