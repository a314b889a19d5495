"""Why a model is not covered, as the planner sees it: PLANNER_REPORT's notes, which the
broker shows in STATUS (`models[m].uncovered`) so that an operator knows what to do."""

from __future__ import annotations

from typing import Any

from blockllm.broker.protocol import StatsBody


def uncovered_notes(p: Any, body: StatsBody) -> dict[str, str]:
    """{model: why} for each model the STATS `body` shows uncovered (`p`: the Planner)."""
    out: dict[str, str] = {}
    t = p.target
    for name, m in body.models.items():
        if m.covered:
            continue
        if name not in p.manifests:
            out[name] = "the planner has no manifest for it yet (reading the broker's catalog)"
        elif not body.workers:
            out[name] = "no worker is registered"
        elif t is None or name not in t.models:
            out[name] = "the planner has not placed it yet"
        elif name in t.plan.uncovered:
            mib = sum(p.manifests[name].block_bytes) / (1 << 20)
            out[name] = (
                f"no worker has room for it: its weights ({mib:.0f} MiB) do not fit the "
                "workers' free weight memory (raise --memory-budget / --worker-memory, or add "
                "a worker)"
            )
        else:
            out[name] = _progress(p, t)
    return out


def _progress(p: Any, t: Any) -> str:
    """Where the target's loads stand (a placed model not covered yet)."""
    tries = p.cfg.load_tries
    failed = sorted({w for (w, _), (_, n) in p.pending_loads.items() if n > tries})
    if failed:
        return f"loading its stages failed on {', '.join(failed)} (see their logs)"
    room = sorted({k[0] for k in p.waiting_room if k in t.stage_keys})
    if room:
        return f"waiting for memory on {', '.join(room)} (stages being unloaded to make room)"
    loading = sorted({w for w, _ in p.pending_loads})
    if loading:
        return f"its stages are loading on {', '.join(loading)}"
    return "placed; waiting for the workers to advertise its stages"
