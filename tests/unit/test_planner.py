"""The pure Planner fed synthetic STATS snapshots: what it commands, and when it stays still."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from blockllm.broker.planner.config import PlannerConfig
from blockllm.broker.planner.planner import Planner
from blockllm.broker.protocol import (
    LoadStage,
    SetChain,
    SetRoutes,
    StatsBody,
    UnloadStage,
    WorkerStatus,
)
from blockllm.zoo.chain import stage_key
from tests.unit.typed_bodies import stats

L = 4  # decoder layers; chain positions 0..5
MB = 1 << 20


@dataclass
class Manifest:
    name: str
    chain: tuple[str, ...]
    fingerprint: str = "fam"
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    config: dict = field(default_factory=lambda: {"hidden_size": 8, "vocab_size": 16})

    @property
    def block_bytes(self) -> tuple[int, ...]:
        return (MB,) * len(self.chain)


@dataclass
class Equiv:
    original: str
    substitute: str
    position: int
    kl: float
    fingerprint: str = "fam"


BASE = Manifest("m", tuple(f"b{p}" for p in range(L + 2)))
FT = Manifest("ft", tuple("f3" if p == 3 else "f4" if p == 4 else f"b{p}" for p in range(L + 2)))
MANIFESTS = {"m": BASE, "ft": FT}


def cfg(**kw: Any) -> PlannerConfig:
    base = {
        "replan_interval_s": 1.0,
        "demand_halflife_s": 1.0,
        "catalog_interval_s": 0.0,
        "settle_s": 0.0,
        "unload_delay_s": 0.0,
        "dup_confirm_s": 0.0,
    }
    return PlannerConfig(**{**base, **kw})


def planner(equiv: list[Equiv] | None = None, **kw: Any) -> Planner:
    return Planner(cfg(**kw), lambda: (MANIFESTS, equiv or []))


def snapshot(*args: Any, **kw: Any) -> StatsBody:
    """A STATS body (typed) of `snapshot_dict`'s arguments."""
    return stats(snapshot_dict(*args, **kw))


def snapshot_dict(
    workers: dict[str, list[tuple[str, int, int]]],
    covered: dict[str, bool] | None = None,
    token_rate: dict[str, float] | None = None,
    p50: dict[str, float] | None = None,
    routes: dict[str, list] | None = None,
    budget: int = 0,
    extra: dict[str, dict[str, Any]] | None = None,
    waiting: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A STATS body as `blockllm status --json` would show it."""
    return {
        "workers": [
            {
                **(extra or {}).get(w, {}),
                "name": w,
                "stages": [
                    {"key": stage_key(MANIFESTS[m], s, e), "model": m, "start": s, "end": e}
                    for m, s, e in stages
                ],
                "step_ms_p50": (p50 or {}).get(w, 0.0),
                "memory_budget_bytes": budget,
            }
            for w, stages in workers.items()
        ],
        "models": {
            m: {
                "covered": (covered or {}).get(m, True),
                "token_rate": (token_rate or {}).get(m, 0.0),
                "route": (routes or {}).get(m),
                "waiting": (waiting or {}).get(m, 0),
            }
            for m in MANIFESTS
        },
    }


def kinds(cmds: list) -> list[str]:
    return [type(c).__name__ for c in cmds]


def test_an_idle_covered_cluster_is_left_alone() -> None:
    p = planner()
    body = snapshot({"w0": [("m", 0, 6), ("ft", 3, 5)], "w1": []})
    assert p.on_stats(body, 0.0) == [] and p.on_stats(body, 10.0) == []


def test_uncovered_model_is_placed_then_routed_then_the_rest_unloaded() -> None:
    p = planner()
    start = {"w0": [("m", 0, 2)], "w1": []}  # a stage the new placement has no use for
    cmds = p.on_stats(snapshot(start, covered={"m": False}), 0.0)
    loads = [c for c in cmds if isinstance(c, LoadStage)]
    assert loads and kinds(cmds) == ["LoadStage"] * len(loads)  # coverage first
    assert p.on_stats(snapshot(start, covered={"m": False}), 0.5) == []  # loads pending
    placed = {w: list(st) for w, st in start.items()}
    for c in loads:
        placed[c.worker].append((c.model, c.start, c.end))
    cmds = p.on_stats(snapshot(placed), 1.0)
    routes = next(c for c in cmds if isinstance(c, SetRoutes)).routes
    assert set(routes) == {"m", "ft"}
    (stale,) = [c for c in cmds if isinstance(c, UnloadStage)]
    assert (stale.worker, stale.key) == ("w0", stage_key(BASE, 0, 2))
    assert kinds(cmds).index("SetRoutes") < kinds(cmds).index("UnloadStage")


def test_a_lost_worker_is_replaced_on_the_survivors() -> None:
    p = planner()
    p.on_stats(snapshot({"w0": [("m", 0, 3)], "w1": [("m", 3, 6), ("ft", 3, 5)]}), 0.0)
    cmds = p.on_stats(snapshot({"w0": [("m", 0, 3)]}, covered={"m": False, "ft": False}), 1.0)
    loads = {(c.worker, c.model, c.start, c.end) for c in cmds if isinstance(c, LoadStage)}
    assert loads and {w for w, *_ in loads} == {"w0"}
    covered = {p for _, _, s, e in loads for p in range(s, e)} | {0, 1, 2}
    assert covered == set(range(L + 2))


def test_tolerance_serves_a_finetune_through_the_resident_base_blocks() -> None:
    equiv = [Equiv("f3", "b3", 3, 0.01), Equiv("f4", "b4", 4, 0.02), Equiv("b3", "f3", 3, 0.01)]
    p = planner(equiv, tolerance=(("ft", 0.05),))
    cmds = p.on_stats(snapshot({"w0": [("m", 0, 6)]}, covered={"ft": False}), 0.0)
    assert not any(isinstance(c, LoadStage) for c in cmds)  # everything it needs is resident
    (chain,) = [c for c in cmds if isinstance(c, SetChain)]
    assert chain.model == "ft" and chain.chain == BASE.chain
    routes = next(c for c in cmds if isinstance(c, SetRoutes)).routes
    assert [(h.worker, h.spans) for h in routes["ft"][0].hops] == [("w0", ((0, 6),))]


def test_tolerance_budget_limits_the_substitutions() -> None:
    equiv = [Equiv("f3", "b3", 3, 0.01), Equiv("f4", "b4", 4, 0.02)]
    p = planner(equiv, tolerance=(("ft", 0.015),))
    cmds = p.on_stats(snapshot({"w0": [("m", 0, 6)]}, covered={"ft": False}), 0.0)
    assert p.target is not None
    assert p.target.chains["ft"] == tuple("b3" if i == 3 else b for i, b in enumerate(FT.chain))
    assert any(isinstance(c, LoadStage) and c.model == "ft" for c in cmds)  # its own layer 3


def test_demand_replans_at_most_every_interval_and_only_when_replicas_change() -> None:
    p = planner(min_demand=0.5)
    both = {"w0": [("m", 0, 6)], "w1": [("ft", 0, 6)]}
    p.on_stats(snapshot(both, token_rate={"m": 50.0}), 0.0)
    assert p.replans == 1  # demand: the hot model gets a replica on each worker
    assert p.target is not None and len(p.target.plan.replicas["m"]) == 2
    p.on_stats(snapshot(both, token_rate={"m": 60.0}), 0.5)
    p.on_stats(snapshot(both, token_rate={"m": 55.0}), 2.0)
    assert p.replans == 1  # same replica counts: no churn


def test_a_straggler_is_duplicated_then_routed_around_then_retired() -> None:
    p = planner(dup_step_ms=100.0, dup_hold_s=2.0)
    route = {"m": [["w0", [[0, 6]]]]}
    slow = snapshot({"w0": [("m", 0, 6)], "w1": []}, p50={"w0": 300.0}, routes=route)
    cmds = p.on_stats(slow, 0.0)
    (load,) = [c for c in cmds if isinstance(c, LoadStage)]
    assert (load.worker, load.model, load.start, load.end) == ("w1", "m", 0, 6)
    dup = snapshot({"w0": [("m", 0, 6)], "w1": [("m", 0, 6)]}, p50={"w0": 300.0}, routes=route)
    cmds = p.on_stats(dup, 0.5)
    (routes,) = [c for c in cmds if isinstance(c, SetRoutes)]
    assert routes.move_running
    weights = {r.hops[0].worker: r.weight for r in routes.routes["m"]}
    assert weights["w1"] == 1.0 and weights["w0"] < 0.1
    healthy = snapshot({"w0": [("m", 0, 6)], "w1": [("m", 0, 6)]}, p50={"w0": 20.0}, routes=route)
    assert not any(isinstance(c, SetRoutes) for c in p.on_stats(healthy, 1.0))
    cmds = p.on_stats(healthy, 3.5)
    (routes,) = [c for c in cmds if isinstance(c, SetRoutes)]
    assert [r.hops[0].worker for r in routes.routes.get("m", ())] in ([], ["w0"])
    assert p.duplicates.retired == 1


def test_a_load_that_does_not_fit_waits_for_room_made_without_losing_coverage() -> None:
    p = planner()
    full = {"w0": [("m", 0, 6)], "w1": [("m", 0, 6)]}  # both full: 6 blocks of 6 MB budgets
    hot = {"ft": 10.0}
    cmds = p.on_stats(snapshot(full, {"ft": False}, hot, budget=6 * MB), 0.0)
    assert p.target is not None
    assert p.target.plan.stages == {"w0": [("ft", 0, 6)], "w1": [("m", 0, 6)]}
    # ft:0-6 does not fit on w0 beside m:0-6: m goes from w0 first (w1 still covers m)
    (routes,) = [c for c in cmds if isinstance(c, SetRoutes)]  # m's target route is hosted
    assert {m: [r.hops[0].worker for r in rs] for m, rs in routes.routes.items()} == {"m": ["w1"]}
    others = [(type(c).__name__, c.worker) for c in cmds if c is not routes]
    assert others == [("UnloadStage", "w0")]
    assert p.on_stats(snapshot(full, {"ft": False}, hot, budget=6 * MB), 0.5) == []
    room = {"w0": [], "w1": [("m", 0, 6)]}
    cmds = p.on_stats(snapshot(room, {"ft": False}, hot, budget=6 * MB), 1.0)
    assert [(type(c).__name__, c.worker, c.model) for c in cmds] == [("LoadStage", "w0", "ft")]


def test_room_is_not_made_by_uncovering_a_model_until_the_load_has_waited_long() -> None:
    p = planner(load_timeout_s=5.0)
    only = {"w0": [("m", 0, 6)], "w1": [("m", 0, 3)]}  # w0 is the only full cover of m
    hot = {"ft": 10.0}
    cmds = p.on_stats(snapshot(only, {"ft": False}, hot, budget=6 * MB), 0.0)
    assert p.target is not None and p.target.plan.stages["w0"] == [("ft", 0, 6)]
    assert not any(isinstance(c, UnloadStage) and c.worker == "w0" for c in cmds)
    cmds = p.on_stats(snapshot(only, {"ft": False}, hot, budget=6 * MB), 6.0)
    assert any(isinstance(c, UnloadStage) and c.worker == "w0" for c in cmds)


def test_batch_tuner_shrinks_full_batches_of_a_slow_worker_and_grows_queued_ones() -> None:
    from blockllm.broker.planner.batching import BatchTuner

    tuner = BatchTuner(cfg(batch_target_ms=100.0, batch_cooldown_s=5.0))
    ids = iter(range(100))

    def worker(p95: float, mean: float, limit: int, queued: int) -> WorkerStatus:
        return WorkerStatus(
            "w",
            step_ms_p95=p95,
            max_batch_size=32,
            stage_batch_limits={"k": limit},
            stage_mean_batch={"k": mean},
            queue_depths={"k": queued},
        )

    (cmd,) = tuner.step({"w0": worker(250, 30, 32, 4)}, set(), 0.0, lambda: str(next(ids)))
    assert (cmd.worker, cmd.key, cmd.max_batch_size) == ("w0", "k", 16)
    assert tuner.step({"w0": worker(250, 16, 16, 4)}, set(), 1.0, lambda: "x") == []  # cooldown
    assert tuner.step({"w0": worker(250, 4, 16, 4)}, set(), 9.0, lambda: "x") == []  # not full
    (cmd,) = tuner.step({"w0": worker(30, 16, 16, 9)}, set(), 9.0, lambda: "y")
    assert cmd.max_batch_size == 32
    shared = tuner.step({"w1": worker(250, 16, 16, 1)}, {"k"}, 20.0, lambda: "z")
    assert shared == []  # a shared stage keeps at least half the configured max
    assert BatchTuner(cfg()).step({"w0": worker(250, 30, 32, 4)}, set(), 0.0, str) == []  # off


def test_a_burst_of_demand_moves_nothing_and_superseded_stages_wait() -> None:
    p = planner(min_demand=0.5, settle_s=3.0, unload_delay_s=5.0)
    split = {"w0": [("m", 0, 3)], "w1": [("m", 3, 6), ("ft", 0, 6)]}
    hot = {"m": 40.0}
    assert p.on_stats(snapshot(split, token_rate=hot), 0.0) == []
    assert p.on_stats(snapshot(split, token_rate=hot), 2.0) == []  # not settled yet
    assert p.on_stats(snapshot(split), 10.0) == [] and p.target is None  # the burst is over
    cmds = [
        c for t in (11.0, 12.0, 13.0, 14.5) for c in p.on_stats(snapshot(split, token_rate=hot), t)
    ]
    assert p.target is not None and any(isinstance(c, LoadStage) for c in cmds)
    placed = {w: list(st) for w, st in split.items()}
    for w, stages in p.target.plan.stages.items():
        placed[w] = sorted(set(placed[w]) | set(stages))
    cmds = p.on_stats(snapshot(placed, token_rate=hot), 15.0)
    assert "SetRoutes" in kinds(cmds) and "UnloadStage" not in kinds(cmds)
    assert "UnloadStage" not in kinds(p.on_stats(snapshot(placed, token_rate=hot), 18.0))
    assert "UnloadStage" in kinds(p.on_stats(snapshot(placed, token_rate=hot), 20.5))


def test_a_straggler_left_without_stages_is_retried_after_a_growing_hold() -> None:
    p = planner(dup_step_ms=100.0, dup_hold_s=2.0, min_demand=0.5)
    route = {"m": [["w0", [[0, 6]]]]}
    slow = snapshot({"w0": [("m", 0, 6)], "w1": []}, p50={"w0": 300.0}, routes=route)
    p.on_stats(slow, 0.0)  # duplicate on w1
    assert p.duplicates.slow == {"w0"} and p.duplicates.hold_s("w0") == 2.0
    # a re-placement took everything off w0: it shows no health any more
    bare = snapshot({"w0": [], "w1": [("m", 0, 6)]}, routes={"m": [["w1", [[0, 6]]]]})
    p.on_stats(bare, 1.0)
    assert p.duplicates.slow == {"w0"}
    p.on_stats(bare, 2.5)
    assert p.duplicates.slow == set()
    p.on_stats(bare, 3.0)
    assert p.replans == 1  # retried: placed again, w0 included
    p.duplicates.strikes["w0"] = 2  # found slow a second time: set aside twice as long
    assert p.duplicates.hold_s("w0") == 4.0


# -- rules that keep the planner from costing more than it buys --------------------------------

PIPELINE = {"w0": [("m", 0, 3)], "w1": [("m", 3, 5), ("ft", 3, 5), ("m", 5, 6)]}
PIPELINE_ROUTES = {m: [["w0", [[0, 3]]], ["w1", [[3, 5], [5, 6]]]] for m in ("m", "ft")}


def test_a_demand_replacement_must_cut_the_estimated_cost_by_min_gain() -> None:
    """Both tenants batched through one pipeline; each whole on its own worker would save a hop
    but split the shared blocks' batches: about 12% cheaper here, under a 50% minimum."""
    hot = {"m": 10.0, "ft": 10.0}
    body = snapshot(PIPELINE, token_rate=hot, routes=PIPELINE_ROUTES)
    p = planner(min_demand=0.5, min_gain=0.5, hop_cost_bytes=MB / 4)
    assert p.on_stats(body, 0.0) == [] and p.target is None
    assert p.declined == 1
    assert p.on_stats(body, 0.5) == [] and p.declined == 1  # not looked at again yet
    assert p.on_stats(body, 1.5) == [] and p.declined == 2  # a replan interval later: again
    eager = planner(min_demand=0.5, min_gain=0.0, hop_cost_bytes=MB / 4)
    assert "LoadStage" in kinds(eager.on_stats(body, 0.0)) and eager.declined == 0


def test_coverage_is_restored_whatever_the_gain() -> None:
    p = planner(min_gain=0.99)
    cmds = p.on_stats(snapshot({"w0": [("m", 0, 3)], "w1": []}, covered={"m": False}), 0.0)
    assert "LoadStage" in kinds(cmds) and p.declined == 0


def test_a_superseded_stage_with_work_queued_is_unloaded_only_once_its_traffic_left() -> None:
    p = planner()
    start = {"w0": [("m", 0, 2)], "w1": []}
    cmds = p.on_stats(snapshot(start, covered={"m": False}), 0.0)
    placed = {w: list(st) for w, st in start.items()}
    for c in cmds:
        placed[c.worker].append((c.model, c.start, c.end))
    busy = {"w0": {"queue_depths": {stage_key(BASE, 0, 2): 3}}}
    cmds = p.on_stats(snapshot(placed, extra=busy), 1.0)
    assert "SetRoutes" in kinds(cmds) and "UnloadStage" not in kinds(cmds)
    (stale,) = [c for c in p.on_stats(snapshot(placed), 2.0) if isinstance(c, UnloadStage)]
    assert (stale.worker, stale.key) == ("w0", stage_key(BASE, 0, 2))


def test_a_straggler_must_stay_slow_for_dup_confirm_s_before_a_duplicate() -> None:
    p = planner(dup_step_ms=100.0, dup_confirm_s=2.0)
    route = {"m": [["w0", [[0, 6]]]]}
    slow = snapshot({"w0": [("m", 0, 6)], "w1": []}, p50={"w0": 300.0}, routes=route)
    ok = snapshot({"w0": [("m", 0, 6)], "w1": []}, p50={"w0": 30.0}, routes=route)
    assert p.on_stats(slow, 0.0) == [] and p.on_stats(ok, 1.0) == []  # a blip
    assert p.on_stats(slow, 2.0) == [] and p.on_stats(slow, 3.5) == []  # slow again: from 2.0
    assert "LoadStage" in kinds(p.on_stats(slow, 4.0))


def test_running_requests_move_to_a_duplicate_only_when_the_straggler_is_far_slower() -> None:
    def routed(p50: dict[str, float]) -> SetRoutes:
        p = planner(dup_factor=3.0, dup_move_factor=6.0, dup_step_ms=0.0, min_demand=1e9)
        route = {"m": [["w0", [[0, 6]]]], "ft": [["w2", [[0, 6]]]]}
        layout = {"w0": [("m", 0, 6)], "w1": [], "w2": [("ft", 0, 6)]}
        p.on_stats(snapshot(layout, p50=p50, routes=route), 0.0)
        layout["w2"] = [("ft", 0, 6), ("m", 0, 6)]  # the helper: it holds most of m already
        cmds = p.on_stats(snapshot(layout, p50=p50, routes=route), 0.5)
        (cmd,) = [c for c in cmds if isinstance(c, SetRoutes)]
        return cmd

    # 4x slower than the others: new requests go to the duplicate, running ones finish
    assert not routed({"w0": 200.0, "w1": 50.0, "w2": 50.0}).move_running
    # 10x slower: moving them (a replay-prefill each) pays
    assert routed({"w0": 500.0, "w1": 50.0, "w2": 50.0}).move_running


def test_per_stage_pace_tells_a_worker_running_more_stages_from_a_slow_one() -> None:
    from blockllm.broker.planner.stragglers import pace, stragglers

    c = cfg(dup_factor=3.0, dup_step_ms=0.0)
    layout = {"w0": [("m", 0, 3), ("ft", 3, 5), ("m", 5, 6)], "w1": [("m", 3, 5)]}
    keys = {w: [stage_key(MANIFESTS[m], s, e) for m, s, e in st] for w, st in layout.items()}

    def facts(ms0: list[float], ms1: list[float], extra0: float = 0.0) -> dict:
        body = snapshot_dict(layout, p50={"w0": sum(ms0) + extra0, "w1": sum(ms1)})
        for w, ms in (("w0", ms0), ("w1", ms1)):
            entry = next(e for e in body["workers"] if e["name"] == w)
            entry["stage_step_ms"] = dict(zip(keys[w], ms, strict=True))
            for s in entry["stages"]:
                s["nbytes"] = (s["end"] - s["start"]) * MB
        p = planner()
        return p._parse_workers(stats(body))

    # w0's step is 4x w1's, but it runs 6 blocks to w1's 2 at the same ms per MiB
    even = facts([30.0, 20.0, 10.0], [20.0])
    assert pace(even["w0"]) == pytest.approx((10.0, 10.0)) and stragglers(even, c) == set()
    slow = facts([150.0, 100.0, 50.0], [20.0])  # its forwards 5x slower per MiB
    assert stragglers(slow, c) == {"w0"}
    # forwards as fast, but its steps lose 300 ms elsewhere (the fault hook's sleep, IO)
    stalled = facts([30.0, 20.0, 10.0], [20.0], extra0=300.0)
    assert pace(stalled["w0"]) == pytest.approx((10.0, 60.0)) and stragglers(stalled, c) == {"w0"}
    # without per-stage facts, the worker-wide step time is all there is
    bare = planner()._parse_workers(snapshot(layout, p50={"w0": 60.0, "w1": 15.0}))
    assert stragglers(bare, c) == {"w0"}


def test_batch_tuner_with_per_stage_latency_halves_the_expensive_stage_only() -> None:
    from blockllm.broker.planner.batching import BatchTuner

    tuner = BatchTuner(cfg(batch_target_ms=100.0, batch_cooldown_s=5.0))
    ids = iter(range(100))
    # a step of 160 ms: the big stage takes 120 of it, the small one 20; both fill 16
    over = WorkerStatus(
        "w0",
        step_ms_p95=160.0,
        max_batch_size=32,
        stage_batch_limits={"big": 16, "small": 16},
        stage_mean_batch={"big": 15.0, "small": 15.0},
        stage_step_ms={"big": 120.0, "small": 20.0},
    )
    cmds = tuner.step({"w0": over}, set(), 0.0, lambda: str(next(ids)))
    assert [(c.key, c.max_batch_size) for c in cmds] == [("big", 8)]  # 60 ms saved >= 60 over
    # well under: grow the queued stages while the step stays under the target if each doubled
    under = WorkerStatus(
        "w0",
        step_ms_p95=40.0,
        max_batch_size=32,
        stage_batch_limits={"a": 8, "b": 8, "c": 8},
        stage_mean_batch={"a": 8.0, "b": 8.0, "c": 8.0},
        stage_step_ms={"a": 10.0, "b": 25.0, "c": 40.0},
        queue_depths={"a": 2, "b": 2, "c": 2},
    )
    cmds = BatchTuner(cfg(batch_target_ms=100.0)).step({"w0": under}, set(), 0.0, str)
    assert sorted((c.key, c.max_batch_size) for c in cmds) == [("a", 16), ("b", 16)]


BAD_SETTINGS = [
    {"batch_exponent": 1.5},
    {"hop_cost_bytes": -1},
    {"min_gain": 1.0},
    {"dup_confirm_s": -1},
    {"dup_move_factor": 0.5},
]


@pytest.mark.parametrize("bad", BAD_SETTINGS)
def test_the_cost_rules_settings_are_checked(bad: dict) -> None:
    with pytest.raises(ValueError):
        cfg(**bad)


def test_duplicates_ready_in_one_snapshot_are_routed_by_one_set_routes() -> None:
    """Each SET_ROUTES carries every model's routes: two duplicates that finish loading in the
    same snapshot get one, with both twins (86 finished in one snapshot at 2,020 x 256)."""
    p = planner(dup_step_ms=100.0)
    routes = {"m": [["w0", [[0, 6]]]], "ft": [["w1", [[0, 6]]]]}
    before = {"w0": [("m", 0, 6)], "w1": [("ft", 0, 6)], "w2": [], "w3": []}
    slow = {"w0": 300.0, "w1": 300.0}
    full = {"w0": {"weight_bytes": 6 * MB}, "w1": {"weight_bytes": 6 * MB}}
    cmds = p.on_stats(snapshot(before, p50=slow, routes=routes, budget=6 * MB, extra=full), 0.0)
    loads = [c for c in cmds if isinstance(c, LoadStage)]  # not on w0 nor w1: they are full
    assert sorted(c.model for c in loads) == ["ft", "m"] and p.duplicates.slow == {"w0", "w1"}
    assert {c.worker for c in loads} <= {"w2", "w3"}
    after = {**before}
    for c in loads:
        after[c.worker] = [*after[c.worker], (c.model, c.start, c.end)]
    cmds = p.on_stats(snapshot(after, p50=slow, routes=routes, budget=6 * MB, extra=full), 0.5)
    (sent,) = [c for c in cmds if isinstance(c, SetRoutes)]
    assert sent.move_running
    for model, slow_worker in (("m", "w0"), ("ft", "w1")):
        weights = {r.hops[0].worker: r.weight for r in sent.routes[model]}
        assert weights[slow_worker] < 0.1 and max(weights.values()) == 1.0, (model, weights)
