"""The load facts a worker reports: free KV and slots (READY), and per-step and per-stage
latency and batching (HEARTBEAT), computed on the compute thread and read by the IO thread.

Step latency and batch facts describe the steps of the last `FACTS_WINDOW_S` seconds (0 when
idle), so a planner sees a straggler recover. Per stage: the mean batch and the ms per forward
since the previous snapshot (from the engine's cumulative counters).
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from typing import Any

import psutil

from blockllm.broker.protocol import PROTOCOL_VERSION, Heartbeat, KVGeometryUse, Ready, StageRef

FACTS_WINDOW_S = 10.0


def engine_load(engine: Any, s: Any = None) -> tuple[int, int, int, dict[str, int]]:
    """(kv_total_bytes, kv_free_bytes, free_slots, queue depth per stage key) of the engine
    (from its `stats()`, or `s`, a snapshot of them).

    `free_slots` is the credit the broker dispatches against: items the engine's stage queues
    still take before `submit` raises QueueFull.
    """
    s = engine.stats() if s is None else s
    return s.kv_total_bytes, s.kv_free_bytes, s.free_slots, dict(s.queue_depths)


def kv_geometries(engine: Any) -> tuple[KVGeometryUse, ...]:
    """The engine's KV arena per geometry (none for an engine without one)."""
    kv = getattr(engine, "kv", None)
    if kv is None or not hasattr(kv, "geometry_stats"):
        return ()
    return tuple(
        KVGeometryUse(g.label, g.page_size, g.used_bytes, g.n_sequences, g.stages, g.page_bytes)
        for g in kv.geometry_stats()
    )


def ready_message(
    name: str, cfg: Any, stages: tuple[StageRef, ...], engine: Any, refused: tuple[str, ...] = ()
) -> Ready:
    """The READY a worker named `name` (a WorkerProcConfig `cfg`) sends with `stages` (and
    the blocks it cannot get, `refused`)."""
    kv_total, kv_free, free_slots, _depths = engine_load(engine)
    return Ready(
        protocol_version=PROTOCOL_VERSION,
        name=name,
        pid=os.getpid(),
        host=socket.gethostname(),
        device=cfg.device,
        stages=stages,
        kv_total_bytes=kv_total,
        kv_free_bytes=kv_free,
        max_batch_size=cfg.max_batch_size,
        free_slots=free_slots,
        memory_budget_bytes=cfg.memory_budget_bytes,
        refused_blocks=refused,
        pinned=pinned_keys(cfg, stages),
        kv_geometries=kv_geometries(engine),
    )


def pinned_keys(cfg: Any, stages: tuple[StageRef, ...]) -> tuple[str, ...]:
    """Keys of the loaded `stages` that `cfg` configured, when its stages are pins."""
    if not getattr(cfg, "pin_stages", False):
        return ()
    configured = {(s.model, s.start, s.end) for s in cfg.stages}
    return tuple(s.key for s in stages if (s.model, s.start, s.end) in configured)


class Facts:
    """Keeps the latest `Heartbeat` snapshot of one engine.

    `on_step` and `refresh` are for the compute thread; `current` is one reference read, safe
    from the IO thread (a ping answered while the compute thread is busy)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.current = Heartbeat()
        self.steps = 0
        # (monotonic time, step ms, batch) of recent steps
        self._recent: deque[tuple[float, float, int]] = deque(maxlen=512)
        self._counts: dict[str, tuple[int, int]] = {}  # key -> (forwards, items) seen
        self._mean: dict[str, float] = {}
        self._busy: dict[str, float] = {}  # key -> forward seconds seen
        self._ms: dict[str, float] = {}  # key -> ms per forward lately
        self._at = 0.0
        self._proc = psutil.Process()
        self.spec: Any = None  # a worker/speculate.py Speculation, once the worker speculates
        self.timings: Any = None  # the compute loop's Timings (worker/clock.py), if any

    def on_step(self, seconds: float, batch: int) -> None:
        """One engine step that did work: `seconds` long, `batch` results."""
        self.steps += 1
        self._recent.append((time.monotonic(), seconds * 1000, batch))

    def refresh(self, engine: Any, *, force: bool = False) -> bool:
        """Take a new snapshot (while busy: at most twice a beat); whether it did."""
        now = time.monotonic()
        if not force and now - self._at < self.interval_s / 2:
            return False
        self._at = now
        stats = engine.stats()  # once: it walks the stages and the KV arena
        _total, kv_free, free_slots, depths = engine_load(engine, stats)
        recent = [r for r in self._recent if r[0] >= now - FACTS_WINDOW_S]
        ms = sorted(r[1] for r in recent)
        self.current = Heartbeat(
            kv_free_bytes=kv_free,
            free_slots=free_slots,
            queue_depths=depths,
            rss_bytes=self._proc.memory_info().rss,
            steps=self.steps,
            step_ms_p50=ms[len(ms) // 2] if ms else 0.0,
            step_ms_p95=ms[min(len(ms) - 1, int(len(ms) * 0.95))] if ms else 0.0,
            mean_batch=sum(r[2] for r in recent) / len(recent) if recent else 0.0,
            **self._stage_facts(engine, stats),
            **self._speculation_facts(),
            kv_geometries=kv_geometries(engine),
            timings=self.timings.snapshot() if self.timings is not None else {},
        )
        return True

    def _speculation_facts(self) -> dict[str, int]:
        if self.spec is None:
            return {}
        s = self.spec.stats()
        return {"speculated": s.speculated, "accepted": s.accepted, "rejected": s.rejected}

    def _stage_facts(self, engine: Any, s: Any) -> dict[str, Any]:
        """Weight bytes, per-stage batch limits, mean batch and ms per forward since the last
        snapshot (`s`: the engine's stats now)."""
        limits = getattr(engine, "batch_limits", dict)()
        busy = getattr(s, "busy_s", None) or {}
        for key, forwards in s.forwards.items():
            items = s.items.get(key, 0)
            f0, i0 = self._counts.get(key, (0, 0))
            b0 = self._busy.get(key, 0.0)
            if forwards < f0:  # unloaded and loaded again: its counters restarted
                f0, i0, b0 = 0, 0, 0.0
            if forwards > f0:
                self._mean[key] = (items - i0) / (forwards - f0)
                if key in busy:
                    self._ms[key] = 1000 * (busy[key] - b0) / (forwards - f0)
            self._counts[key] = (forwards, items)
            self._busy[key] = busy.get(key, 0.0)
        for gone in set(self._mean) - set(s.forwards):
            del self._mean[gone]
            self._counts.pop(gone, None)
        for gone in set(self._ms) - set(s.forwards):
            del self._ms[gone]
            self._busy.pop(gone, None)
        return {
            "weight_bytes": s.weight_bytes,
            "stage_batch_limits": dict(limits),
            "stage_mean_batch": dict(self._mean),
            "stage_step_ms": dict(self._ms),
            "stage_adapters": dict(getattr(s, "adapters", None) or {}),
        }
