"""`blockllm bench multitenant`: many fine-tuned tenants, five ways of serving them, one trace,
one memory budget.

1. Tenants (`bench_family`): SmolLM2-135M and K variants fine-tuned on slices of its upper
   layers (`quick`: a tiny random Llama family); all in one zoo.
2. Budget: what the shared zoo needs (the distinct blocks of all tenants) plus a KV reserve, or
   `budget_bytes`; raised to what the `blockllm` cluster actually holds if that is more (a tied
   head, for one, is held by the worker that runs it as well), so no baseline gets less memory.
3. The trace (`trace.py`), replayed by `blockllm` (`systems.py`), `per_model` (`per_model.py`;
   `per_model_all` is the same with a budget that holds every tenant whole), `hf_generate` and
   `hf_batched` (`hf_systems.py`), one after the other on this machine, open loop at the trace's
   times or closed loop (`saturate`: C clients, `arrivals.py`). Every system but blockllm runs
   in a fresh process of its own; every row has the measured PSS of the system's processes
   (`memory.py`) next to its accounted `resident_bytes`. All in the family's `dtype`.

The result is the JSON contract `{"blockllm": {...}, "per_model": {...}, "hf_generate": {...},
"meta": {...}}` plus `per_model_all`, `hf_batched` (see `trace.summarize` for the per-system
keys, and `pss_peak_bytes`, `pss_mean_bytes`; per_model adds `resident_bytes_unshared`: every
tenant held whole). `blockllm` runs once per planner mode
(`planner`: off = static placement, placement = the planner places by demand, dups = also
duplicates stragglers); `meta["planner_modes"]`: `{mode: {...summary, "counters",
"load_average", "other_processes_cores"}}` has each run, and `"blockllm"` is the first mode's.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from blockllm.client.bench.family import (
    Family,
    FamilySpec,
    Recipe,
    adapter_bytes,
    kv_bytes_per_token,
    model_bytes,
    prepare_family,
    shared_bytes,
)
from blockllm.client.bench.multitenant_goals import goals
from blockllm.client.bench.trace import (
    Outcome,
    TraceRequest,
    TraceSpec,
    ensure_tenants,
    make_trace,
    summarize,
    trace_facts,
)

logger = logging.getLogger(__name__)

Say = Callable[[str], None]
SYSTEMS = ("blockllm", "per_model", "per_model_all", "hf_generate", "hf_batched")
KV_RESERVE_TOKENS = 4096  # default KV reserve: this many tokens of one tenant, all layers
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class MultitenantConfig:
    """What to run. The default trace (64 requests at 2/s) offers about 60 tokens/s: more than
    one request at a time can serve (~27 on the 2-core CPU) and about what per_model can, less
    than the blockllm cluster can; README "Results" has the sweep over rates."""

    quick: bool = False
    variants: int = 6  # fine-tuned tenants besides the base
    requests: int | None = None  # None: 64
    rate: float | None = None  # requests/s; None: 2.0 (quick: 16)
    seed: int = 0
    budget_bytes: int | None = None  # None: the shared zoo + KV reserve
    kv_reserve_tokens: int = KV_RESERVE_TOKENS
    workers: int = 2
    threads: int | None = None  # per worker; None: the cores split across the workers
    planner: tuple[str, ...] = ("off",)  # blockllm runs once per mode (bench_systems)
    straggler_delay_s: float = 0.0  # added to every step of blockllm's last worker
    baseline_threads: int | None = None  # None: the faster of 1 and all cores, measured
    cache_dir: Path | None = None
    systems: tuple[str, ...] = SYSTEMS
    dtype: str = "float32"  # of every tenant, so of every system (one of DTYPES)
    saturate: int | None = None  # closed loop with this many clients; None: open loop at `rate`
    device: str = "cpu"  # of every system
    family: str = "partial"  # or "lora": the variants are PEFT adapters (bench/lora_family.py)
    full_variants: int = 0  # family "lora": full fine-tunes among the tenants too

    def trace_spec(self) -> TraceSpec:
        if self.quick:
            return TraceSpec(
                self.requests or 64,
                self.rate or 16.0,
                self.seed,
                prompt_tokens=(8, 32),
                new_tokens=(8, 32),
            )
        return TraceSpec(
            self.requests or 64,
            self.rate or 2.0,
            self.seed,
            prompt_tokens=(16, 48),
            new_tokens=(16, 48),
        )


def family_spec(cfg: MultitenantConfig, mode: str | None = None) -> FamilySpec:
    return FamilySpec(
        kind="tiny" if cfg.quick else "smollm2",
        mode=mode or cfg.family,
        variants=cfg.variants,
        full_variants=cfg.full_variants,
        cache_dir=cfg.cache_dir,
        recipe=Recipe(steps=4, seq_len=32, batch_size=2, lr=5e-4),
        dtype=cfg.dtype,
    )


def token_stream(checkpoint: Path, limit: int = 20000) -> list[int]:
    """Prompt material: the local text corpus through the family's tokenizer."""
    from transformers import AutoTokenizer

    from blockllm.zoo.tiny import local_corpus

    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids: list[int] = []
    for doc in local_corpus():
        ids.extend(tok(doc, add_special_tokens=False).input_ids)
        if len(ids) >= limit:
            break
    return ids[:limit]


@dataclass(slots=True)
class Run:
    """Everything a run produced: the JSON document and the raw outcomes (for the plot)."""

    doc: dict[str, Any]
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)


def _popularity(trace: Sequence[TraceRequest]) -> list[str]:
    counts: dict[str, int] = {}
    for r in trace:
        counts[r.model] = counts.get(r.model, 0) + 1
    return sorted(counts, key=lambda m: -counts[m])


@dataclass(frozen=True, slots=True)
class _Memory:
    shared: int
    unshared: int
    kv_reserve: int
    whole: dict[str, int]


def _memory(family: Family, cfg: MultitenantConfig) -> _Memory:
    from blockllm.zoo import Zoo

    zoo = Zoo(family.zoo_dir)
    whole = {n: model_bytes(zoo, n) for n in family.names}  # lora: an adapter merged is the base's
    kv = kv_bytes_per_token(zoo, family.base.name) * cfg.kv_reserve_tokens
    return _Memory(shared_bytes(zoo, family.names), sum(whole.values()), kv, whole)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(slots=True)
class _Bench:
    """One run's shared facts; each system method returns (outcomes, facts with
    "resident_bytes")."""

    cfg: MultitenantConfig
    family: Family
    trace: list[TraceRequest]
    mem: _Memory
    budget: int
    say: Say
    base_only: tuple[list[Outcome], dict[str, Any]] | None = None

    def blockllm(self, mode: str = "off", base_first: bool = False) -> tuple[list[Outcome], dict]:
        """`base_first`: the cluster first replays the trace with every request on the base,
        before any adapter is loaded (its memory holds none): (outcomes, facts) in `base_only`."""
        from blockllm.client.bench.systems import ClusterSpec, replay_blockllm

        self.say(f"blockllm (planner {mode}): starting the cluster and replaying the trace")
        cluster = ClusterSpec(
            zoo_dir=str(self.family.zoo_dir),
            models=self.family.names,
            kv_budget_bytes=max(1, self.mem.kv_reserve // self.cfg.workers),
            workers=self.cfg.workers,
            threads=self.cfg.threads,
            planner=mode,
            straggler_delay_s=self.cfg.straggler_delay_s,
            device=self.cfg.device,
        )
        base = self.family.base.name
        traces = [[replace(r, model=base) for r in self.trace]] if base_first else []
        *first, (outcomes, facts) = replay_blockllm(
            cluster, [*traces, self.trace], self.say, self.cfg.saturate
        )
        if first:
            (self.base_only,) = first
        # no baseline gets less memory than the cluster really holds
        self.budget = max(self.budget, facts["resident_bytes"])
        return outcomes, facts

    def per_model(self) -> tuple[list[Outcome], dict[str, Any]]:
        return self._per_model("per_model", self.budget - self.mem.kv_reserve)

    def per_model_all(self) -> tuple[list[Outcome], dict[str, Any]]:
        """per_model with a budget that holds every tenant whole (the memory it saves from)."""
        return self._per_model("per_model_all", max(self.mem.unshared, self.budget))

    def _per_model(self, name: str, weights: int) -> tuple[list[Outcome], dict[str, Any]]:
        from blockllm.client.bench.memory import run_isolated
        from blockllm.client.bench.per_model import PerModelConfig

        self.say(f"{name}: whole models under {(weights + self.mem.kv_reserve) / 2**20:.1f} MiB")
        threads = self.pick_threads(name)
        pm = PerModelConfig(
            zoo_dir=str(self.family.zoo_dir),
            weight_budget_bytes=weights,
            kv_budget_bytes=self.mem.kv_reserve,
            threads=threads["threads"],
            device=self.cfg.device,
        )
        args = {"cfg": pm, "trace": self.trace, "by_popularity": _popularity(self.trace)}
        target = "blockllm.client.bench.per_model:run_per_model"
        outcomes, facts = run_isolated(target, {**args, "clients": self.cfg.saturate})
        facts["resident_bytes"] = facts["peak_weight_bytes"] + self.mem.kv_reserve
        return outcomes, {**facts, **threads}

    def hf_generate(self) -> tuple[list[Outcome], dict[str, Any]]:
        self.say("hf_generate: one request at a time with model.generate")
        return self._hf("hf_generate", batched=False)

    def hf_batched(self) -> tuple[list[Outcome], dict[str, Any]]:
        self.say("hf_batched: each model's waiting requests left-padded into one generate call")
        return self._hf("hf_batched", batched=True)

    def _hf(self, name: str, batched: bool) -> tuple[list[Outcome], dict[str, Any]]:
        from blockllm.client.bench.hf_systems import HfSpec
        from blockllm.client.bench.memory import run_isolated

        threads = self.pick_threads(name)
        hf = HfSpec(
            checkpoints={t.name: t.checkpoint for t in self.family.tenants},
            adapters={t.name: t.adapter for t in self.family.tenants if t.adapter is not None},
            model_bytes=self.mem.whole,
            weight_budget_bytes=self.budget - self.mem.kv_reserve,
            threads=threads["threads"],
            dtype=self.cfg.dtype,
            device=self.cfg.device,
        )
        args = {"spec": hf, "trace": self.trace, "by_popularity": _popularity(self.trace)}
        target = "blockllm.client.bench.hf_systems:run_hf"
        outcomes, facts = run_isolated(
            target, {**args, "batched": batched, "clients": self.cfg.saturate}
        )
        facts["resident_bytes"] = facts["peak_weight_bytes"]  # its KV is per request, transient
        return outcomes, {**facts, **threads}

    def pick_threads(self, system: str) -> dict[str, Any]:
        """The in-process baseline's torch threads: as given, or the faster of 1 and all cores
        measured right before it runs (on a busy machine more threads can be far slower)."""
        if self.cfg.baseline_threads is not None:
            return {"threads": self.cfg.baseline_threads, "step_ms_by_threads": {}}
        from blockllm.client.bench.per_model import fastest_threads

        zoo, base = str(self.family.zoo_dir), self.family.base.name
        threads, timings = fastest_threads(zoo, base, (1, _cores()))
        self.say(f"{system}: {threads} torch thread(s) (decode step ms by threads: {timings})")
        return {"threads": threads, "step_ms_by_threads": timings}


def run_multitenant(cfg: MultitenantConfig, say: Say) -> Run:
    """Prepare the tenants, draw the trace, run every system; raises ModelBuildError,
    LaunchError, ZooError, ValueError."""
    t_start = time.monotonic()
    family = prepare_family(family_spec(cfg), say)
    spec = cfg.trace_spec()
    trace = make_trace(spec, family.names, token_stream(family.base.checkpoint))
    if family.mode == "lora":  # the full fine-tunes are in the mix whatever the Zipf draw
        full = [t.name for t in family.tenants[1:] if t.adapter is None]
        trace = ensure_tenants(trace, full)
    mem = _memory(family, cfg)
    bench = _Bench(cfg, family, trace, mem, cfg.budget_bytes or mem.shared + mem.kv_reserve, say)
    say(
        f"{len(family.names)} tenants, {len(trace)} requests "
        f"{f'from {cfg.saturate} closed-loop clients' if cfg.saturate else f'at {spec.rate:g}/s'}"
        f"; shared zoo "
        f"{mem.shared / 2**20:.1f} MiB, all whole {mem.unshared / 2**20:.1f} MiB, KV reserve "
        f"{mem.kv_reserve / 2**20:.1f} MiB"
    )
    facts: dict[str, Any] = {}
    run = Run({})
    modes: dict[str, Any] = {}
    if "blockllm" in cfg.systems:  # first: its resident bytes may raise the budget
        lora = family.mode == "lora"  # the cost of heterogeneity: the same trace, all on base
        modes = _planner_modes(bench, cfg.planner, run, facts, say, base_first=lora)
        if lora:
            _base_only(bench, run, say)
    for name in SYSTEMS[1:]:
        if name in cfg.systems:
            mark = _cpu_marks()
            outcomes, facts[name] = getattr(bench, name)()
            facts[name]["other_processes_cores"] = _other_cores(mark)
            run.outcomes[name] = outcomes
            run.doc[name] = _row(outcomes, facts[name])
            _report(say, name, run.doc[name])
            gc.collect()
    if "per_model" in run.doc:
        run.doc["per_model"]["resident_bytes_unshared"] = mem.unshared + mem.kv_reserve
    run.doc["meta"] = _meta(cfg, family, spec, trace, mem, bench.budget, facts)
    run.doc["meta"]["goals"] = goals(run.doc)
    run.doc["meta"]["planner_modes"] = modes
    run.doc["meta"]["seconds"] = round(time.monotonic() - t_start, 1)
    return run


def _planner_modes(
    bench: _Bench, modes: Sequence[str], run: Run, facts: dict, say: Say, base_first: bool
) -> dict[str, Any]:
    """Run blockllm once per planner mode; the first is "blockllm" in the document.
    `base_first`: the "off" run's cluster replays the base-only trace first (`_Bench.blockllm`)."""
    out: dict[str, Any] = {}
    for mode in modes or ("off",):
        mark = _cpu_marks()
        outcomes, f = bench.blockllm(mode, base_first and mode == "off" and not bench.base_only)
        f["other_processes_cores"] = _other_cores(mark)
        summary = _row(outcomes, f)
        out[mode] = {
            **summary,
            "counters": f["counters"],
            "other_processes_cores": f["other_processes_cores"],
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        _report(say, f"blockllm (planner {mode})", summary)
        if "blockllm" not in run.doc:
            run.doc["blockllm"], run.outcomes["blockllm"], facts["blockllm"] = summary, outcomes, f
        else:
            run.outcomes[f"blockllm[{mode}]"] = outcomes
        gc.collect()
    return out


def _base_only(bench: _Bench, run: Run, say: Say) -> None:
    """The same trace with every request sent to the base model, replayed by the "off" run's
    cluster before the LoRA trace (or, with no "off" among the planner modes, by a cluster of
    its own): `blockllm_base_only` (its tokens/s is what the LoRA tenants' run is held to)."""
    if bench.base_only is None:
        lora_trace = bench.trace
        bench.trace = [replace(r, model=bench.family.base.name) for r in lora_trace]
        try:
            budget = bench.budget
            bench.base_only = bench.blockllm("off")
            bench.budget = budget
        finally:
            bench.trace = lora_trace
    outcomes, f = bench.base_only
    run.doc["blockllm_base_only"] = _row(outcomes, f)
    _report(say, "blockllm, every request on the base", run.doc["blockllm_base_only"])
    gc.collect()


def _row(outcomes: Sequence[Outcome], facts: dict[str, Any]) -> dict[str, Any]:
    """A system's row: the contract's numbers, the accounted and the measured memory."""
    row = summarize(outcomes, facts.pop("resident_bytes"))
    row["pss_peak_bytes"] = facts.pop("pss_peak_bytes", None)
    row["pss_mean_bytes"] = facts.pop("pss_mean_bytes", None)
    return row


def run_sweep(cfg: MultitenantConfig, rates: Sequence[float], say: Say) -> dict[str, Any]:
    """One open-loop run per rate (same tenants, same seed): {"rates": [{"rate_rps", every
    system's row, "goals"}, ...], "meta": the first run's meta}."""
    out: dict[str, Any] = {"rates": []}
    for rate in rates:
        say(f"sweep: rate {rate:g}/s")
        doc = run_multitenant(replace(cfg, rate=rate, saturate=None), say).doc
        rows = {k: v for k, v in doc.items() if k != "meta"}
        out["rates"].append({"rate_rps": rate, **rows, "goals": doc["meta"]["goals"]})
        out.setdefault("meta", doc["meta"])
    return out


def _cpu_marks() -> tuple[float, float, float]:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process and its
    reaped children) now."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    me = os.times()
    return time.monotonic(), busy, me.user + me.system + me.children_user + me.children_system


def _other_cores(start: tuple[float, float, float]) -> float:
    """Cores other processes (not this benchmark) kept busy on average since `start`: the
    machine is shared, and this says how much it was while a system ran."""
    end = _cpu_marks()
    wall = max(1e-9, end[0] - start[0])
    return round(max(0.0, (end[1] - start[1]) - (end[2] - start[2])) / wall, 2)


def _report(say: Say, name: str, s: dict[str, Any]) -> None:
    say(
        f"{name}: p95 {s['p95_ms']} ms, {s['tokens_per_s']} tok/s, "
        f"{s['errors']} errors of {s['requests']}"
    )


def _meta(
    cfg: MultitenantConfig,
    family: Family,
    spec: TraceSpec,
    trace: Sequence[TraceRequest],
    mem: _Memory,
    budget: int,
    facts: dict[str, Any],
) -> dict[str, Any]:
    from blockllm.zoo import Zoo

    return {
        "family": family.kind,
        "family_mode": family.mode,
        "tenants": list(family.names),
        "variant_layers": {t.name: t.layers for t in family.tenants[1:]},
        "trace": {
            "seed": spec.seed,
            "rate_rps": spec.rate,
            "zipf_s": spec.zipf_s,
            "prompt_tokens": list(spec.prompt_tokens),
            "new_tokens": list(spec.new_tokens),
            **trace_facts(trace),
        },
        "budget_bytes": budget,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "saturate_clients": cfg.saturate,
        "planner": list(cfg.planner),
        "straggler_delay_s": cfg.straggler_delay_s,
        "shared_zoo_bytes": mem.shared,
        "adapter_bytes": adapter_bytes(Zoo(family.zoo_dir), family.names),
        "kv_reserve_bytes": mem.kv_reserve,
        "cores": _cores(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "systems": facts,
    }
