"""Which planned routes the planner sends (SET_ROUTES): only routes the broker can resolve.

The broker takes a planned route only when every hop's worker advertises, live and not
draining, the stage key of each of its spans (broker/rewire.py); otherwise it routes the model
by itself (its routing DP, the dearest path of a GENERATE). A new placement's stages load one
by one, so its routes are sent as they become hosted, per route, not all at once before or
after every load:
- a model whose target routes are all hosted gets exactly them;
- otherwise it gets those of them that are hosted, and keeps its previous routes that are
  still hosted (it is served through its old replicas while the new ones load);
- a route whose stage went away (unloaded, draining, its worker lost) is withdrawn;
- once the target is complete (every load done or given up), a model the target does not
  route (pinned, removed) keeps no routes, and one whose target routes are all unhosted (given
  up) keeps its previous hosted ones.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from blockllm.broker.protocol import PlannedRoute

KeyOf = Callable[[str, int, int], "str | None"]
Routes = dict[str, tuple[PlannedRoute, ...]]


def resolves(
    model: str, route: PlannedRoute, hosted: Mapping[str, Collection[str]], key: KeyOf
) -> bool:
    """Whether every hop's worker hosts the stage key of each of its spans for `model`."""
    for hop in route.hops:
        keys = hosted.get(hop.worker)
        if keys is None:
            return False
        for start, end in hop.spans:
            k = key(model, start, end)
            if k is None or k not in keys:
                return False
    return True


def routes_to_send(
    target: Mapping[str, tuple[PlannedRoute, ...]],
    previous: Mapping[str, tuple[PlannedRoute, ...]],
    hosted: Mapping[str, Collection[str]],
    key: KeyOf,
    complete: bool,
    trusted: Collection[str] = (),
) -> Routes:
    """The routes to send per model (module docstring). `target`: the target placement's
    routes; `previous`: what was sent last; `hosted`: worker -> the stage keys it serves new
    routes on (a snapshot's stages less the draining ones); `complete`: every load of the
    target is done or given up; `trusted`: models taken as they are, unchecked (their chain is
    assembled: the broker keys their spans by it), the target's once complete, else the
    previous."""
    out: Routes = {}
    for model in sorted(set(target) | set(previous)):
        want = target.get(model, ())
        before = previous.get(model, ())
        if model in trusted:
            got = want if complete else before
        else:
            ok = tuple(r for r in want if resolves(model, r, hosted, key))
            if ok and len(ok) == len(want):
                got = want
            elif complete and (ok or model not in target):
                got = ok
            else:
                old = tuple(r for r in before if r not in want and resolves(model, r, hosted, key))
                got = ok + old
        if got:
            out[model] = got
    return out


def spared(
    sent: Mapping[str, tuple[PlannedRoute, ...]],
    target: Mapping[str, tuple[PlannedRoute, ...]],
    key: KeyOf,
    coming: Callable[[str, str], bool],
) -> set[tuple[str, str]]:
    """(worker, stage key) of the sent routes that making room spares (planner.py
    `_make_room`): those of a model whose target routes are all on their way (`coming(worker,
    key)`: hosted, or its LOAD_STAGE sent and not waiting for room). Unloading one would leave
    the model to the broker's own routes over whatever pieces still cover it (2-4 hops for a
    chain that had one) until its new replica loads; once the target's routes are hosted they
    replace the old ones and the stage is no longer spared. A model whose new stages wait for
    room themselves (a cycle of moves could wait on each other) or were given up spares
    nothing: room is made as before (by coverage)."""
    out: set[tuple[str, str]] = set()
    for model, routes in sent.items():
        want = target.get(model, ())
        old = [r for r in routes if r not in want]
        if not want or not old or not all(_on_the_way(model, r, key, coming) for r in want):
            continue
        for r in old:
            for hop in r.hops:
                for start, end in hop.spans:
                    k = key(model, start, end)
                    if k is not None:
                        out.add((hop.worker, k))
    return out


def _on_the_way(model: str, route: PlannedRoute, key: KeyOf, coming: Callable) -> bool:
    for hop in route.hops:
        for start, end in hop.spans:
            k = key(model, start, end)
            if k is None or not coming(hop.worker, k):
                return False
    return True
