"""The multi-tenant benchmark's goals (issues 15 and 16), each with its measured value and
whether it is met; `goals(doc)` reads a finished run's document."""

from __future__ import annotations

from typing import Any

# goals of issue 15 on this CPU
GOAL_P95_REDUCTION = 0.40  # open loop, vs per_model
GOAL_MEMORY_RATIO = 0.35  # measured PSS peak, vs per_model_all (every tenant whole)
GOAL_THROUGHPUT_RATIO = 2.0  # tokens/s vs hf_batched (at saturation)
GOAL_CAPACITY_RATIO = 1.6  # tokens/s vs per_model at saturation
# issue 16 (--family lora): p95 vs per_model (adapters merged), memory vs base + adapters
GOAL_LORA_P95_REDUCTION = 0.5
GOAL_LORA_MEMORY_RATIO = 1.1
GOAL_LORA_HETEROGENEITY = 0.8  # tokens/s vs the same trace with every request on the base


def _goal(value: float, goal: float, higher: bool) -> dict[str, Any]:
    return {
        "value": round(value, 3),
        "goal": goal,
        "met": value >= goal if higher else value <= goal,
    }


def goals(doc: dict[str, Any]) -> dict[str, Any]:
    """Issue 15's goals, each with the measured value and whether it is met (absent: a system
    it needs did not run). Closed loop (`meta.saturate_clients`): capacity ratios; open loop:
    the p95 reduction. Memory: blockllm's measured PSS peak vs per_model_all's, whose run holds
    every tenant whole (and the accounted ratio, for reference)."""
    out: dict[str, Any] = {}
    b, pm, pma = doc.get("blockllm"), doc.get("per_model"), doc.get("per_model_all")
    hfb = doc.get("hf_batched")
    meta = doc.get("meta", {})
    closed = bool(meta.get("saturate_clients"))
    lora = meta.get("family_mode") == "lora"  # issue 16's goals
    if b and pm and b["p95_ms"] and pm["p95_ms"] and not closed:
        goal = GOAL_LORA_P95_REDUCTION if lora else GOAL_P95_REDUCTION
        out["p95_reduction_vs_per_model"] = _goal(1.0 - b["p95_ms"] / pm["p95_ms"], goal, True)
    base_only = doc.get("blockllm_base_only")
    if b and lora and base_only and base_only["tokens_per_s"]:
        ratio = b["tokens_per_s"] / base_only["tokens_per_s"]
        out["tokens_per_s_vs_base_only"] = _goal(ratio, GOAL_LORA_HETEROGENEITY, True)
    if b and lora and base_only and b.get("pss_peak_bytes") and base_only.get("pss_peak_bytes"):
        # measured: the cluster serving the adapters vs serving the base only + the adapters
        ratio = b["pss_peak_bytes"] / (base_only["pss_peak_bytes"] + meta.get("adapter_bytes", 0))
        out["measured_memory_vs_base_plus_adapters"] = _goal(ratio, GOAL_LORA_MEMORY_RATIO, False)
    if b and lora and meta.get("shared_zoo_bytes"):  # the base + the adapters (+ KV reserve)
        ratio = b["resident_bytes"] / (meta["shared_zoo_bytes"] + meta["kv_reserve_bytes"])
        out["accounted_memory_vs_base_plus_adapters"] = _goal(ratio, GOAL_LORA_MEMORY_RATIO, False)
    if b and pm and pm["tokens_per_s"] and closed:
        ratio = b["tokens_per_s"] / pm["tokens_per_s"]
        out["capacity_vs_per_model"] = _goal(ratio, GOAL_CAPACITY_RATIO, True)
    if b and pma and b.get("pss_peak_bytes") and pma.get("pss_peak_bytes"):
        ratio = b["pss_peak_bytes"] / pma["pss_peak_bytes"]
        out["measured_memory_vs_per_model_all"] = _goal(ratio, GOAL_MEMORY_RATIO, False)
    if b and pm and pm.get("resident_bytes_unshared"):
        ratio = b["resident_bytes"] / pm["resident_bytes_unshared"]
        out["accounted_memory_vs_unshared"] = _goal(ratio, GOAL_MEMORY_RATIO, False)
    if b and hfb and hfb["tokens_per_s"]:
        ratio = b["tokens_per_s"] / hfb["tokens_per_s"]
        out["tokens_per_s_vs_hf_batched"] = _goal(ratio, GOAL_THROUGHPUT_RATIO, True)
    return out
