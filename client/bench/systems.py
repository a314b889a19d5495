"""The `blockllm` system of `bench multitenant` (per_model and the HF systems have their modules).

- `blockllm`: the real multi-process system as `blockllm serve` runs it (a broker and worker
  processes started by `client.launcher`, stages placed by the same static placement, shared
  stages batched across tenants), driven by the real `Client` with one stream per request,
  each sent at its arrival time (real time, concurrent). `planner` (PLANNER_MODES): "off" keeps
  the static placement; "placement" adds the planner process placing by demand; "dups" also
  lets it duplicate stragglers. `straggler_delay_s` slows every step of the last worker (the
  test-only fault hook) to show what duplicates buy.
  With `clients` C (closed loop, `--saturate`), C threads each stream the next request of the
  trace as soon as their last one finished.

It reports one `Outcome` per request with times relative to the trace start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blockllm.client.bench.trace import Outcome, TraceRequest

logger = logging.getLogger(__name__)

Say = Callable[[str], None]
PLANNER_MODES = ("off", "placement", "dups")
# broker counters that say what the planner (and the broker's failover) did during a run
PLANNER_COUNTERS = ("commands", "moved", "replays", "hedges", "hedges_won")


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The `blockllm` system: a broker + `workers` worker processes over `zoo_dir`."""

    zoo_dir: str
    models: tuple[str, ...]
    kv_budget_bytes: int  # per worker
    workers: int = 2
    threads: int | None = None  # per worker; None = the cores split across workers
    max_batch_size: int = 32
    planner: str = "off"  # one of PLANNER_MODES
    straggler_delay_s: float = 0.0  # added to every step of the last worker
    ready_timeout_s: float = 300.0
    request_timeout_s: float = 900.0
    name_prefix: str = "bench-worker"
    log_level: str = "WARNING"  # of the broker and worker processes
    device: str = "cpu"  # of every worker


def start_cluster(launcher: Any, spec: ClusterSpec) -> str:
    """Broker + workers (+ planner) placed as `blockllm serve` places them; the endpoint."""
    from blockllm.broker.config import BrokerConfig
    from blockllm.client.launcher import ServeConfig, default_threads, plan_workers
    from blockllm.worker.config import WorkerProcConfig

    serve = ServeConfig(spec.zoo_dir, None, None, workers=spec.workers, models=spec.models)
    models, plan = plan_workers(serve)
    broker = BrokerConfig(
        bind="tcp://127.0.0.1:0", zoo_dir=spec.zoo_dir, max_waiting=4096, log_level=spec.log_level
    )
    endpoint = launcher.start_broker(broker, spec.ready_timeout_s)
    stages = [s for s in plan if s]
    threads = spec.threads or default_threads(len(stages))
    for i, worker_stages in enumerate(stages):
        name = f"{spec.name_prefix}-{i}"
        slow = spec.straggler_delay_s if i == len(stages) - 1 else 0.0
        cfg = WorkerProcConfig(
            broker=endpoint,
            zoo_dir=spec.zoo_dir,
            stages=worker_stages,
            name=name,
            threads=threads,
            kv_budget_bytes=spec.kv_budget_bytes,
            max_batch_size=spec.max_batch_size,
            log_level=spec.log_level,
            fault_step_delay_s=slow,
            device=spec.device,
        )
        launcher.start_worker(name, cfg)
    launcher.wait_ready(list(models), spec.ready_timeout_s)
    if spec.planner not in PLANNER_MODES:
        raise ValueError(f"planner mode {spec.planner!r}: choose from {PLANNER_MODES}")
    if spec.planner != "off":  # it refines the static placement from the live stats, as in serve
        from blockllm.broker.planner.config import PlannerConfig

        launcher.start_planner(
            PlannerConfig(
                broker=endpoint,
                zoo_dir=spec.zoo_dir,
                log_level=spec.log_level,
                duplicates=spec.planner == "dups",
            )
        )
    return endpoint


def cluster_resident_bytes(status: Mapping[str, Any]) -> int:
    """Weights + KV pools of every worker, from the broker's STATUS body."""
    return sum(
        int(w.get("weight_bytes") or 0) + int(w.get("kv_total_bytes") or 0)
        for w in status.get("workers", [])
    )


def _stream_one(client: Any, req: TraceRequest, o: Outcome, t0: float, timeout: float) -> None:
    """Stream one request, noting its first token, finish and tokens (or its error)."""
    try:
        for _ev in client.stream(
            req.model,
            input_ids=list(req.prompt_ids),
            max_new_tokens=req.max_new_tokens,
            timeout=timeout,
        ):
            if o.tokens == 0:
                o.first_token_s = time.monotonic() - t0
            o.tokens += 1
        o.finish_s = time.monotonic() - t0
    except Exception as e:  # a typed client error: counted, the run goes on
        o.error = f"{type(e).__name__}: {e}"


def _replay_client(
    client: Any, trace: Sequence[TraceRequest], timeout: float, clients: int | None = None
) -> list[Outcome]:
    """Open loop: one thread per request, sleeping until its arrival. Closed loop (`clients`
    C): C threads, each streaming the next request of the trace once its last one is over."""
    outcomes = [Outcome(r.index, r.model, r.arrival_s) for r in trace]
    t0 = time.monotonic() + 0.2  # every thread is started before the first arrival
    pending = list(zip(trace, outcomes, strict=True))[::-1]
    lock = threading.Lock()

    def timed(req: TraceRequest, o: Outcome) -> None:
        time.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
        _stream_one(client, req, o, t0, timeout)

    def closed_client() -> None:
        time.sleep(max(0.0, t0 - time.monotonic()))
        while True:
            with lock:
                if not pending:
                    return
                req, o = pending.pop()
            o.arrival_s = time.monotonic() - t0
            _stream_one(client, req, o, t0, timeout)

    if clients is None:
        threads = [
            threading.Thread(target=timed, args=(r, o), daemon=True, name=f"bench-req-{r.index}")
            for r, o in zip(trace, outcomes, strict=True)
        ]
    else:
        threads = [
            threading.Thread(target=closed_client, daemon=True, name=f"bench-client-{i}")
            for i in range(clients)
        ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def run_blockllm(
    spec: ClusterSpec, trace: Sequence[TraceRequest], say: Say, clients: int | None = None
) -> tuple[list[Outcome], dict[str, Any]]:
    """Start the cluster, warm it up, replay the trace (closed loop with `clients`), stop it;
    (outcomes, facts with the PSS of the cluster's processes during the replay)."""
    return replay_blockllm(spec, [trace], say, clients)[0]


def replay_blockllm(
    spec: ClusterSpec,
    traces: Sequence[Sequence[TraceRequest]],
    say: Say,
    clients: int | None = None,
) -> list[tuple[list[Outcome], dict[str, Any]]]:
    """Start the cluster once; replay each trace in turn on it (each warmed up, measured and
    reported on its own, as `run_blockllm` does one); stop it. A trace finds what the ones
    before it left (adapters loaded, caches warm): order them accordingly."""
    from blockllm.client.client import Client
    from blockllm.client.launcher import Launcher

    with Launcher(log_level=spec.log_level) as launcher:
        t = time.monotonic()
        endpoint = start_cluster(launcher, spec)
        say(f"blockllm: broker + {spec.workers} workers ready in {time.monotonic() - t:.1f} s")
        with Client(endpoint, timeout=spec.request_timeout_s) as client:
            return [_measured_replay(client, spec, trace, clients) for trace in traces]


def _measured_replay(
    client: Any, spec: ClusterSpec, trace: Sequence[TraceRequest], clients: int | None
) -> tuple[list[Outcome], dict[str, Any]]:
    """Warm up (2 tokens of the first request's model), replay `trace` with the PSS of the
    cluster's processes sampled; (outcomes, facts)."""
    from blockllm.client.bench.memory import PssSampler

    client.generate(trace[0].model, input_ids=list(trace[0].prompt_ids), max_new_tokens=2)
    before = client.status()
    sampler = PssSampler().start()
    outcomes = _replay_client(client, trace, spec.request_timeout_s, clients)
    pss = sampler.stop()
    after = client.status()
    resident = max(cluster_resident_bytes(before), cluster_resident_bytes(after))
    workers = {
        str(w.get("name")): {
            "stages": len(w.get("stages", [])),
            "step_ms_p50": w.get("step_ms_p50"),
            "mean_batch": w.get("mean_batch"),
        }
        for w in after.get("workers", [])
    }
    counters = after.get("counters", {})
    facts = {
        "workers": workers,
        "planner": spec.planner,
        "straggler_delay_s": spec.straggler_delay_s,
        "counters": {
            k: int(counters.get(k) or 0) - int(before.get("counters", {}).get(k) or 0)
            for k in PLANNER_COUNTERS
        },
    }
    return outcomes, {**facts, **pss, "resident_bytes": resident}
