"""`bench speculative`: does speculative execution (worker/speculate.py) pay on SmolLM2?

In-process, on the stage engine (one `Worker`, no sockets). A model is cut into hops
`[0, a) | [a, b) | [b, c) | [c, L+2)` (chain positions); hop `[a, b)` is "stage k" and
`[b, c)` is "stage k+1", which speculates on stage k's own input while stage k runs. Greedy
decoding of a set of prompts, first exactly, then once per tolerance with speculation:

- distance: `||x_{k+1} - x_k|| / ||x_{k+1}||` between stage k+1's real and predicted input,
  on the exact trajectory (percentiles over all decode steps);
- acceptance per tolerance: on the exact trajectory (the fraction of distances within it) and
  realized in the speculative run (which drifts once a kept result changed a token);
- greedy agreement with exact serving: tokens equal position by position, whole continuations;
- latency saved per decode step (compute only, network hops ignored): exact serving runs
  stage k then k+1 (`T_k + T_k1`); speculation runs k+1 early, overlapping k, then answers
  the real input: accepted, `max(T_k, T_spec) + T_fix` (the first-layer KV rewrite) instead of
  `T_k + T_spec`; rejected, the rerun starts only once the early run is done too, which costs
  `max(0, T_spec - T_k)`. The mean over all decode steps is `saved_ms_per_step`.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Say = Callable[[str], None]

TOLERANCES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
# (a, b, c) chain positions of SmolLM2 (30 layers, chain 0..31): one layer per stage mid-model,
# 4-layer stages, and the model in two halves (the two-worker pipeline)
CUTS = ((15, 16, 17), (12, 16, 20), (1, 16, 31))
QUICK_CUTS = ((4, 5, 6), (1, 5, 9))  # the tiny family: 8 layers, chain 0..9
PROMPTS = (
    "The history of the printing press begins",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which plants",
    "Here is a short recipe for pancakes:",
    "The three laws of thermodynamics state that",
    "Once upon a time, in a small village by the sea,",
    "To install the package, first run",
    "The capital of Australia is",
)


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    tolerances: tuple[float, ...] = TOLERANCES
    cuts: tuple[tuple[int, int, int], ...] = CUTS
    prompts: int = 6
    new_tokens: int = 24
    threads: int | None = None
    cache_dir: Path | None = None
    quick: bool = False  # the tiny random Llama family instead of SmolLM2


@dataclass(slots=True)
class _Trace:
    """One prompt's greedy decode (per decode step lists, prefill excluded)."""

    tokens: list[int] = field(default_factory=list)
    distance: list[float] = field(default_factory=list)
    # exact runs: stage k's and k+1's inputs per decode step (for the delta predictor)
    inputs: list[tuple[Any, Any]] = field(default_factory=list)
    t_k: list[float] = field(default_factory=list)
    t_k1: list[float] = field(default_factory=list)  # exact: hop k+1; speculative: its early run
    t_after: list[float] = field(default_factory=list)  # speculative: answer of the real input
    t_step: list[float] = field(default_factory=list)  # all hops of the step (exact)
    outcomes: list[str] = field(default_factory=list)


class _Chain:
    """Greedy decoding through the 4 hops of one cut; hop 2 speculates when asked."""

    K = 1  # hop index of stage k; stage k+1 is K + 1

    def __init__(self, spec: Any, keys: list[str]) -> None:
        self.spec, self.keys = spec, keys

    def _hop(self, item: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        self.spec.submit(item)
        (r,) = self.spec.step()
        if r.error is not None:
            raise RuntimeError(f"bench item failed: {r.error} {r.message}")
        return r, time.perf_counter() - t0

    def decode(self, rid: str, prompt: list[int], new: int, speculate: bool) -> _Trace:
        import torch

        from blockllm.worker.items import WorkItem

        trace, past, total = _Trace(), 0, len(prompt) + new
        x: Any = torch.tensor(prompt)
        for step in range(new):
            times: list[float] = []
            inputs: list[Any] = []
            for hop, key in enumerate(self.keys):
                inputs.append(x)
                ids = hop == 0
                item = WorkItem(
                    rid, step, (key,), past, x if ids else None, None if ids else x, total
                )
                if past > 0 and hop == self.K + 1 and speculate:
                    r, t = self._speculative_hop(item, inputs[self.K], trace)
                else:
                    r, t = self._hop(item)
                times.append(t)
                x = r.hidden if r.token_id is None else torch.tensor([r.token_id])
            if past > 0:
                self._note_step(trace, times, inputs, speculate)
            past = len(prompt) + len(trace.tokens)
            trace.tokens.append(int(x[0]))
        self.spec.release(rid)
        return trace

    def _speculative_hop(self, item: Any, predicted: Any, trace: _Trace) -> tuple[Any, float]:
        from dataclasses import replace

        t0 = time.perf_counter()
        self.spec.speculate(replace(item, hidden=predicted, max_total_len=0))
        assert self.spec.step() == []  # kept for the real input
        trace.t_k1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trace.outcomes.append(self.spec.submit(item))
        (r,) = self.spec.step()
        trace.t_after.append(time.perf_counter() - t0)
        return r, trace.t_after[-1]

    def _note_step(self, trace: _Trace, times: list[float], inputs: list[Any], spec: bool):
        from blockllm.worker.speculate import relative_distance

        k = self.K
        trace.distance.append(relative_distance(inputs[k + 1], inputs[k]))
        trace.t_k.append(times[k])
        if not spec:
            trace.inputs.append((inputs[k], inputs[k + 1]))
            trace.t_k1.append(times[k + 1])
            trace.t_step.append(sum(times))


def delta_distances(trace: _Trace) -> list[float]:
    """Distances of a second predictor, on the exact trajectory: stage k's input plus stage
    k's update of the previous token, `x_k(p) + x_k1(p-1) - x_k(p-1)` (not served; measured
    to see whether a better guess than the paper's would change the verdict)."""
    from blockllm.worker.speculate import relative_distance

    out = []
    for (xk_prev, xk1_prev), (xk, xk1) in itertools.pairwise(trace.inputs):
        out.append(relative_distance(xk1, xk + (xk1_prev - xk_prev)))
    return out


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _ms(values: Sequence[float]) -> float:
    return round(1000 * statistics.median(values), 3) if values else 0.0


def _tolerance_row(tol: float, exact: list[_Trace], runs: list[_Trace]) -> dict[str, Any]:
    """Acceptance, agreement and latency saved at one tolerance (all prompts)."""
    dist = [d for t in exact for d in t.distance]
    delta = [d for t in exact for d in delta_distances(t)]
    outcomes = [o for t in runs for o in t.outcomes]
    accepted = outcomes.count("accepted")
    saved, full = [], []
    for run, ref in zip(runs, exact, strict=True):
        steps = zip(run.t_k, run.t_k1, run.t_after, run.outcomes, ref.t_step, strict=True)
        for t_k, t_spec, t_after, outcome, t_step in steps:
            if outcome == "accepted":  # exact: k, then k+1 (the same work as the early run)
                saved.append(t_k + t_spec - (max(t_k, t_spec) + t_after))
            else:  # the rerun starts when both k and the early run are done
                saved.append(t_k - max(t_k, t_spec))
            full.append(t_step)
    positions = [
        (a == b)
        for run, ref in zip(runs, exact, strict=True)
        for a, b in zip(run.tokens, ref.tokens, strict=True)
    ]
    mean_saved, mean_full = statistics.fmean(saved), statistics.fmean(full)
    # the same from medians (robust to load spikes): acc * (min(T_k, T_k1) - T_fix)
    # - (1 - acc) * max(0, T_k1 - T_k), with T_k, T_k1 from the exact runs
    acc = accepted / len(outcomes)
    t_k = statistics.median(t for e in exact for t in e.t_k)
    t_k1 = statistics.median(t for e in exact for t in e.t_k1)
    fixes = [a for r in runs for a, o in zip(r.t_after, r.outcomes, strict=True) if o == "accepted"]
    t_fix = statistics.median(fixes) if fixes else 0.0
    modeled = acc * (min(t_k, t_k1) - t_fix) - (1 - acc) * max(0.0, t_k1 - t_k)
    return {
        "tolerance": tol,
        "acceptance_exact_trajectory": round(sum(d <= tol for d in dist) / len(dist), 4),
        "acceptance_delta_predictor": round(sum(d <= tol for d in delta) / max(1, len(delta)), 4),
        "acceptance": round(accepted / len(outcomes), 4),
        "accepted": accepted,
        "rejected": outcomes.count("rejected"),
        "token_agreement": round(sum(positions) / len(positions), 4),
        # tokens before the first difference, over all tokens (a drift is never repaired)
        "prefix_agreement": round(
            sum(_prefix(r.tokens, e.tokens) for r, e in zip(runs, exact, strict=True))
            / sum(len(e.tokens) for e in exact),
            4,
        ),
        "sequences_identical": sum(r.tokens == e.tokens for r, e in zip(runs, exact, strict=True)),
        "saved_ms_per_step": round(1000 * mean_saved, 3),
        "saved_pct_of_step": round(100 * mean_saved / mean_full, 2),
        "saved_ms_per_step_median_model": round(1000 * modeled, 3),
        "spec_run_ms": _ms([t for r in runs for t in r.t_k1]),
        "after_ms_accepted": _ms(fixes),
    }


def _exact_row(
    model: str, cut: tuple[int, int, int], chain_len: int, exact: list[_Trace]
) -> dict[str, Any]:
    """The cut's facts from the exact runs: distances (both predictors), stage times."""
    a, b, c = cut
    dist = [d for t in exact for d in t.distance]
    delta = [d for t in exact for d in delta_distances(t)]
    return {
        "model": model,
        "cut": [a, b, c],
        "stage_k_layers": [a - 1, b - 2],
        "stage_k1_layers": [b - 1, min(c, chain_len - 1) - 2],
        "decode_steps": len(dist),
        "distance": {q: round(_pct(dist, v), 4) for q, v in _QUANTILES.items()},
        "distance_delta_predictor": {q: round(_pct(delta, v), 4) for q, v in _QUANTILES.items()},
        "exact_ms": {
            "stage_k": _ms([t for e in exact for t in e.t_k]),
            "stage_k1": _ms([t for e in exact for t in e.t_k1]),
            "step": _ms([t for e in exact for t in e.t_step]),
        },
        "tolerances": [],
    }


def _cut_rows(
    worker: Any,
    model: str,
    cut: tuple[int, int, int],
    prompts: list[list[int]],
    cfg: SpeculativeConfig,
    say: Say,
) -> dict[str, Any]:
    """One model x cut: exact runs, then one speculative run per tolerance."""
    from blockllm.worker.speculate import Speculation

    a, b, c = cut
    chain_len = len(worker.zoo.manifest(model).chain)
    if not 1 <= a < b < c <= chain_len:
        raise ValueError(f"cut {a}-{b}-{c}: need 1 <= a < b < c <= {chain_len}")
    spans = [(s, e) for s, e in ((0, a), (a, b), (b, c), (c, chain_len)) if s < e]
    keys = [worker.load_stage(model, s, e).key for s, e in spans]
    new = cfg.new_tokens
    try:
        # warm-up (first-call allocations), speculative paths included
        _Chain(Speculation(worker, 0.0), keys).decode("w", prompts[0], 3, True)
        plain = _Chain(Speculation(worker, 0.0), keys)
        exact = [plain.decode(f"e{i}", p, new, False) for i, p in enumerate(prompts)]
        row = _exact_row(model, cut, chain_len, exact)
        say(
            f"{model} cut {a}-{b}-{c}: distance p50 {row['distance']['p50']}"
            f" (delta predictor {row['distance_delta_predictor']['p50']})"
        )
        for tol in cfg.tolerances:
            chain = _Chain(Speculation(worker, tol), keys)
            runs = [chain.decode(f"s{i}", p, new, True) for i, p in enumerate(prompts)]
            t_row = _tolerance_row(tol, exact, runs)
            say(
                f"  tolerance {tol}: acceptance {t_row['acceptance']}, agreement"
                f" {t_row['token_agreement']}, saved {t_row['saved_ms_per_step']} ms/step"
            )
            row["tolerances"].append(t_row)
        return row
    finally:
        for key in keys:
            worker.unload_stage(key)


_QUANTILES = {"min": 0.0, "p10": 0.1, "p50": 0.5, "p90": 0.9, "max": 1.0}


def _family(cfg: SpeculativeConfig, say: Say) -> Any:
    from blockllm.client.bench.family import FamilySpec, Recipe, prepare_family

    spec = FamilySpec(
        kind="tiny" if cfg.quick else "smollm2",
        mode="full",  # every tensor fine-tuned: the fine-tune differs at every cut
        variants=1,
        cache_dir=cfg.cache_dir,
        recipe=Recipe(steps=4, seq_len=32, batch_size=2, lr=1e-4),  # bench_full's: one cache
    )
    return prepare_family(spec, say)


def _prompt_ids(checkpoint: Path, n: int, vocab: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError):  # the tiny family has no tokenizer: bytes as ids
        return [[(ch % (vocab - 3)) + 3 for ch in p.encode()][:16] for p in PROMPTS[:n]]
    return [tok(p).input_ids for p in PROMPTS[:n]]


def run_speculative_bench(cfg: SpeculativeConfig, say: Say) -> dict[str, Any]:
    """Measure every model x cut x tolerance; returns the `bench speculative --json` doc."""
    import torch

    from blockllm.worker.items import WorkerConfig
    from blockllm.worker.worker import Worker
    from blockllm.zoo import Zoo

    if not 1 <= cfg.prompts <= len(PROMPTS):
        raise ValueError(f"prompts must be in [1, {len(PROMPTS)}]")
    for a, b, c in cfg.cuts:  # the upper bound is checked per model (its chain length)
        if not 1 <= a < b < c:
            raise ValueError(f"cut {a}-{b}-{c}: need 1 <= a < b < c (chain positions)")
    load_before = os.getloadavg()[0]
    family = _family(cfg, say)
    zoo = Zoo(family.zoo_dir)
    worker = Worker(zoo, WorkerConfig(kv_budget_bytes=64 << 20, threads=cfg.threads))
    vocab = int(zoo.manifest(family.base.name).config["vocab_size"])
    prompts = _prompt_ids(family.base.checkpoint, cfg.prompts, vocab)
    rows = []
    cuts = QUICK_CUTS if cfg.quick and cfg.cuts == CUTS else cfg.cuts
    with torch.inference_mode():
        for tenant in family.tenants[:2]:  # the base and one fine-tune
            for cut in cuts:
                rows.append(_cut_rows(worker, tenant.name, cut, prompts, cfg, say))
    return {
        "bench": "speculative",
        "family": family.kind,
        "models": list(family.names[:2]),
        "threads": torch.get_num_threads(),
        "prompts": cfg.prompts,
        "new_tokens": cfg.new_tokens,
        "tolerances": list(cfg.tolerances),
        # other jobs on the machine skew timings: the 1-minute load average before and after
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "results": rows,
    }
