"""BatchQueue: bounded admission, decodes first, token budget, progress and fairness."""

from __future__ import annotations

import pytest

from blockllm.worker.batch_queue import BatchQueue
from blockllm.worker.errors import ErrorCode, QueueFull


def queue(cap: int = 8, size: int = 4, tokens: int = 16, skips: int = 2) -> BatchQueue[str]:
    return BatchQueue(cap, size, tokens, max_skips=skips)


def fill(q: BatchQueue[str], *items: tuple[str, int]) -> None:
    for name, n in items:
        q.push(name, n)


def test_bounded() -> None:
    q = queue(cap=2)
    fill(q, ("a", 1), ("b", 5))
    assert q.free_slots == 0
    with pytest.raises(QueueFull) as e:
        q.push("c", 1)
    assert e.value.code == ErrorCode.QUEUE_FULL
    assert len(q) == 2
    with pytest.raises(ValueError):
        queue().push("x", 0)


def test_decodes_first_then_prefills_in_fifo_order() -> None:
    q = queue(size=8, tokens=32)
    fill(q, ("p1", 5), ("d1", 1), ("p2", 3), ("d2", 1))
    assert q.take() == ["d1", "d2", "p1", "p2"]
    assert len(q) == 0


def test_batch_size_and_token_budget() -> None:
    q = queue(size=3, tokens=10)
    fill(q, ("d1", 1), ("d2", 1), ("d3", 1), ("d4", 1))
    assert q.take() == ["d1", "d2", "d3"]  # size-limited, oldest first
    assert q.take() == ["d4"]
    fill(q, ("p1", 6), ("p2", 6), ("p3", 2))
    assert q.take() == ["p1", "p3"]  # p2 does not fit the budget; the smaller p3 does
    assert q.take() == ["p2"]


def test_long_prefill_runs_alone() -> None:
    q = queue(tokens=16)
    fill(q, ("long", 100))
    assert q.take() == ["long"]  # at least one item always progresses
    fill(q, ("long", 100))
    assert q.take(busy_size=1, busy_tokens=1) == []  # ...unless the stage already has work


def test_busy_reduces_room() -> None:
    q = queue(size=4, tokens=16)
    fill(q, ("d1", 1), ("d2", 1), ("p1", 8))
    assert q.take(busy_size=3, busy_tokens=3) == ["d1"]
    assert q.take(busy_size=1, busy_tokens=9) == ["d2"]  # p1 (8) does not fit 16 - 9 - 1


def test_a_passed_over_prefill_goes_first_after_max_skips() -> None:
    q = queue(size=2, tokens=4, skips=2)
    fill(q, ("p", 4), ("d1", 1), ("d2", 1))
    assert q.take() == ["d1", "d2"]  # decodes first; p skipped once
    fill(q, ("d3", 1), ("d4", 1))
    assert q.take() == ["d3", "d4"]  # skipped twice
    fill(q, ("d5", 1))
    assert q.take() == ["p"]  # now it is first, and fills the budget


def test_remove_if_and_entries() -> None:
    q = queue()
    fill(q, ("a", 1), ("b", 2), ("c", 1))
    assert q.remove_if(lambda e: e == "b") == ["b"]
    assert q.entries() == ["a", "c"]
