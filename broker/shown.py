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
- the live stages serving the model: the routing index (broker/stage_index.py) drops a model's
  cached edges when a stage it looked up went, came or was drained, and tells `take_shown`;
- a worker's name and whether it is banned (bans end with time): compared per worker at each
  build, and the models whose route could use that worker recomputed;
- the planner's routes of the model (SET_ROUTES): compared per model at each build;
- the model's spec (a reload that changed it), compared per model; the models' stage keys
  (reload, SET_CHAIN: `keys_gen`) and names: when they changed, everything is recomputed.
`tests/unit/test_status_cache.py` pins a cached build to a build from scratch after changes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
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
        # model -> (shown, the planner's routes and the spec it was computed with)
        self._shown: dict[str, tuple[Shown, Any, Any]] = {}
        self._users: dict[Hashable, set[str]] = {}  # worker -> models whose route may use it
        self._seen: dict[Hashable, tuple[str, bool]] = {}  # worker -> (name, banned)
        self._models: tuple[Any, int] = (None, -1)  # (the models' names, keys_gen)
        self.computed = 0  # routes computed (tests, benches)

    def refresh(self, b: BrokerState, now: float) -> None:
        """Forget what changed since the last build (call once before a build's entries)."""
        if self.scratch:
            every, dropped = False, set()
        else:
            every, dropped = b.stage_index.take_shown(b.workers, b.keys_gen)
        if every or self._models[1] != b.keys_gen or self._models[0] != b.models.keys():
            self._models = (set(b.models), b.keys_gen)
            self._shown.clear()
            self._users.clear()
        for model in dropped:
            self._shown.pop(model, None)
        for peer, w in b.workers.items():
            state = (w.name, w.banned(now))
            if self._seen.get(peer) != state:
                self._seen[peer] = state
                self._forget(peer)
        for peer in [p for p in self._seen if p not in b.workers]:
            del self._seen[peer]
            self._forget(peer)

    def _forget(self, peer: Hashable) -> None:
        for model in self._users.pop(peer, ()):
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
        shown = (self._route(b, route_of, name), tuple(b.substitutions(name)))
        self._shown[name] = (shown, preferred, spec)
        self.computed += 1
        users = b.stage_index.peers_of(name, spec.chain_len, b.workers, b.keys_gen, b.key_of)
        names = b.names()
        named = {h.worker for r in preferred or () for h in r.hops}
        users |= {names[n] for n in named if n in names}
        for peer in users:
            self._users.setdefault(peer, set()).add(name)
        return shown

    def _route(self, b: BrokerState, route_of: RouteFn, name: str) -> Any:
        seen = self._seen
        unbanned = LiveViews(b.workers, lambda p, w: not seen[p][1], loaded=False)
        route = route_of(name, unbanned, idle=True)
        if route is None:  # show the route banned workers give, if only bans are in the way
            everyone = LiveViews(b.workers, lambda p, w: True, loaded=False)
            route = route_of(name, everyone, idle=True)
        if route is None:
            return None
        return tuple(PlannedHop(b.workers[h.worker].name, tuple(h.spans)) for h in route)
