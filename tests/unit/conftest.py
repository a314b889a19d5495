"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.client_standin import StandIn


@pytest.fixture
def peer() -> Iterator[StandIn]:
    p = StandIn()
    yield p
    p.close()
