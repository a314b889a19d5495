"""What the placement search (planner/placement.py) is told: a `ModelInfo` per model from the
catalog (its chain, who can load each block, block sizes, compute per position, demand) and a
`WorkerInfo` per worker from its STATS facts (capacity, the blocks it holds). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockllm.broker.planner.facts import WorkerFacts
from blockllm.broker.planner.owners import Owners
from blockllm.broker.planner.placement import ModelInfo, WorkerInfo
from blockllm.zoo.chain import kv_row_bytes, stage_blocks


def model_info(
    manifests: Mapping[str, Any],
    owners: Owners,
    name: str,
    chain: tuple[str, ...],
    demand: float,
) -> ModelInfo | None:
    """Model `name` served through `chain` (its own, or one assembled within a tolerance);
    None when the catalog lacks it."""
    m = manifests.get(name)
    if m is None:
        return None
    tied = bool(m.tie_word_embeddings)
    # the models that can load what `chain` holds at p (planner/owners.py)
    who = tuple(owners.of(manifests, chain, p, tied) or (name,) for p in range(len(chain)))
    sizes = tuple(_block_size(manifests, who[p][0], p) for p in range(len(chain)))
    return ModelInfo(
        name=name,
        chain=chain,
        block_bytes=sizes,
        fingerprint=m.fingerprint,
        tied=tied,
        demand=demand,
        owners=who,
        compute=compute_weights(m),
        kv_row_bytes=kv_row_bytes(m),
    )


def worker_info(manifests: Mapping[str, Any], w: WorkerFacts) -> WorkerInfo:
    resident = frozenset(resident_blocks(manifests, w))
    return WorkerInfo(
        w.name, w.capacity, resident, w.refused, w.kv_budget_bytes, w.kv_page_bytes, w.host
    )


def resident_blocks(manifests: Mapping[str, Any], w: WorkerFacts) -> set[str]:
    """The blocks the stages worker `w` holds are made of (models the catalog lacks: none)."""
    blocks: set[str] = set()
    for s in w.stages.values():
        m = manifests.get(s.model)
        if m is not None:
            blocks.update(stage_blocks(m, s.start, s.end))
    return blocks


def _block_size(manifests: Mapping[str, Any], owner: str, p: int) -> int:
    sizes = tuple(manifests[owner].block_bytes)
    return int(sizes[p]) if p < len(sizes) else 0


def compute_weights(manifest: Any) -> tuple[float, ...]:
    """Work per token at each chain position: a decoder layer its weight bytes, the embedding a
    row read, the head its norm plus the lm_head matmul (also when tied to the embedding)."""
    sizes = [float(b) for b in manifest.block_bytes]
    if len(sizes) != len(manifest.chain):
        return ()
    cfg = manifest.config or {}
    itemsize = 2 if manifest.dtype in ("bfloat16", "float16") else 4
    hidden = float(cfg.get("hidden_size", 0)) * itemsize
    sizes[0] = max(1.0, hidden)
    if manifest.tie_word_embeddings:
        sizes[-1] += float(cfg.get("vocab_size", 0)) * hidden
    return tuple(sizes)
