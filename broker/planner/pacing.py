"""LOAD_STAGEs ordered model by model (`load_order`) and paced per worker (`paced`): at most
`PlannerConfig.loads_in_flight` on their way to one worker; the rest are sent by later
snapshots as those arrive.

A worker queues a bounded number of stage loads (worker/loader.py: 64) and refuses the rest.
A cold start of thousands of tenants on a few workers made one placement of thousands of
stages for one worker; sent at once, most were refused, and the planner only learned of it
when each load timed out (`load_timeout_s`), then gave them up after `load_tries`: nothing
was covered (2,001 tenants on 4 workers, real processes: 0 covered after 6 minutes).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from blockllm.broker.protocol import PlannedRoute

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (worker, stage key)


def take_load(
    pending: dict[Key, tuple[float, int]], k: Key, stage: object, now: float, cfg: Any
) -> bool:
    """Whether `k`'s LOAD_STAGE goes now, noted in `pending` (resend at, tries): not while one
    is on its way (`cfg.load_timeout_s`); given up, logged, after `cfg.load_tries` tries."""
    retry_at, tries = pending.get(k, (0.0, 0))
    if now < retry_at or tries > cfg.load_tries:
        return False
    if tries == cfg.load_tries:
        logger.warning("[planner] giving up loading %s on %s", stage, k[0])
        pending[k] = (math.inf, tries + 1)
        return False
    pending[k] = (now + cfg.load_timeout_s, tries + 1)
    return True


def loads_on_way(pending: Mapping[Key, tuple[float, int]], now: float) -> Counter[str]:
    """LOAD_STAGEs sent and neither seen loaded nor timed out, per worker (`pending`: the
    planner's `pending_loads`, key -> (resend at, tries); inf = given up)."""
    return Counter(w for (w, _), (at, _) in pending.items() if now < at < math.inf)


def paced(
    pending: Mapping[Key, tuple[float, int]],
    k: Key,
    on_way: Counter[str],
    now: float,
    limit: int,
) -> bool:
    """True when sending `k`'s load now would be one more than `limit` on its way to its
    worker (a load of `k` already on its way is not a new one)."""
    at = pending.get(k, (0.0, 0))[0]
    return now >= at and on_way[k[0]] >= limit


def load_order(
    stage_keys: Mapping[Key, tuple[str, int, int]],
    routes: Mapping[str, tuple[PlannedRoute, ...]],
    key_of: Callable[[str, int, int], str | None],
    demand: Mapping[str, float],
) -> dict[Key, tuple[str, int, int]]:
    """`stage_keys` (a target's stages to load) reordered model by model, the most demanded
    first (then by name): each model's routed stages, the ones not listed yet, then any left.
    Loads go out in this order, so models become covered one after another while the rest
    load: in chain-position order, a shared last stage came last and nothing was covered
    until every stage was loaded."""
    out: dict[Key, tuple[str, int, int]] = {}
    for model in sorted(routes, key=lambda m: (-demand.get(m, 0.0), m)):
        for route in routes[model]:
            for hop in route.hops:
                for s, e in hop.spans:
                    k = (hop.worker, key_of(model, s, e) or "")
                    if k in stage_keys and k not in out:
                        out[k] = stage_keys[k]
    return out | {k: v for k, v in stage_keys.items() if k not in out}
