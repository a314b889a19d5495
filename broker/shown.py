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
  per worker at each build, and the models whose route could use that worker recomputed;
- the planner's routes of the model (SET_ROUTES): compared per model at each build;
- the model's spec (a reload that changed it), compared per model; the models' stage keys
  (reload, SET_CHAIN: `keys_gen`): when they changed, everything is recomputed; a model gone
  is forgotten (a new one has nothing cached: arriving tenants recompute only themselves).
`tests/unit/test_status_cache.py` pins a cached build to a build from scratch after changes,
`tests/unit/test_stats_exact.py` over a random trace.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

from blockllm.broker.protocol import PlannedHop, Substitution
from blockllm.broker.routing import Hop
from blockllm.broker.stage_index import LiveViews

if TYPE_CHECKING:
    from blockllm.broker.state import BrokerState

RouteFn = Callable[..., "list[Hop] | None"]  # RequestFlow.route
Shown = tuple[tuple[PlannedHop, ...] | None, tuple[Substitution, ...]]


class ShownRoutes:
    """Per model: (route shown, substitutions), and what they were computed from (module
    docstring). Broker loop thread only; one per BrokerState (`shown`), the routing index's
    reader of dropped models. `scratch=True`: a cache for one build from scratch, which leaves
    the index's drops to that one (tests compare the two)."""

    def __init__(self, scratch: bool = False) -> None:
        self.scratch = scratch
        # model -> (shown, the planner's routes and the spec it was computed with, whether
        # the route shown is a planned one)
        self._shown: dict[str, tuple[Shown, Any, Any, bool]] = {}
        self._users: dict[Hashable, set[str]] = {}  # worker -> models whose route may use it
        self._seen: dict[Hashable, tuple[str, bool]] = {}  # worker -> (name, banned)
        self._named: dict[str, set[str]] = {}  # worker name -> models planned through it
        self._figures: dict[str, tuple[Any, ...]] = {}  # name -> (peer, banned, live keys)
        self._keys_gen = -1
        self._any_banned = False  # some worker is banned (refresh)
        self.computed = 0  # routes computed (tests, benches)

    def refresh(self, b: BrokerState, now: float) -> None:
        """Forget what changed since the last build (call once before a build's entries)."""
        if self.scratch:
            every, dropped = False, set()
        else:
            every, dropped = b.stage_index.take_shown(b.workers, b.keys_gen)
        if every or self._keys_gen != b.keys_gen:
            self._keys_gen = b.keys_gen
            self._shown.clear()
            self._users.clear()
            self._named.clear()
        if len(self._shown) > len(b.models) or any(m not in b.models for m in dropped):
            self._shown = {m: v for m, v in self._shown.items() if m in b.models}
        for model in dropped:
            cached = self._shown.get(model)
            if cached is not None and not cached[3]:  # a planned route: its workers say
                del self._shown[model]
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

    def _forget(self, models: Iterable[str]) -> None:
        for model in models:
            self._shown.pop(model, None)

    def get(self, b: BrokerState, route_of: RouteFn, name: str) -> Shown:
        """`name`'s (route shown, substitutions). `route_of(model, views, idle=True)`: the
        route with every view's load 0 and no request running (RequestFlow.route)."""
        preferred = b.preferred.get(name)
        spec = b.models[name]
        cached = self._shown.get(name)
        if (
            cached is not None
            and cached[2] is spec
            and (cached[1] is preferred or cached[1] == preferred)
        ):
            return cached[0]
        route, planned = self._route(b, route_of, name, preferred)
        shown = (route, tuple(b.substitutions(name)))
        self._shown[name] = (shown, preferred, spec, planned)
        self.computed += 1
        named = {h.worker for r in preferred or () for h in r.hops}
        for worker in named:
            self._named.setdefault(worker, set()).add(name)
        if planned:
            return shown
        users = b.stage_index.peers_of(name, spec.chain_len, b.workers, b.keys_gen, b.key_of)
        names = b.names()
        users |= {names[n] for n in named if n in names}
        for peer in users:
            self._users.setdefault(peer, set()).add(name)
        return shown

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
