"""Placement policy on synthetic clusters: coverage, budgets, hops of the hottest chain,
shared blocks held once per worker and replicated by demand, stages that batch tenants."""

from __future__ import annotations

import math

import pytest

from blockllm.broker.planner.placement import (
    ModelInfo,
    Placement,
    WorkerInfo,
    layout_cost,
    layout_load,
    place,
    placement_gain,
)
from blockllm.broker.protocol import PlannedHop, PlannedRoute, StageRef
from blockllm.broker.routing import WorkerView, find_route
from blockllm.zoo.chain import stage_key

L = 6  # decoder layers: chain positions 0..7
MB = 1 << 20


def chain(tag: str, changed: dict[int, str] | None = None) -> tuple[str, ...]:
    blocks = [f"{tag}{p}" for p in range(L + 2)]
    for p, b in (changed or {}).items():
        blocks[p] = b
    return tuple(blocks)


def model(name: str, blocks: tuple[str, ...], demand: float = 0.0, fp: str = "fam") -> ModelInfo:
    return ModelInfo(name, blocks, (MB,) * len(blocks), fingerprint=fp, demand=demand)


BASE = chain("b")
FT = chain("b", {3: "ft3", 4: "ft4"})  # two fine-tuned layers, the rest shared with base
OTHER = chain("q")


class Manifest:
    """What stage_key and find_route read of a manifest."""

    def __init__(self, m: ModelInfo) -> None:
        self.name, self.chain, self.fingerprint = m.name, m.chain, m.fingerprint
        self.tie_word_embeddings = m.tied
        self.config: dict = {}


def routable(plan: Placement, models: list[ModelInfo]) -> dict[str, int]:
    """Every model's hops over the planned stages, routed as the broker routes (by stage key)."""
    manifests = {m.name: Manifest(m) for m in models}
    views = {
        w: WorkerView([StageRef(stage_key(manifests[o], s, e), o, s, e) for o, s, e in stages])
        for w, stages in plan.stages.items()
    }

    def key_of(name: str, s: int, e: int) -> str:
        return stage_key(manifests[name], s, e)

    hops = {}
    for m in models:
        route = find_route(m.name, len(m.chain), views, key_of)
        assert route is not None, f"{m.name} is not covered"
        hops[m.name] = len(route)
        for planned in plan.routes[m.name]:  # every planned route resolves to hosted stages
            for hop in planned.hops:
                hosted = {v.key for v in views[hop.worker].stages}
                assert {key_of(m.name, s, e) for s, e in hop.spans} <= hosted
    return hops


def held_bytes(plan: Placement, models: list[ModelInfo]) -> dict[str, int]:
    by = {m.name: m for m in models}
    out = {}
    for w, stages in plan.stages.items():
        blocks = {b for o, s, e in stages for p in range(s, e) for b in by[o].blocks_at(p)}
        out[w] = len(blocks) * MB
    return out


def test_everything_fits_one_worker_each_chain_one_hop() -> None:
    models = [model("base", BASE, 5), model("ft", FT, 1), model("q", OTHER, 1)]
    workers = [WorkerInfo("w0"), WorkerInfo("w1")]
    plan = place(models, workers)
    assert routable(plan, models) == {"base": 1, "ft": 1, "q": 1}
    assert not plan.uncovered


@pytest.mark.parametrize("capacity", [3, 4, 5, 8])
def test_budgets_never_exceeded_and_the_hottest_chain_takes_fewest_hops(capacity: int) -> None:
    models = [model("base", BASE, 10), model("q", OTHER, 1)]
    workers = [WorkerInfo(f"w{i}", capacity * MB) for i in range(6)]
    plan = place(models, workers)
    used = held_bytes(plan, models)
    assert all(used[w.name] <= w.capacity_bytes for w in workers)
    assert plan.bytes_used == used
    hops = routable(plan, models)
    assert hops["base"] == math.ceil((L + 2) / capacity)  # the lower bound


def test_a_shared_block_is_held_once_per_worker_and_stages_batch_tenants() -> None:
    models = [model("base", BASE, 1), model("ft", FT, 1)]
    plan = place(models, [WorkerInfo("w0", 10 * MB)])  # both fit only when sharing
    assert plan.bytes_used["w0"] == 10 * MB
    assert routable(plan, models) == {"base": 1, "ft": 1}
    # shared runs are one stage each: [0,3) and [5,8) shared; [3,5) once per model
    assert sorted((s, e) for _, s, e in plan.stages["w0"]) == [(0, 3), (3, 5), (3, 5), (5, 8)]


def test_shared_blocks_are_replicated_in_proportion_to_combined_demand() -> None:
    models = [model("base", BASE, 4), model("ft", FT, 4), model("q", OTHER, 1)]
    workers = [WorkerInfo(f"w{i}", 8 * MB) for i in range(9)]
    plan = place(models, workers)
    holders = {
        b: sum(1 for st in plan.stages.values() if any(s <= p < e for _, s, e in st for p in [i]))
        for i, b in [(0, "b0"), (3, "ft3")]
    }
    q_holders = sum(1 for st in plan.stages.values() if any(o == "q" for o, _, _ in st))
    assert len(plan.replicas["base"]) == len(plan.replicas["ft"]) == 4
    assert len(plan.replicas["q"]) == 1
    # the embedding shared by base and ft is on every worker of either: 8 workers, q on 1
    assert holders["b0"] >= 8 > q_holders == 1
    assert all(n <= 8 * MB for n in held_bytes(plan, models).values())
    routable(plan, models)


def test_cold_finetune_lands_next_to_its_base() -> None:
    models = [model("base", BASE, 0), model("ft", FT, 0), model("q", OTHER, 0)]
    plan = place(models, [WorkerInfo("w0"), WorkerInfo("w1")])
    (base_route,) = plan.replicas["base"]
    (ft_route,) = plan.replicas["ft"]
    assert base_route[0][0] == ft_route[0][0]  # shared blocks are not loaded twice


def test_hot_models_spread_over_workers() -> None:
    models = [model("a", chain("a"), 5), model("b", chain("b"), 5)]
    plan = place(models, [WorkerInfo("w0"), WorkerInfo("w1")])
    assert {plan.replicas["a"][0][0][0], plan.replicas["b"][0][0][0]} == {"w0", "w1"}


def test_a_model_that_fits_nowhere_is_reported_not_forced() -> None:
    models = [model("base", BASE, 1), model("q", OTHER, 1)]
    plan = place(models, [WorkerInfo("w0", 8 * MB), WorkerInfo("w1", 3 * MB)])
    assert plan.uncovered == ["q"]
    assert all(n <= c for n, c in zip(plan.bytes_used.values(), (8 * MB, 3 * MB), strict=True))


def test_placement_prefers_blocks_already_resident() -> None:
    models = [model("a", chain("a"), 0)]
    resident = frozenset(chain("a"))
    plan = place(models, [WorkerInfo("w0"), WorkerInfo("w1", resident=resident)])
    assert plan.replicas["a"] == [[("w1", 0, L + 2)]]


def test_a_block_a_worker_cannot_get_is_placed_elsewhere() -> None:
    models = [model("a", chain("a"), 0)]
    refused = WorkerInfo("w0", refused=frozenset({"a3"}))  # w0 would win the tie by name
    plan = place(models, [refused, WorkerInfo("w1")])
    assert plan.replicas["a"] == [[("w1", 0, L + 2)]]
    alone = place(models, [WorkerInfo("w0", refused=frozenset({"a3"}))])
    assert alone.uncovered == ["a"]  # never placed where it cannot load


def test_tied_head_counts_the_embedding_it_reuses() -> None:
    tied = ModelInfo("t", chain("t"), (MB,) * (L + 2), "fam", tied=True, demand=1)
    plan = place([tied], [WorkerInfo("w0", 4 * MB), WorkerInfo("w1", 5 * MB)])
    assert not plan.uncovered
    assert all(n <= c for n, c in zip(plan.bytes_used.values(), (4 * MB, 5 * MB), strict=True))
    routable(plan, [tied])


# -- the cost model that decides whether a re-placement is worth it ---------------------------


def route(*hops: tuple[str, int, int], weight: float = 1.0) -> PlannedRoute:
    return PlannedRoute(tuple(PlannedHop(w, ((s, e),)) for w, s, e in hops), weight)


def test_layout_load_counts_a_shared_block_once_per_worker_batched_over_its_tenants() -> None:
    base, ft = model("base", BASE, demand=1.0), model("ft", FT, demand=1.0)
    pipeline = {
        "base": (route(("w0", 0, 4), ("w1", 4, 8)),),
        "ft": (route(("w0", 0, 4), ("w1", 4, 8)),),
    }
    loads = layout_load([base, ft], pipeline, batch_exponent=1.0)
    # without a batching discount, every block costs its work x the demand through it
    assert loads["w0"] == pytest.approx(3 * MB + MB * 0.5 + MB * 0.5)  # b3 / ft3: half each
    flat = layout_load([base, ft], pipeline, batch_exponent=0.0)  # a batch costs one request
    assert flat["w0"] == pytest.approx(5 * MB) and flat["w1"] == pytest.approx(5 * MB)
    split = {"base": (route(("w0", 0, 8)),), "ft": (route(("w1", 0, 8)),)}
    assert max(layout_load([base, ft], split, 0.0).values()) == pytest.approx(8 * MB)


def test_splitting_tenants_of_a_pipeline_over_workers_is_not_worth_it() -> None:
    """The bench's case: every tenant's chain through both workers (shared blocks batched over
    all tenants) against each tenant whole on one worker (one hop, batching split)."""
    tenants = [model("base", BASE, 3.0)] + [
        model(f"ft{i}", chain("b", {L: f"ft{i}"}), 1.0) for i in range(3)
    ]
    pipeline = {m.name: (route(("w0", 0, 4), ("w1", 4, 8)),) for m in tenants}
    whole = {m.name: (route(("w0" if i % 2 == 0 else "w1", 0, 8)),) for i, m in enumerate(tenants)}
    gain = placement_gain(tenants, pipeline, whole, batch_exponent=0.5, hop_cost=MB / 4)
    assert gain < 0  # costlier: it must not be made
    assert placement_gain(tenants, whole, pipeline, 0.5, MB / 4) > 0.15


def test_one_hop_pays_when_a_hop_costs_more_than_the_work_it_spreads() -> None:
    """A tiny model split over two workers: the hop (a message through the broker) costs more
    than the layers it spreads, so the whole chain on one worker is cheaper."""
    tiny = ModelInfo("m", BASE, (1024,) * len(BASE), demand=5.0)
    split = {"m": (route(("w0", 0, 4), ("w1", 4, 8)),)}
    whole = {"m": (route(("w0", 0, 8)),)}
    assert placement_gain([tiny], split, whole, 0.5, hop_cost=8 * MB) > 0.3
    big = model("m", BASE, demand=5.0)  # 1 MB blocks, a cheap hop: the pipeline is better
    assert placement_gain([big], split, whole, 0.5, hop_cost=MB / 8) < 0
    assert layout_cost([big], whole, 0.5, hop_cost=MB) == pytest.approx(9 * MB)


def test_a_model_the_live_layout_cannot_route_makes_any_placement_worth_it() -> None:
    m = model("m", BASE, demand=1.0)
    assert placement_gain([m], {}, {"m": (route(("w0", 0, 8)),)}) == 1.0
    assert placement_gain([m], {}, {}) == 0.0  # nothing either way


def test_kv_budget_is_a_placement_fact_across_geometries() -> None:
    """A worker whose KV arena cannot hold a page per layer of another geometry next to what
    it holds gets none of it: the model goes elsewhere (the worker would refuse the stage)."""
    row_a, row_b = 128, 512  # bytes of one token's K in one layer: two geometries
    a = ModelInfo("a", chain("a"), (MB,) * (L + 2), "fa", demand=2.0, kv_row_bytes=row_a)
    b = ModelInfo("b", chain("b"), (MB,) * (L + 2), "fb", demand=1.0, kv_row_bytes=row_b)
    page = 2 * 16 * row_a  # the first geometry (a, the hottest) sets the page
    small = WorkerInfo("w0", kv_budget_bytes=(L + 2) * page)  # a's 6 layers, not b's 6 more
    plan = place([a, b], [small, WorkerInfo("w1")], max_replicas=1)
    assert not plan.uncovered
    assert {w for w, _s, _e in plan.replicas["a"][0]} == {"w0"}
    assert {w for w, _s, _e in plan.replicas["b"][0]} == {"w1"}
    # a worker whose page holds no token of b's rows never gets a layer of b, even alone
    tiny_page = WorkerInfo("w0", kv_budget_bytes=1 << 30, kv_page_bytes=row_b)
    plan = place([b], [tiny_page, WorkerInfo("w1")], max_replicas=1)
    layers_on_w0 = [p for w, s, e in plan.replicas["b"][0] if w == "w0" for p in range(s, e)]
    assert all(p in (0, L + 1) for p in layers_on_w0)
    # nowhere to go: uncovered, never a layout a worker refuses
    plan = place([a, b], [small], max_replicas=1)
    assert plan.uncovered == ["b"]
