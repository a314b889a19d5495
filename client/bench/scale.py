"""`blockllm bench scale`: the planner and the broker at thousands of tenants and hundreds of
workers, by simulation (client/bench/scale_sim.py drives the real `Broker` and `Planner`).

Per size (models x workers) it reports:
- `place_ms_p50/max`: one full `place()` of the synthetic cluster with its Zipf demand (and
  each demand drift of the trace), and `replace_lost_ms`: the incremental re-placement after
  one worker is lost (planner/placement.py); in the trace, the planner's own full placements
  (`planner_place_ms_*`) and incremental ones after a lost worker (`planner_incremental`,
  `planner_replace_lost_ms_max`, planner/replan.py);
- from a day-in-the-life trace over `duration_s` simulated seconds (`trace`): the broker's CPU
  per routed message (each FORWARD of a hop: all its CPU, control messages and timer included,
  over the FORWARDs it routed) and per token, per message of each kind (`broker_us_by_kind`;
  `broker_us_per_result`: a hop's answer and the FORWARD it routes; the part of each spent in
  the garbage collector's runs that started inside it: `broker_gc_us_by_kind`, under the
  broker's GC policy, client/bench/scale_gc.py), the waiting requests it
  tried to route (`broker_route_tries`), STATS and STATUS body sizes, the
  planner's command bursts, hops per token of the 10 hottest models, weight memory vs budget,
  requests that arrived for a model no live worker covered (and how long they waited), and
  the bytes per token that crossed nodes (workers in nodes of `per_node`, broker on node 0):
  relayed by the broker, and what hop-to-hop forwarding would send (scale_sim's docstring).
Everything CPU-timed is real time on this machine (time.process_time); the workers' step
times come from the cost model (scale_sim.StepCost).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import blockllm.broker.planner.replan as replan_module
from blockllm.broker.planner.placement import place_in, replace_lost
from blockllm.client.bench import scale_gc
from blockllm.client.bench.scale_sim import Sim
from blockllm.client.bench.scale_synth import (
    GB,
    make_tenants,
    make_workers,
    model_infos,
    worker_name,
    zipf_demand,
)

SIZES = ((18, 4), (105, 16), (510, 64), (2020, 256))  # the table


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def placement_latency(
    n_models: int, n_workers: int, capacity: float, drifts: int, seed: int
) -> dict[str, Any]:
    """Full placements under drifting demand, then one incremental re-placement."""
    tenants = make_tenants(n_models, seed=seed)
    workers = make_workers(n_workers, capacity=capacity)
    times = []
    names = [t.name for t in tenants]
    plan = state = None
    for k in range(max(1, drifts)):
        infos = model_infos(tenants, zipf_demand(names, seed=seed + k))
        t0 = time.process_time()
        plan, state = place_in(infos, workers)
        times.append(time.process_time() - t0)
    assert plan is not None and state is not None
    busiest = max(plan.stages, key=lambda w: len(plan.stages[w]))
    t0 = time.process_time()
    after = replace_lost(plan, state, [busiest])
    inc = time.process_time() - t0
    moved = sum(1 for n, r in plan.replicas.items() if after.replicas.get(n) != r)
    return {
        "place_ms_p50": round(1000 * pct(times, 0.5), 1),
        "place_ms_max": round(1000 * max(times), 1),
        "replace_lost_ms": round(1000 * inc, 2),
        "replace_lost_models_moved": moved,
        "replicas": sum(len(r) for r in plan.replicas.values()),
        "uncovered": len(plan.uncovered),
    }


class Trace:
    """A day in the life, compressed into `duration` simulated seconds: requests arrive at
    `rate` per second over the present tenants by Zipf demand whose ranks drift six times; 10%
    of the tenants arrive during the run and 5% leave; a worker turns straggler (4x slower)
    from 20% to 70% of the run; one worker dies at 30% and another at 60%; a new one joins at
    45%."""

    def __init__(
        self,
        sim: Sim,
        tenants: list,
        capacity: int,
        duration: float,
        rate: float,
        tokens: int,
        seed: int,
    ) -> None:
        self.sim, self.duration, self.rate, self.tokens = sim, duration, rate, tokens
        self.rng = random.Random(seed)
        self.late = tenants[int(0.9 * len(tenants)) :] if len(tenants) > 10 else []
        self.present = [t.name for t in tenants if t not in self.late]
        self.capacity = capacity
        self.seed = seed
        self.drift = 0
        self._weights()

    def _weights(self) -> None:
        demand = zipf_demand(self.present, seed=self.seed * 7 + self.drift)
        self.names = list(demand)
        self.cum = list(itertools_accumulate(demand[n] for n in self.names))

    def schedule(self) -> None:
        sim, d = self.sim, self.duration
        names = sorted(w.name for w in sim.workers.values())
        for k in range(1, 6):
            sim.at(k * d / 6, self._drift)
        for i, t in enumerate(self.late):
            sim.at(d * (0.1 + 0.6 * i / max(1, len(self.late))), self._arrive, t)
        leaving = self.present[len(self.present) // 2 :: 20][: max(0, len(self.present) // 20)]
        for i, name in enumerate(leaving):
            sim.at(d * (0.4 + 0.4 * i / max(1, len(leaving))), self._leave, name)
        if len(names) >= 3:
            slow = sim.workers[names[-1].encode()]
            sim.at(0.2 * d, setattr, slow, "slow", 4.0)
            sim.at(0.7 * d, setattr, slow, "slow", 1.0)
            sim.at(0.3 * d, sim.kill_worker, names[1])
            sim.at(0.6 * d, sim.kill_worker, names[len(names) // 2])
            node = int(names[-1][1:4]) + 1
            sim.at(0.45 * d, sim.add_worker, worker_name(node, 0), self.capacity)
        sim.at(self._gap(), self._request)

    def _gap(self) -> float:
        return self.rng.expovariate(self.rate)

    def _request(self) -> None:
        if self.sim.now >= self.duration or not self.names:
            return
        x = self.rng.random() * self.cum[-1]
        lo, hi = 0, len(self.cum) - 1
        while lo < hi:  # bisect over the cumulative demand
            mid = (lo + hi) // 2
            if self.cum[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        self.sim.generate(self.names[lo], tokens=self.tokens)
        self.sim.at(self.sim.now + self._gap(), self._request)

    def _drift(self) -> None:
        self.drift += 1
        self._weights()

    def _arrive(self, t: Any) -> None:
        self.sim.add_tenant(t)
        self.present.append(t.name)
        self._weights()

    def _leave(self, name: str) -> None:
        if name in self.present:
            self.present.remove(name)
            self.sim.remove_tenant(name)
            self._weights()


def itertools_accumulate(values: Any) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def timed(fn: Callable, sink: list[float]) -> Callable:
    """`fn` that records its CPU time (the planner calls it through its module global)."""

    def run(*args: Any, **kw: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*args, **kw)
        finally:
            sink.append(time.process_time() - t0)

    return run


def run_size(
    n_models: int,
    n_workers: int,
    *,
    duration: float = 30.0,
    rate: float | None = None,
    tokens: int = 16,
    capacity: int = 8 * GB,
    per_node: int = 8,
    seed: int = 0,
    gc_policy: bool = True,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """One row of the table (module docstring); `gc_policy`: the broker's (broker/gc_policy.py)
    applied in the simulation's process, as BrokerProc applies it."""
    row: dict[str, Any] = {"models": n_models, "workers": n_workers}
    progress(f"{n_models} models x {n_workers} workers: placement")
    row |= placement_latency(n_models, n_workers, capacity, 3, seed)
    tenants = make_tenants(n_models, seed=seed)
    initial = tenants[: int(0.9 * len(tenants))] if len(tenants) > 10 else tenants
    workers = [
        (w.name, capacity) for w in make_workers(n_workers, capacity=capacity, per_node=per_node)
    ]
    sim = Sim(initial, workers)
    rate = rate if rate is not None else 2.0 * n_workers
    trace = Trace(sim, tenants, capacity, duration, rate, tokens, seed)
    trace.schedule()
    planned: list[float] = []  # the planner's full placements, CPU s each
    relost: list[float] = []  # its incremental ones after a lost worker (replan.py)
    originals = (replan_module.place_in, replan_module.replace_lost)
    replan_module.place_in = timed(place_in, planned)
    replan_module.replace_lost = timed(replace_lost, relost)
    with scale_gc.measured(sim, gc_policy) as meter:
        try:
            _run(sim, n_models, n_workers, duration, progress)
        finally:
            replan_module.place_in, replan_module.replace_lost = originals
        row |= scale_gc.figures(meter, sim.c.broker_by_kind, sim.c.routed)
        row["gc_policy_fulls"] = sim.gc_policy.fulls if sim.gc_policy else 0
        row["gc_full_ms"] = scale_gc.full_collection_ms(sim)
    return row | _figures(sim, duration, capacity, planned, relost)


def _run(
    sim: Sim, n_models: int, n_workers: int, duration: float, progress: Callable[[str], None]
) -> None:
    step = max(1.0, duration / 10)
    t = 0.0
    while t < duration + 5.0:
        t = min(duration + 5.0, t + step)
        sim.run(t)
        progress(
            f"{n_models}x{n_workers}: t={t:.0f}/{duration:.0f} s simulated, "
            f"{sim.c.tokens} tokens, {len(sim.broker.requests)} running"
        )
        sim.status_size()


def _figures(
    sim: Sim, duration: float, capacity: int, planned: list[float], relost: list[float]
) -> dict[str, Any]:
    """The trace's figures (module docstring)."""
    c = sim.c
    hot = sorted(c.hops, key=lambda m: -len(c.hops[m]))[:10]
    hop_tokens = [h for m in hot for h in c.hops[m]]
    plan = sim.planner.target.plan if sim.planner and sim.planner.target else None
    used = [plan.bytes_used.get(w, 0) / capacity for w in plan.stages] if plan else []
    return {
        "planner_place_ms_p50": round(1000 * pct(planned, 0.5), 1),
        "planner_place_ms_max": round(1000 * max(planned, default=0.0), 1),
        "planner_replans": len(planned) + len(relost),
        "planner_replace_lost_ms_max": round(1000 * max(relost, default=0.0), 1),
        "planner_incremental": sim.planner.incremental if sim.planner else 0,
        "planner_cpu_ms_max": round(1000 * max(c.planner_cpu_s, default=0.0), 1),
        "broker_us_per_message": round(1e6 * c.broker_cpu_s / max(1, c.routed), 1),
        "broker_us_per_token": round(1e6 * c.broker_cpu_s / max(1, c.tokens), 1),
        # what one message of each kind costs (RESULT: a hop's answer and the FORWARD it routes)
        "broker_us_by_kind": {
            k: round(1e6 * cpu / max(1, calls), 1)
            for k, (calls, cpu) in sorted(c.broker_by_kind.items())
        },
        "broker_messages": {k: int(calls) for k, (calls, _) in sorted(c.broker_by_kind.items())},
        "broker_us_per_result": round(
            1e6
            * c.broker_by_kind.get("Result", [0, 0.0])[1]
            / max(1, c.broker_by_kind.get("Result", [0, 0.0])[0]),
            1,
        ),
        "broker_route_tries": sim.broker.flow.tries,  # waiting requests tried (flow.dispatch)
        "broker_bad_messages": sim.broker.counters["bad_messages"],
        "stats_kb_max": round(max(c.stats_bytes, default=0) / 1024, 1),
        # full STATS (every stats_full_every snapshots) and the STATS_DELTAs between them
        "stats_full_kb_max": round(max(c.full_bytes, default=0) / 1024, 1),
        "stats_delta_kb_p50": round(pct([float(b) for b in c.delta_bytes], 0.5) / 1024, 1),
        "stats_delta_kb_max": round(max(c.delta_bytes, default=0) / 1024, 1),
        "stats_parts_max": c.stats_parts,
        "stats_kb_per_s": round(sum(c.stats_bytes) / 1024 / max(1e-9, duration + 5.0), 1),
        # the broker loop's stall on STATS: a snapshot's longest turn (its build, or a turn
        # of its encoding: broker/stats_send.py), p50 over snapshots and the longest of all
        "stats_ms_p50": round(1000 * pct(c.stats_turn_max_s, 0.5), 1),
        "stats_ms_max": round(1000 * max(c.stats_turn_max_s, default=0.0), 1),
        # ... its garbage collections left out (in this process they sweep the planner's and the
        # simulated cluster's objects too), and the most GC time in one STATS turn
        "stats_ms_max_less_gc": round(1000 * max(c.stats_turn_max_less_gc_s, default=0.0), 1),
        "stats_gc_ms_max": round(1000 * max(c.stats_gc_s, default=0.0), 1),
        # building the body alone (broker/stats.py; routes cached: broker/shown.py)
        "stats_build_ms_p50": round(1000 * pct(c.stats_build_s, 0.5), 1),
        "stats_build_ms_max": round(1000 * max(c.stats_build_s, default=0.0), 1),
        # a snapshot's build and encoding, all its turns together (CPU, the loop's routing
        # between them left out): from its build to its last message (a full one's last part)
        "stats_snapshot_ms_p50": round(1000 * pct(c.stats_cpu_s, 0.5), 1),
        "stats_snapshot_ms_max": round(1000 * max(c.stats_cpu_s, default=0.0), 1),
        "stats_turns_max": max(c.stats_turns, default=0),
        "status_kb_max": round(max(c.status_bytes, default=0) / 1024, 1),
        "burst_commands_max": max(c.bursts, default=0),
        "burst_kb_max": round(max(c.burst_bytes, default=0) / 1024, 1),
        "hops_per_token_hot": round(sum(hop_tokens) / max(1, len(hop_tokens)), 2),
        "memory_used_max": round(max(used, default=0.0), 3),
        "memory_used_mean": round(sum(used) / max(1, len(used)), 3),
        "waited_for_coverage": c.waited_for_coverage,
        # requests whose first route was one of the planner's, or the broker's own (its DP or
        # one worker chaining the model) while the model had planned routes / had none
        "first_route_planned": c.first_routes.get("planned", 0),
        "first_route_own_planned": c.first_routes.get("own_planned", 0),
        "first_route_own_none": c.first_routes.get("own_none", 0),
        # first routes over more hops than the model's shortest target route (scale_sim)
        "first_route_longer": c.longer_routes,
        "first_route_extra_hops": c.longer_hops,
        "coverage_wait_s_p50": round(pct(c.coverage_wait_s, 0.5), 2),
        # relayed: what the broker on node 0 sends to and gets from other nodes (BlockLLM);
        # hop to hop: what worker-to-worker forwarding would send across nodes (scale_sim)
        "inter_node_bytes_per_token": round(c.relayed_bytes / max(1, c.tokens)),
        "hop_to_hop_inter_node_bytes_per_token": round(c.hop_bytes / max(1, c.tokens)),
        "cross_node_hops_per_token": round(c.cross_node_hops / max(1, c.tokens), 3),
        "tokens": c.tokens,
        "requests_finished": c.finished,
        "errors": dict(c.errors),
        "simulated_s": duration,
    }


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("models", "models"),
        ("workers", "workers"),
        ("place_ms_p50", "place p50 ms"),
        ("place_ms_max", "place max ms"),
        ("replace_lost_ms", "re-place 1 lost ms"),
        ("broker_us_per_message", "broker us/msg"),
        ("broker_us_per_token", "broker us/token"),
        ("broker_us_per_result", "broker us/RESULT"),
        ("broker_gc_us_per_message", "of which GC us/msg"),
        ("stats_full_kb_max", "STATS full kB"),
        ("stats_delta_kb_max", "STATS delta kB"),
        ("status_kb_max", "STATUS kB"),
        ("burst_commands_max", "burst cmds"),
        ("hops_per_token_hot", "hops/token (hot)"),
        ("memory_used_max", "mem/budget max"),
        ("waited_for_coverage", "waited for coverage"),
        ("inter_node_bytes_per_token", "inter-node B/token (relayed)"),
        ("hop_to_hop_inter_node_bytes_per_token", "inter-node B/token (hop to hop)"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k, "")
            cells.append(f"{v:,}" if isinstance(v, int) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def meta() -> dict[str, Any]:
    return {
        "model": "32 layers of 100 MB + embedding and head of 128 MB (3.46 GB a chain); each "
        "fine-tune owns 2 layers; sqrt(models/5) families",
        "worker_bytes": 8 * GB,
        "cost_model": "this machine's SmolLM2-135M fp32 decode step per layer (DESIGN.md 6)",
    }
