"""Pure placement and routing on synthetic manifests and worker views."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from blockllm.broker.protocol import StageRef
from blockllm.broker.routing import (
    Hop,
    WorkerView,
    balanced_spans,
    find_route,
    static_placement,
)


@dataclass(frozen=True)
class M:
    """A synthetic manifest: name, chain of block ids, optional sizes."""

    name: str
    chain: tuple[str, ...]
    fingerprint: str = "fam"
    sizes: tuple[int, ...] = ()
    tie_word_embeddings: bool = False

    @property
    def block_bytes(self) -> tuple[int, ...]:
        return self.sizes


def chain(n_layers: int, changed: dict[int, str] | None = None) -> tuple[str, ...]:
    """embed, layers, head of a base model, with some positions replaced."""
    ids = ["E", *(f"L{i}" for i in range(n_layers)), "H"]
    for pos, bid in (changed or {}).items():
        ids[pos] = bid
    return tuple(ids)


def make_key_of(manifests: list[M]):
    by_name = {m.name: m for m in manifests}

    def key_of(model: str, start: int, end: int) -> str | None:
        m = by_name.get(model)
        if m is None or not 0 <= start < end <= len(m.chain):
            return None
        doc = f"{m.fingerprint}|{start}|{end}|{','.join(m.chain[start:end])}"
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    return key_of


def refs(stages, key_of) -> list[StageRef]:
    return [StageRef(key_of(m, s, e), m, s, e) for m, s, e in stages]


# -- static placement ------------------------------------------------------------------------


def test_balanced_spans_cover_in_order() -> None:
    assert balanced_spans([1.0] * 6, 2) == [(0, 3), (3, 6)]
    assert balanced_spans([1.0] * 6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert balanced_spans([10.0, 1, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 7)]
    assert balanced_spans([1.0, 1.0], 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_single_model_one_stage_per_worker() -> None:
    base = M("base", chain(4))
    plan = static_placement([base], 2)
    assert plan == [[("base", 0, 3)], [("base", 3, 6)]]


def test_shared_runs_are_one_stage_and_specific_runs_separate() -> None:
    base = M("base", chain(6))
    ft = M("ft", chain(6, {4: "X3", 5: "X4"}))  # layers 3 and 4 fine-tuned
    (stages,) = static_placement([base, ft], 1)
    assert stages == [
        ("base", 0, 4),  # embed + layers 0..2: shared, listed once
        ("base", 4, 6),
        ("ft", 4, 6),
        ("base", 6, 8),  # layer 5 + head: shared again
    ]
    key_of = make_key_of([base, ft])
    assert key_of("base", 0, 4) == key_of("ft", 0, 4)
    assert key_of("base", 4, 6) != key_of("ft", 4, 6)


def test_every_model_is_routable_over_its_placement() -> None:
    base = M("base", chain(8))
    ft1 = M("ft1", chain(8, {7: "A6", 8: "A7"}))
    ft2 = M("ft2", chain(8, {2: "B1"}))
    models = [base, ft1, ft2]
    key_of = make_key_of(models)
    for n in (1, 2, 3, 4):
        plan = static_placement(models, n)
        views = {f"w{i}": WorkerView(refs(st, key_of)) for i, st in enumerate(plan)}
        keys = [k for v in views.values() for k in (s.key for s in v.stages)]
        assert len(keys) == len(set(keys)), "a shared stage is hosted once"
        for m in models:
            route = find_route(m.name, len(m.chain), views, key_of)
            assert route is not None, (n, m.name)
            assert len(route) == min(n, len(m.chain))


def test_placement_balances_by_bytes_when_known() -> None:
    sizes = (100, 10, 10, 10, 10, 10)  # a big embedding
    base = M("base", chain(4), sizes=sizes)
    assert static_placement([base], 2) == [[("base", 0, 1)], [("base", 1, 6)]]
    unsized = M("base", chain(4))
    assert static_placement([unsized], 2) == [[("base", 0, 3)], [("base", 3, 6)]]


def test_tied_head_differs_when_the_embedding_differs() -> None:
    a = M("a", chain(2), tie_word_embeddings=True)
    b = M("b", chain(2, {0: "E2"}), tie_word_embeddings=True)  # same head block id
    (stages,) = static_placement([a, b], 1)
    assert ("a", 3, 4) in stages and ("b", 3, 4) in stages


def test_families_are_placed_separately() -> None:
    a = M("a", chain(2), fingerprint="f1")
    b = M("b", chain(4), fingerprint="f2")
    plan = static_placement([a, b], 2)
    assert plan == [[("a", 0, 2), ("b", 0, 3)], [("a", 2, 4), ("b", 3, 6)]]


def test_placement_rejects_no_workers() -> None:
    with pytest.raises(ValueError):
        static_placement([M("a", chain(2))], 0)


# -- routing ---------------------------------------------------------------------------------


@pytest.fixture
def two_models():
    base = M("base", chain(4))
    ft = M("ft", chain(4, {3: "X2"}))
    return base, ft, make_key_of([base, ft])


def test_route_prefers_one_worker(two_models) -> None:
    _base, _ft, key_of = two_models
    views = {
        "split0": WorkerView(refs([("base", 0, 3)], key_of)),
        "split1": WorkerView(refs([("base", 3, 6)], key_of)),
        "whole": WorkerView(refs([("base", 0, 2), ("base", 2, 6)], key_of), load=0.9),
    }
    route = find_route("base", 6, views, key_of)
    assert route == [Hop("whole", (key_of("base", 0, 2), key_of("base", 2, 6)), ((0, 2), (2, 6)))]


def test_route_prefers_low_load_at_equal_hops(two_models) -> None:
    _base, _ft, key_of = two_models
    stages = [("base", 0, 6)]
    views = {"a": WorkerView(refs(stages, key_of), 0.8), "b": WorkerView(refs(stages, key_of), 0.1)}
    assert find_route("base", 6, views, key_of)[0].worker == "b"
    views["b"] = WorkerView(refs(stages, key_of), 0.1, available=False)
    assert find_route("base", 6, views, key_of)[0].worker == "a"


def test_route_uses_shared_stages_and_own_stage(two_models) -> None:
    _base, _ft, key_of = two_models
    views = {
        "w0": WorkerView(refs([("base", 0, 3)], key_of)),
        "w1": WorkerView(refs([("base", 3, 4), ("ft", 3, 4), ("base", 4, 6)], key_of)),
    }
    route = find_route("ft", 6, views, key_of)
    assert [h.worker for h in route] == ["w0", "w1"]
    assert route[1].stage_keys == (key_of("ft", 3, 4), key_of("base", 4, 6))
    assert route[1].spans == ((3, 4), (4, 6))
    base_route = find_route("base", 6, views, key_of)
    assert base_route[1].stage_keys[0] == key_of("base", 3, 4)


def test_no_route_when_a_position_is_missing(two_models) -> None:
    _base, _ft, key_of = two_models
    views = {"w0": WorkerView(refs([("base", 0, 3), ("base", 4, 6)], key_of))}
    assert find_route("base", 6, views, key_of) is None
    # the fine-tune cannot use the base's own layer 2 stage
    views = {"w0": WorkerView(refs([("base", 0, 6)], key_of))}
    assert find_route("ft", 6, views, key_of) is None
    assert find_route("nope", 6, views, key_of) is None


def test_route_ignores_bad_spans(two_models) -> None:
    _base, _ft, key_of = two_models
    bogus = [
        StageRef("k", "base", 3, 3),
        StageRef("k2", "base", -1, 2),
        StageRef("k3", "base", 0, 9),
    ]
    views = {"w0": WorkerView(bogus)}
    assert find_route("base", 6, views, key_of) is None


def test_route_returns_to_a_worker_when_needed(two_models) -> None:
    _base, _ft, key_of = two_models
    views = {
        "a": WorkerView(refs([("base", 0, 2), ("base", 4, 6)], key_of)),
        "b": WorkerView(refs([("base", 2, 4)], key_of)),
    }
    route = find_route("base", 6, views, key_of)
    assert [h.worker for h in route] == ["a", "b", "a"]
