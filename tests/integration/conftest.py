"""Fixtures of the stage-engine tests (test_engine_parity.py, test_engine_kv.py); the harness
itself is engine_driver.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from blockllm.zoo import Zoo
from tests.integration.engine_driver import import_model


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is fastest, and immune to a busy machine (OpenMP
    threads spin-waiting on a loaded 2-core box made tiny sdpa calls 40x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
