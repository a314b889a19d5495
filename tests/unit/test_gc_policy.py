"""The broker's garbage-collector policy (broker/gc_policy.py): what it freezes, and that
cycles among frozen objects that died are reclaimed by its periodic full collection (memory
stays bounded)."""

from __future__ import annotations

import gc
import weakref

from blockllm.broker.gc_policy import GcPolicy


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_a_tick_before_start_changes_nothing() -> None:
    policy = GcPolicy(full_every_s=1.0)
    frozen = gc.get_freeze_count()
    gc.collect()
    policy.tick(0.0)
    policy.tick(5.0)
    assert gc.get_freeze_count() == frozen and policy.fulls == 0 and policy.frozen == 0


def test_frozen_cycles_that_die_are_reclaimed_at_the_periodic_full_collection() -> None:
    policy = GcPolicy(full_every_s=10.0)
    kept = cycle()  # alive at start: frozen
    held = kept()
    try:
        policy.start()
        assert gc.get_freeze_count() > 0
        policy.tick(0.0)
        del held  # a frozen cycle dies: no collection reaches it while frozen
        gc.collect()
        assert kept() is not None
        policy.tick(5.0)
        assert kept() is not None and policy.fulls == 0
        policy.tick(10.0)  # the period is over: everything is collected, survivors frozen
        assert kept() is None and policy.fulls == 1 and gc.get_freeze_count() > 0
    finally:
        policy.stop()
    assert gc.get_freeze_count() == 0 and policy._on_gc not in gc.callbacks


def test_the_survivors_of_the_collectors_full_collections_are_frozen_at_the_next_tick() -> None:
    policy = GcPolicy(full_every_s=1e9)
    try:
        policy.start()
        policy.tick(0.0)
        before = gc.get_freeze_count()
        later = [Node() for _ in range(1000)]  # kept since the start
        policy.tick(1.0)
        assert gc.get_freeze_count() == before  # no full collection ran: nothing frozen
        gc.collect()  # (a full one, as the collector's own)
        policy.tick(2.0)
        assert policy.frozen == 1 and gc.get_freeze_count() >= before + len(later)
        gc.collect(0)  # a young one: no freeze
        policy.tick(3.0)
        assert policy.frozen == 1
    finally:
        policy.stop()
