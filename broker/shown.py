"""What a model's STATUS / STATS entry shows of routing, cached between builds.

A model's entry shows its route (`None`: not covered), its coverage and its chain's
substitutions. Finding a route is most of what a STATS body costs (0.7 s at 510 models on 64
workers when every model was routed for every body, twice a second, on the broker's loop), and
it changes only when what it is computed from changes. The route shown is the one a new request
would get from idle workers: the planner's preferred route with the highest weight that
resolves (the first listed on a tie), else the fewest hops, then the fewest stages, over the
workers not banned (over all of them when only bans are in the way). The workers' load and the
requests running on each planned route, which change with every step, are left out (routing
weighs them for each request), so the route shown stays put between two changes.

What it is computed from, and where a change is seen:
- a route shown that is one of the planner's routes (one resolved over the workers not
  banned) depends only on the workers those routes name: whether a worker has that name, is
  banned, and its live stage keys, compared per name at each build; the models naming a
  worker whose figures changed are recomputed (stages coming and going elsewhere are not
  looked at: a planned route that resolves wins over any other);
- otherwise, the live stages serving the model: the routing index (broker/stage_index.py)
  drops a model's cached edges when a stage it looked up went, came or was drained, and tells
  `take_shown`; and a worker's name and whether it is banned (bans end with time): compared
  per worker at each build, and the models whose route could use that worker recomputed.
  A route shown that is one worker's hop (`routing.best_solo`: that worker chains the model
  alone) is kept over the stage changes the index reports when they cannot change it: that
  worker's live stages are the same, no worker whose stages changed chains the model alone
  with as few stages, and none brings a second stage dtype (stages that went elsewhere cannot
  beat it). The workers whose live stages changed are found by comparing each one's at each
  build. Under the planner's loads this keeps most routes (at 510 x 64, 9 recomputed per
  build at the median instead of 97);
- the planner's routes of the model (SET_ROUTES): compared per model at each build;
- the model's spec (a reload that changed it), compared per model; the models' stage keys
  (reload, SET_CHAIN: `keys_gen`): when they changed, everything is recomputed; a model gone
  is forgotten (a new one has nothing cached: arriving tenants recompute only themselves).
`tests/unit/test_status_cache.py` pins a cached build to a build from scratch after changes,
`tests/unit/test_stats_exact.py` over a random trace.

Bounded per STATS build: a change above marks the model's route out of date (the models in
the order their inputs first changed); a STATS build recomputes at most `per_build` of them,
those never shown a route first (a tenant that just arrived, which has no previous route to
show), then those out of date longest first (BrokerConfig.stats_routes_per_build), and shows
the others' previous route marked stale (ModelStats.route_stale; a model never routed yet: no
route). So a build on the broker's loop costs at most that many routes however much the
cluster churns (the first placement's loads drop most models' routes at once), a new tenant's
route is shown in the first build after it arrives (unless more than `per_build` arrive at
once), and a model's route is at most ceil((out of date ahead of it + tenants arriving
meanwhile) / per_build) builds late. A STATUS answer (a page of at most 128
models, on a client's request) recomputes every out-of-date route it shows: what clients wait
on (coverage) is never stale.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

from blockllm.broker.protocol import PlannedHop, Substitution
from blockllm.broker.routing import Hop
from blockllm.broker.stage_index import LiveViews

if TYPE_CHECKING:
    from blockllm.broker.state import BrokerState

RouteFn = Callable[..., "list[Hop] | None"]  # RequestFlow.route
Shown = tuple[tuple[PlannedHop, ...] | None, tuple[Substitution, ...]]
NOT_YET: Shown = (None, ())  # what a model never routed yet shows while its route is stale


class ShownRoutes:
    """Per model: (route shown, substitutions), and what they were computed from (module
    docstring). Broker loop thread only; one per BrokerState (`shown`), the routing index's
    reader of dropped models. `scratch=True`: a cache for one build from scratch, which leaves
    the index's drops to that one (tests compare the two). A route out of date keeps its
    previous value in `_shown` until it is recomputed (stale meanwhile)."""

    def __init__(self, scratch: bool = False) -> None:
        self.scratch = scratch
        # model -> (shown, the planner's routes and the spec it was computed with, whether
        # the route shown is a planned one): the last computed, kept while out of date
        self._shown: dict[str, tuple[Shown, Any, Any, bool]] = {}
        # models whose route is out of date, in the order they became so (oldest first)
        self._dirty: dict[str, None] = {}
        self._due: set[str] | None = None  # those `get` recomputes now (None: every one)
        self._users: dict[Hashable, set[str]] = {}  # worker -> models whose route may use it
        self._seen: dict[Hashable, tuple[str, bool]] = {}  # worker -> (name, banned)
        self._named: dict[str, set[str]] = {}  # worker name -> models planned through it
        self._figures: dict[str, tuple[Any, ...]] = {}  # name -> (peer, banned, live keys)
        self._keys_gen = -1
        self._any_banned = False  # some worker is banned (refresh)
        # model -> (worker, its stages, the model's stage dtypes) of a route shown that is the
        # one hop `routing.best_solo` gives: kept over stage changes that cannot beat it
        self._solo: dict[str, tuple[Hashable, int, frozenset[str]]] = {}
        self._stages: dict[Hashable, Any] = {}  # worker -> its live stages at the last refresh
        self.computed = 0  # routes computed (tests, benches)

    def refresh(self, b: BrokerState, now: float, per_build: int | None = None) -> None:
        """Mark out of date what changed since the last build (call once before a build's
        entries); `per_build`: how many of those routes `get` recomputes in this build, the
        longest out of date first (None or <= 0: every one it is asked for)."""
        if self.scratch:
            every, dropped = False, set()
        else:
            every, dropped = b.stage_index.take_shown(b.workers, b.keys_gen)
        changed = self._changed_stages(b)
        if every or self._keys_gen != b.keys_gen:
            self._keys_gen = b.keys_gen
            self._forget(list(self._shown))
            self._users.clear()
            self._named.clear()
            self._solo.clear()
        if len(self._shown) > len(b.models) or any(m not in b.models for m in dropped):
            self._shown = {m: v for m, v in self._shown.items() if m in b.models}
            self._solo = {m: v for m, v in self._solo.items() if m in b.models}
        for model in dropped:
            cached = self._shown.get(model)
            if cached is None or cached[3]:  # a planned route: its workers say
                continue
            if model not in self._dirty and not self._still_solo(b, model, changed):
                self._dirty[model] = None
        for peer, w in b.workers.items():
            state = (w.name, w.banned(now))
            if self._seen.get(peer) != state:
                self._seen[peer] = state
                self._forget(self._users.pop(peer, ()))
        for peer in [p for p in self._seen if p not in b.workers]:
            del self._seen[peer]
            self._forget(self._users.pop(peer, ()))
        self._any_banned = any(banned for _name, banned in self._seen.values())
        figures = {}
        for name, peer in b.names().items():
            w = b.workers.get(peer)
            if w is not None:
                figures[name] = (peer, self._seen[peer][1], w.live_keys())
        for name, fig in figures.items():
            if self._figures.get(name) != fig:
                self._forget(self._named.pop(name, ()))
        for name in self._figures.keys() - figures.keys():
            self._forget(self._named.pop(name, ()))
        self._figures = figures
        dirty, shown, preferred = self._dirty, self._shown, b.preferred
        for name, spec in b.models.items():  # new models, a changed spec or planned routes
            cached = shown.get(name)
            if cached is None or cached[2] is not spec:
                dirty.setdefault(name)
            else:
                planned = preferred.get(name)
                if cached[1] is not planned and cached[1] != planned:
                    dirty.setdefault(name)
        if len(dirty) > len(b.models) or any(m not in b.models for m in dirty):
            self._dirty = dirty = {m: None for m in dirty if m in b.models}
        if per_build is None or per_build <= 0 or len(dirty) <= per_build:
            self._due = None
        else:
            self._due = set(self._due_first(dirty, per_build))

    def _due_first(self, dirty: dict[str, None], k: int) -> list[str]:
        """The `k` routes out of date a bounded build recomputes: those never shown first (a
        tenant that just arrived: no previous route to show), then the oldest out of date."""
        shown = self._shown
        due = [m for m in dirty if m not in shown][:k]
        if len(due) < k:
            due += itertools.islice((m for m in dirty if m in shown), k - len(due))
        return due

    def _changed_stages(self, b: BrokerState) -> Changes:
        """The workers whose live stages changed since the last refresh (came, went, were
        drained; a worker gone: no stages), with their live stages now."""
        seen, out = self._stages, {}
        for peer, w in b.workers.items():
            live = w.live_stages()
            old = seen.get(peer)
            if old is not live and old != live:
                seen[peer] = out[peer] = live
        if len(seen) > len(b.workers):
            for peer in [p for p in seen if p not in b.workers]:
                del seen[peer]
                out[peer] = ()
        return Changes(b, out)

    def _still_solo(self, b: BrokerState, model: str, changes: Changes) -> bool:
        """Whether `model`'s route shown, the one hop `best_solo` gave on worker X, is still
        what it gives after the stage changes `changes`: X's stages did not change (so X
        still chains the model alone, with the same hop), and no changed worker now chains it
        alone with as few stages (one with more cannot beat X: idle, the cost is the stages,
        then the worker's order) nor brings a second stage dtype (then routes are found per
        dtype). Stages that went elsewhere cannot beat X. A changed worker is looked at only
        when it has a stage at position 0 of the model's family serving it (the routing index
        builds a model's edges from its family's stages alone)."""
        solo = self._solo.get(model)
        if solo is None:
            return False
        worker, n, dtypes = solo
        if worker in changes.workers:
            return False
        dtypes = dtypes | changes.dtypes
        if len(dtypes) > 1:
            return False
        fam = b.family_of(model)
        chain_len = b.models[model].chain_len
        for found in (changes.starts.get(fam), changes.starts.get(None)):
            for stage, live in found or ():
                if b.key_of(model, 0, stage.end) == stage.key:
                    alone = stages_alone(b, model, chain_len, live)
                    if alone is not None and alone <= n:
                        return False
        self._solo[model] = (worker, n, dtypes)
        return True

    def _forget(self, models: Iterable[str]) -> None:
        """Mark the routes of `models` out of date (those already so keep their place)."""
        for model in models:
            if model in self._shown:
                self._dirty.setdefault(model)

    def get(self, b: BrokerState, route_of: RouteFn, name: str) -> tuple[Shown, bool]:
        """(`name`'s (route shown, substitutions), whether that is its previous route, out
        of date: stale). `route_of(model, views, idle=True)`: the route with every view's load
        0 and no request running (RequestFlow.route)."""
        if name not in self._dirty:
            return self._shown[name][0], False
        if self._due is not None and name not in self._due:
            cached = self._shown.get(name)
            return (NOT_YET if cached is None else cached[0]), True
        del self._dirty[name]
        self._solo.pop(name, None)  # (kept again by `_route` when it is best_solo's hop)
        preferred = b.preferred.get(name)
        spec = b.models[name]
        route, planned = self._route(b, route_of, name, preferred)
        shown = (route, tuple(b.substitutions(name)))
        old = self._shown.get(name)
        if old is not None and old[0] == shown:  # the same objects: kept entries and bytes
            shown = old[0]
        self._shown[name] = (shown, preferred, spec, planned)
        self.computed += 1
        named = {h.worker for r in preferred or () for h in r.hops}
        for worker in named:
            self._named.setdefault(worker, set()).add(name)
        if planned:
            return shown, False
        users = b.stage_index.peers_of(name, spec.chain_len, b.workers, b.keys_gen, b.key_of)
        names = b.names()
        users |= {names[n] for n in named if n in names}
        for peer in users:
            self._users.setdefault(peer, set()).add(name)
        return shown, False

    def _route(
        self, b: BrokerState, route_of: RouteFn, name: str, preferred: Any
    ) -> tuple[Any, bool]:
        """(the route shown, whether it is one of the planner's routes resolved over the
        workers not banned: then it depends on the workers they name alone, since a planned
        route that resolves is what `route_of` gives)."""
        seen = self._seen
        unbanned = LiveViews(b.workers, lambda p, w: not seen[p][1], loaded=False)
        route = route_of(name, unbanned, idle=True)
        first = route is not None
        if first and len(route) == 1 and not preferred:
            self._note_solo(b, name, route[0].worker)
        # show the route banned workers give, if only bans are in the way (with none banned,
        # those views are the same: no second search)
        if route is None and self._any_banned:
            everyone = LiveViews(b.workers, lambda p, w: True, loaded=False)
            route = route_of(name, everyone, idle=True)
        if route is None:
            return None, False
        shown = tuple(PlannedHop(b.workers[h.worker].name, tuple(h.spans)) for h in route)
        planned = first and any(r.hops == shown for r in preferred or ())
        return shown, planned

    def _note_solo(self, b: BrokerState, name: str, worker: Hashable) -> None:
        """Keep (worker, stages, dtypes) when the one hop on `worker` is `best_solo`'s: the
        model's stages are in one dtype at most and `worker` chains it alone."""
        spec = b.models[name]
        edges, solo = b.stage_index.solo(name, spec.chain_len, b.workers, b.keys_gen, b.key_of)
        for peer, n, _hops in solo or ():
            if peer == worker:
                dtypes = {st.dtype for found in edges.values() for _w, st in found} - {""}
                self._solo[name] = (worker, n, frozenset(dtypes))
                return


class Changes:
    """The workers whose live stages changed since the last refresh (`workers`: peer -> its
    live stages now), the stage dtypes they have (`dtypes`), and their stages at position 0
    by the family of the model each was loaded for (`starts`: family -> (stage, the worker's
    live stages); None: a model not in the catalog, looked at for every model)."""

    def __init__(self, b: BrokerState, workers: dict[Hashable, Any]) -> None:
        self.workers = workers
        self.dtypes = frozenset(s.dtype for live in workers.values() for s in live if s.dtype)
        self.starts: dict[Hashable, list[tuple[Any, Any]]] = {}
        for live in workers.values():
            for s in live:
                if s.start == 0:
                    self.starts.setdefault(b.family_of(s.model), []).append((s, live))


def stages_alone(b: BrokerState, model: str, chain_len: int, live: Iterable[Any]) -> int | None:
    """The fewest of the `live` stages (one worker's) that chain `model` whole, None when
    they do not. Only stages of the model's family (or of a model not in the catalog) are
    looked at: the routing index serves a model from those alone."""
    key_of, family_of, fam = b.key_of, b.family_of, b.family_of(model)
    spans = sorted(
        (s.start, s.end)
        for s in live
        if family_of(s.model) in (fam, None) and key_of(model, s.start, s.end) == s.key
    )
    fewest = {0: 0}
    for start, end in spans:  # by start: a span's start is reached before it is looked at
        if start in fewest and fewest[start] + 1 < fewest.get(end, chain_len + 1):
            fewest[end] = fewest[start] + 1
    return fewest.get(chain_len)
