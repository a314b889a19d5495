"""Stages an operator configured (`blockllm worker --stage`, `[workers.NAME] stages`) are pins:
the planner never unloads them, and a model the live workers' pinned stages cover is left to
them (not placed again elsewhere; its planner-loaded copies are unloaded), so the operator's
split (e.g. the layers meant for a GPU node) takes effect. A pin lasts as long as its worker:
once the worker is lost, its models are placed by the planner as any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

Key = tuple[str, str]  # (worker name, stage key)


def pinned_keys(workers: Mapping[str, Any]) -> set[Key]:
    """Every (worker, stage key) pinned by live workers (those the planner must keep)."""
    return {(w.name, k) for w in workers.values() for k in w.pinned if k in w.stages}


def pin_covered(planner: Any, model: str, workers: Mapping[str, Any]) -> bool:
    """Whether the live workers' pinned stages alone cover `model`'s chain."""
    pinned = {
        n: replace(w, stages={k: s for k, s in w.stages.items() if k in w.pinned})
        for n, w in workers.items()
        if w.pinned
    }
    return bool(pinned) and planner.covered(model, pinned)
