"""Per-stage batch size tuning from measured step latency: part of the Planner (pure, opt-in).

With `batch_target_ms > 0`, every snapshot, for each worker (its step p95 against the target):
- **Over the target**: smaller batches, shorter steps, a shorter tail. Only stages whose
  batches fill their limit (mean batch >= 3/4 of it) shrink. With the workers' per-stage facts
  (`stage_step_ms`: ms per forward of each stage; with `stage_mean_batch`, a point of its
  latency/batch curve), the most expensive full stages are halved first, and only as many as
  it takes: halving a batch saves at most half its forward, so stages are halved until those
  halves cover the excess over the target (a cheap stage batching many tenants keeps its
  batch). Without them, every full stage halves.
- **Under half the target**: bigger batches, more throughput. Stages with work queued double,
  up to the configured max. With per-stage facts, only while the step stays under the target
  when each doubled stage's forward doubles too (a linear bound on the curve); without them,
  every queued stage doubles.
A stage shared by several models (its key serves them all) never goes below half the
configured max: batching tenants together is what sharing is for. Each stage changes at most
once per `batch_cooldown_s`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from blockllm.broker.planner.config import PlannerConfig
from blockllm.broker.protocol import Message, SetBatch, WorkerStatus

FULL = 0.75  # a stage whose mean batch reaches this share of its limit fills it


def shared_keys(
    workers: Mapping[str, Any], manifests: Mapping[str, Any], key: Callable[..., str | None]
) -> set[str]:
    """Stage keys that serve more than one model (their blocks are the same for them)."""
    shared = set()
    for w in workers.values():
        for k, st in w.stages.items():
            users = [m for m in manifests if key(m, st.start, st.end) == k]
            if len(users) > 1:
                shared.add(k)
    return shared


class BatchTuner:
    """Decides SET_BATCH commands (Planner's loop only)."""

    def __init__(self, cfg: PlannerConfig) -> None:
        self.cfg = cfg
        self.changed_at: dict[tuple[str, str], float] = {}

    def step(
        self,
        workers: Mapping[str, WorkerStatus],
        shared: set[str],
        now: float,
        command_id: Callable[[], str],
    ) -> list[Message]:
        """`workers`: the STATS worker entries by name; `shared`: stage keys serving several
        models; `command_id()` makes ids."""
        if self.cfg.batch_target_ms <= 0:
            return []
        out: list[Message] = []
        for name, w in sorted(workers.items()):
            for key, new in sorted(self._limits(name, w, shared, now).items()):
                self.changed_at[(name, key)] = now
                out.append(SetBatch(command_id(), name, key, new))
        return out

    def _limits(self, name: str, w: WorkerStatus, shared: set[str], now: float) -> dict[str, int]:
        """New limits of one worker's stages (only those that change)."""
        target = self.cfg.batch_target_ms
        p95 = w.step_ms_p95
        cap = w.max_batch_size
        limits = w.stage_batch_limits
        means = w.stage_mean_batch
        queues = w.queue_depths
        stage_ms = w.stage_step_ms
        if p95 <= 0 or cap < 1:
            return {}
        free = {
            k: v
            for k, v in limits.items()
            if now - self.changed_at.get((name, k), -1e18) >= self.cfg.batch_cooldown_s
        }
        per_stage = any(stage_ms.get(k, 0.0) > 0 for k in free)
        new: dict[str, int] = {}
        if p95 > target:
            full = [k for k, v in free.items() if means.get(k, 0.0) >= FULL * v]
            excess = p95 - target
            # with the curve: the most expensive full stages first, until their halves cover it
            for k in sorted(full, key=lambda k: (-stage_ms.get(k, 0.0), k)):
                if per_stage and excess <= 0:
                    break
                floor = max(1, cap // 2) if k in shared else 1
                if max(floor, free[k] // 2) < free[k]:
                    new[k] = max(floor, free[k] // 2)
                    excess -= stage_ms.get(k, 0.0) / 2
        elif p95 < target / 2:
            predicted = p95
            for k in sorted(free, key=lambda k: (stage_ms.get(k, 0.0), k)):
                if queues.get(k, 0) <= 0 or free[k] >= cap:
                    continue
                if per_stage:
                    if predicted + stage_ms.get(k, 0.0) > target:
                        continue
                    predicted += stage_ms.get(k, 0.0)
                new[k] = min(cap, free[k] * 2)
        return new
