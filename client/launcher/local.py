"""A small local cluster for programs that drive one (benchmarks, tests): a broker and named
workers with the stages given, on 127.0.0.1 with a port the OS picks, ready for some models.

    with local_cluster(zoo, {"w0": ["m:0-3"], "w1": ["m:3-6"]}, ["m"]) as c:
        with c.client() as client: ...

Workers are small by default (`SMALL_WORKER`: one thread, 64 MiB of KV, a fast heartbeat, so a
lost worker is noticed in about a second); `worker_kw[name]` overrides fields of one worker.
Everything is stopped on exit (workers first), by the same `Launcher` `blockllm serve` uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockllm.client.launcher.launcher import Launcher

FAST_BEAT_S = 0.25  # liveness interval of a local cluster: a lost worker is noticed in ~1 s
SMALL_WORKER: Mapping[str, Any] = {
    "threads": 1,
    "kv_budget_bytes": 64 << 20,
    "heartbeat_interval_s": FAST_BEAT_S,
    "grace_s": 5.0,
}


def worker_config(endpoint: str, zoo: Path, name: str, stages: Sequence[str], **kw: Any) -> Any:
    """A `SMALL_WORKER` WorkerProcConfig serving `stages` ("model:start-end"); `kw` overrides."""
    from blockllm.worker.config import StageSpec, WorkerProcConfig

    return WorkerProcConfig(
        broker=endpoint,
        zoo_dir=str(zoo),
        stages=tuple(StageSpec.parse(s) for s in stages),
        name=name,
        **{**SMALL_WORKER, **kw},
    )


@dataclass
class LocalCluster:
    launcher: Launcher
    endpoint: str
    zoo: Path

    def client(self, **kw: Any) -> Any:
        from blockllm.client import Client

        return Client(self.endpoint, **kw)

    def add_worker(self, name: str, stages: Sequence[str], **kw: Any) -> Any:
        return self.launcher.start_worker(
            name, worker_config(self.endpoint, self.zoo, name, stages, **kw)
        )


@contextlib.contextmanager
def local_cluster(
    zoo: Path,
    workers: Mapping[str, Sequence[str]],
    models: Sequence[str],
    *,
    ready_timeout: float = 90.0,
    broker: Mapping[str, Any] | None = None,
    worker_kw: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[LocalCluster]:
    """Broker + workers ({name: ["model:start-end", ...]}) ready for `models` (LaunchError if
    not within `ready_timeout`); `broker` overrides BrokerConfig fields."""
    from blockllm.broker.config import BrokerConfig

    launcher = Launcher(log_level="WARNING", stop_timeout=15.0)
    try:
        bcfg = BrokerConfig(
            bind="tcp://127.0.0.1:0", zoo_dir=str(zoo), heartbeat_s=FAST_BEAT_S, **(broker or {})
        )
        endpoint = launcher.start_broker(bcfg, ready_timeout)
        for name, stages in workers.items():
            kw = (worker_kw or {}).get(name, {})
            launcher.start_worker(name, worker_config(endpoint, zoo, name, stages, **kw))
        launcher.wait_ready(list(models), ready_timeout)
        yield LocalCluster(launcher, endpoint, zoo)
    finally:
        launcher.stop()
