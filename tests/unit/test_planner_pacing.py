"""A cold start of many tenants on few workers (broker/planner/pacing.py): the real Planner fed
snapshots of workers that load a few stages per snapshot. It never has more than
`loads_in_flight` LOAD_STAGEs on their way to one worker (a worker refuses loads past its
queue), it sends every stage in the end, and tenants become covered one after another while
the rest load, not all at once at the end."""

from __future__ import annotations

from typing import Any

from blockllm.broker.planner.planner import Planner
from blockllm.broker.protocol import LoadStage
from blockllm.zoo.chain import stage_key
from tests.unit.test_planner import L, Manifest, cfg
from tests.unit.typed_bodies import stats

TENANTS = 60
BASE = Manifest("base", tuple(f"b{p}" for p in range(L + 2)))
MANIFESTS = {"base": BASE} | {  # each tenant owns one decoder layer: 1..L in turn
    f"t{i:02d}": Manifest(
        f"t{i:02d}", tuple(f"t{i}" if p == 1 + i % L else f"b{p}" for p in range(L + 2))
    )
    for i in range(TENANTS)
}
WORKERS = ("w0", "w1")
PER_SNAPSHOT = 5  # stages a worker finishes loading between two snapshots
LIMIT = 8


def _snapshot(hosted: dict[str, list[tuple[str, int, int]]]) -> Any:
    return stats(
        {
            "workers": [
                {
                    "name": w,
                    "stages": [
                        {"key": stage_key(MANIFESTS[m], s, e), "model": m, "start": s, "end": e}
                        for m, s, e in hosted[w]
                    ],
                    "memory_budget_bytes": 1 << 40,
                }
                for w in WORKERS
            ],
            "models": {m: {"covered": False, "token_rate": 0.0} for m in MANIFESTS},
        }
    )


def _covered(hosted: dict[str, list[tuple[str, int, int]]]) -> int:
    """Tenants whose every chain position is hosted by some worker (by block content)."""
    have = {
        MANIFESTS[m].chain[p]
        for stages in hosted.values()
        for m, s, e in stages
        for p in range(s, e)
    }
    return sum(set(man.chain) <= have for man in MANIFESTS.values())


def test_a_cold_start_paces_loads_per_worker_and_covers_tenants_one_after_another() -> None:
    p = Planner(cfg(loads_in_flight=LIMIT), lambda: (MANIFESTS, []))
    hosted: dict[str, list[tuple[str, int, int]]] = {w: [] for w in WORKERS}
    on_way: dict[str, list[LoadStage]] = {w: [] for w in WORKERS}
    covered_over_time: list[int] = []
    now = 0.0
    for _ in range(200):
        for cmd in p.on_stats(_snapshot(hosted), now):
            if isinstance(cmd, LoadStage):
                on_way[cmd.worker].append(cmd)
        for w in WORKERS:
            assert len(on_way[w]) <= LIMIT, f"{len(on_way[w])} loads on their way to {w}"
            done, on_way[w] = on_way[w][:PER_SNAPSHOT], on_way[w][PER_SNAPSHOT:]
            hosted[w] += [(c.model, c.start, c.end) for c in done]
        covered_over_time.append(_covered(hosted))
        now += 0.5
        if covered_over_time[-1] == len(MANIFESTS) and not any(on_way.values()):
            break
    assert covered_over_time[-1] == len(MANIFESTS), covered_over_time
    loads = sum(len(v) for v in hosted.values())
    assert loads > 3 * LIMIT  # the cap mattered: more stages than a few snapshots' worth
    # coverage grows while the stages load: half-way through the loads, most tenants are
    # served (in chain-position order the base's last stage came last: none were)
    halfway = covered_over_time[len(covered_over_time) // 2]
    assert halfway >= len(MANIFESTS) // 3, covered_over_time
