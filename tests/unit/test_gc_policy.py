"""The broker's garbage-collector policy (broker/gc_policy.py): what it freezes, when it
collects, and that cycles among frozen objects that died are reclaimed by its periodic full
collection (memory stays bounded)."""

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
    policy = GcPolicy(first_s=1.0, every_s=1.0)
    frozen = gc.get_freeze_count()
    policy.tick(0.0)
    policy.tick(5.0)
    assert gc.get_freeze_count() == frozen and policy.fulls == 0


def test_frozen_cycles_that_die_are_reclaimed_at_the_periodic_full_collection() -> None:
    policy = GcPolicy(first_s=10.0, every_s=20.0)
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
        later = cycle()  # kept from now on: frozen by the full collection
        held = later()
        assert any(o is held for o in gc.get_objects())  # (the collector's, not frozen)
        policy.tick(10.0)  # first_s is over: everything collected, survivors frozen
        assert kept() is None and policy.fulls == 1
        assert not any(o is held for o in gc.get_objects())  # frozen
        policy.tick(29.0)
        assert policy.fulls == 1
        policy.tick(30.0)  # every_s after the first
        assert policy.fulls == 2 and policy.last_full_s > 0
    finally:
        policy.stop()
    assert gc.get_freeze_count() == 0


def full_collections_while_kept(n: int) -> int:
    """How many full collections the collector makes by itself while `n` lists are made and
    kept (they reach the oldest generation)."""
    seen = []

    def watch(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(watch)
    try:
        kept = [[i] for i in range(n)]
    finally:
        gc.callbacks.remove(watch)
    del kept
    return len(seen)


def test_the_collector_makes_no_full_collection_itself_while_the_policy_runs() -> None:
    thresholds = gc.get_threshold()
    gc.collect()
    assert full_collections_while_kept(400_000) > 0  # (without the policy it does)
    policy = GcPolicy()
    try:
        policy.start()
        assert gc.get_threshold()[:2] == thresholds[:2]  # the young generations as they were
        assert full_collections_while_kept(400_000) == 0
    finally:
        policy.stop()
    assert gc.get_threshold() == thresholds
