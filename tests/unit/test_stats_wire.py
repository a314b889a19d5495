"""stats_wire.WireMemo: `wire` of tuples by identity, bounded in two generations, packs as
the plain `wire` of every value on random inputs, objects coming and going (CPython reuses the
id of an object gone at once): a memo that let its objects go would hand out a gone route's
wire value for a new one (the last test)."""

from __future__ import annotations

import gc
import random
from typing import Any

import pytest

from blockllm.broker.protocol import PlannedHop, PlannedRoute
from blockllm.broker.stats_wire import WireMemo, pack, wire


def route(rng: random.Random) -> tuple[Any, ...]:
    hops = tuple(
        PlannedHop(f"w{rng.randrange(50)}", ((rng.randrange(9), rng.randrange(9, 40)),))
        for _ in range(rng.randrange(1, 4))
    )
    return rng.choice([hops, (PlannedRoute(hops, rng.choice([1.0, 2.0])),)])


def run(memo: Any, seed: int) -> int:
    rng = random.Random(seed)
    live: list[tuple[Any, ...]] = []
    hits = 0
    for _ in range(20_000):
        if live and rng.random() < 0.5:
            value = rng.choice(live)  # asked for again: a hit unless its generation went
            hits += 1
        else:
            value = route(rng)  # new, often at the id of one just dropped
            if rng.random() < 0.3:
                live.append(value)
        assert pack(memo.wire(value)) == pack(wire(value))  # the same on the wire
        if len(live) > 40:
            live.pop(rng.randrange(len(live)))
    return hits


@pytest.mark.parametrize(("limit", "seed"), [(4, 1), (16, 2), (1 << 12, 3)])
def test_the_memo_equals_the_plain_conversion(limit: int, seed: int) -> None:
    memo = WireMemo(limit)
    assert run(memo, seed) > 5000
    assert len(memo) <= 2 * limit  # bounded
    value = route(random.Random(seed))
    assert gc.is_tracked(memo.wire(value))
    for _ in range(8):  # a collection untracks one level of nested tuples
        gc.collect()
    assert not gc.is_tracked(memo.wire(value))  # tuples of plain values: not the GC's


class Forgetful(WireMemo):
    """Keeps the wire values by id alone, not the objects: an id is reused."""

    def wire(self, value: Any) -> Any:
        if type(value) is not tuple:
            return wire(value)
        if id(value) not in self._by_id:
            self._by_id[id(value)] = (None, wire(value))
        return self._by_id[id(value)][1]


def test_a_memo_that_lets_its_objects_go_fails() -> None:
    with pytest.raises(AssertionError):
        run(Forgetful(1 << 12), 1)
