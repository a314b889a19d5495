"""Weight memory while the placement changes: a load never pushes a worker over its budget.

The target placement fits every budget, but the way there loads new stages before the old
ones go (so no model loses its route). `Room` checks each load against what the worker holds
now plus the loads already on their way (blocks counted once per worker, as the worker's
block cache holds them); a load that does not fit waits, and stages the target does not keep
are unloaded from that worker first, as long as every model stays covered without them and
no sent route uses them while its model's new routes load (hosted.py `spared`). A load
that has waited `load_timeout_s` for room may unload even those (a short gap in coverage, the
requests wait for their route, rather than a placement that never completes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from blockllm.zoo.chain import stage_blocks as chain_blocks

Key = tuple[str, str]  # (worker name, stage key)
Stage = tuple[str, int, int]  # (model to load it from, start, end)


def stage_blocks(manifests: Mapping[str, Any], model: str, start: int, end: int) -> set[str]:
    """Block ids a stage holds: its positions' blocks, and the embedding under a tied head."""
    m = manifests.get(model)
    return set() if m is None else set(chain_blocks(m, start, end))


def block_sizes(manifests: Mapping[str, Any]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for m in manifests.values():
        for b, n in zip(m.chain, m.block_bytes, strict=False):
            sizes[b] = int(n)
    return sizes


class Room:
    """Per snapshot: what each worker holds, and whether one more stage fits its budget."""

    def __init__(
        self,
        manifests: Mapping[str, Any],
        workers: Mapping[str, Any],
        pending: Mapping[str, Iterable[Stage]],
    ) -> None:
        self.manifests = manifests
        self.sizes = block_sizes(manifests)
        self.capacity = {n: w.capacity for n, w in workers.items()}
        self.held: dict[str, set[str]] = {}
        for name, w in workers.items():
            blocks: set[str] = set()
            for s in w.stages.values():
                blocks |= stage_blocks(manifests, s.model, s.start, s.end)
            for owner, a, b in pending.get(name, ()):
                blocks |= stage_blocks(manifests, owner, a, b)
            self.held[name] = blocks

    def fits(self, worker: str, stage: Stage) -> bool:
        """Whether `stage` fits `worker`'s budget on top of what it holds and is loading."""
        cap = self.capacity.get(worker, math.inf)
        if cap == math.inf:
            return True
        blocks = self.held[worker] | stage_blocks(self.manifests, *stage)
        return sum(self.sizes.get(b, 0) for b in blocks) <= cap

    def take(self, worker: str, stage: Stage) -> None:
        self.held[worker] |= stage_blocks(self.manifests, *stage)


def removable(
    worker: Any,
    keep: set[Key],
    busy: set[Key],
    covered_without: Callable[[str, str], bool],
    force: bool,
) -> list[str]:
    """Keys of `worker`'s stages that may go to make room: not kept by the target or a
    duplicate, not already going, and (unless `force`) not needed to cover any model."""
    out = []
    for key in sorted(worker.stages):
        k = (worker.name, key)
        if k in keep or k in busy or key in worker.draining:
            continue
        if force or covered_without(worker.name, key):
            out.append(key)
    return out
