"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.broker_harness import W0, W1, Harness
from tests.unit.client_standin import StandIn


@pytest.fixture
def peer() -> Iterator[StandIn]:
    p = StandIn()
    yield p
    p.close()


@pytest.fixture
def h() -> Harness:
    return Harness()


@pytest.fixture
def split(h: Harness) -> Harness:
    """Two workers: w0 hosts embed + layers 0..1, w1 layers 2..3 + head (both models)."""
    h.ready(W0, [("base", 0, 3)])
    h.ready(W1, [("base", 3, 4), ("ft", 3, 4), ("base", 4, 6)])
    return h
