"""Per-stage batch size tuning from measured step latency: part of the Planner (pure, opt-in).

With `batch_target_ms > 0`, every snapshot: a worker whose recent step p95 exceeds the target
halves the max batch of each of its stages whose batches fill their limit (mean batch >= 3/4
of it): smaller batches, shorter steps, a shorter tail. A worker well under the target (p95 <
half of it) doubles, up to its configured max, the limit of each stage with work queued: bigger
batches, more throughput. A stage shared by several models (its key serves them all) never goes
below half the configured max: batching tenants together is what sharing is for. Each stage
changes at most once per `batch_cooldown_s`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockllm.broker.planner_config import PlannerConfig
from blockllm.broker.protocol import Message, SetBatch


class BatchTuner:
    """Decides SET_BATCH commands (Planner's loop only)."""

    def __init__(self, cfg: PlannerConfig) -> None:
        self.cfg = cfg
        self.changed_at: dict[tuple[str, str], float] = {}

    def step(
        self,
        workers: Mapping[str, Mapping[str, Any]],
        shared: set[str],
        now: float,
        command_id: Any,
    ) -> list[Message]:
        """`workers`: the STATS worker entries by name; `shared`: stage keys serving several
        models; `command_id()` makes ids."""
        target = self.cfg.batch_target_ms
        if target <= 0:
            return []
        out: list[Message] = []
        for name, w in sorted(workers.items()):
            p95 = float(w.get("step_ms_p95") or 0.0)
            cap = int(w.get("max_batch_size") or 0)
            limits = w.get("stage_batch_limits") or {}
            means = w.get("stage_mean_batch") or {}
            queues = w.get("queue_depths") or {}
            if p95 <= 0 or cap < 1:
                continue
            for key, limit in sorted(limits.items()):
                if now - self.changed_at.get((name, key), -1e18) < self.cfg.batch_cooldown_s:
                    continue
                floor = max(1, cap // 2) if key in shared else 1
                new = limit
                if p95 > target and means.get(key, 0.0) >= 0.75 * limit:
                    new = max(floor, limit // 2)
                elif p95 < target / 2 and queues.get(key, 0) > 0:
                    new = min(cap, limit * 2)
                if new != limit:
                    self.changed_at[(name, key)] = now
                    out.append(SetBatch(command_id(), name, key, new))
        return out
