"""Fixtures of the stage-engine tests (test_engine_parity.py, test_engine_kv.py); the harness
itself is engine_driver.py. (One torch thread for the test process: tests/conftest.py.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from blockllm.zoo import Zoo
from tests.integration.engine_driver import import_model


@pytest.fixture(scope="module")
def tiny_zoo(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Zoo, Path]]:
    """family -> (a zoo holding the tiny checkpoint as "m", its folder); imported once."""
    cache: dict[str, tuple[Zoo, Path]] = {}

    def get(family: str) -> tuple[Zoo, Path]:
        if family not in cache:
            ckpt = tiny_checkpoint(family)
            cache[family] = (import_model(tmp_path_factory.mktemp(f"zoo-{family}"), ckpt), ckpt)
        return cache[family]

    return get
