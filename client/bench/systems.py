"""The `blockllm` and `hf_generate` systems of `bench multitenant` (per_model has its module).

- `blockllm`: the real multi-process system as `blockllm serve` runs it (a broker and worker
  processes started by `client.launcher`, stages placed by the same static placement, shared
  stages batched across tenants), driven by the real `Client` with one stream per request,
  each sent at its arrival time (real time, concurrent). `planner` (PLANNER_MODES): "off" keeps
  the static placement; "placement" adds the planner process placing by demand; "dups" also
  lets it duplicate stragglers. `straggler_delay_s` slows every step of the last worker (the
  test-only fault hook) to show what duplicates buy.
- `hf_generate`: what a user without BlockLLM does: each request in arrival order, one at a
  time, `model.generate` (greedy) on its model, models loaded with `from_pretrained` from their
  checkpoint folders under the same budget (least recently used evicted; load time on the
  clock).

Both report one `Outcome` per request with times relative to the trace start.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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


def _replay_client(client: Any, trace: Sequence[TraceRequest], timeout: float) -> list[Outcome]:
    """One thread per request: sleep until its arrival, stream it, record the times."""
    outcomes = [Outcome(r.index, r.model, r.arrival_s) for r in trace]
    t0 = time.monotonic() + 0.2  # every thread is started before the first arrival

    def run(req: TraceRequest, o: Outcome) -> None:
        time.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
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

    threads = [
        threading.Thread(target=run, args=(r, o), daemon=True, name=f"bench-req-{r.index}")
        for r, o in zip(trace, outcomes, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def run_blockllm(
    spec: ClusterSpec, trace: Sequence[TraceRequest], say: Say
) -> tuple[list[Outcome], dict[str, Any]]:
    """Start the cluster, warm it up, replay the trace, stop it; (outcomes, facts)."""
    from blockllm.client.client import Client
    from blockllm.client.launcher import Launcher

    with Launcher(log_level=spec.log_level) as launcher:
        t = time.monotonic()
        endpoint = start_cluster(launcher, spec)
        say(f"blockllm: broker + {spec.workers} workers ready in {time.monotonic() - t:.1f} s")
        with Client(endpoint, timeout=spec.request_timeout_s) as client:
            client.generate(trace[0].model, input_ids=list(trace[0].prompt_ids), max_new_tokens=2)
            before = client.status()
            outcomes = _replay_client(client, trace, spec.request_timeout_s)
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
    return outcomes, {**facts, "resident_bytes": resident}


# -- hf_generate -------------------------------------------------------------------------------


class _FirstToken:
    """A generate() streamer that notes when the first new token comes out."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, _value: Any) -> None:
        self.calls += 1  # the first call carries the prompt
        if self.calls == 2:
            self.at = time.monotonic()

    def end(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class HfSpec:
    checkpoints: Mapping[str, Path]  # tenant -> checkpoint folder
    model_bytes: Mapping[str, int]  # tenant -> bytes held whole (for the budget)
    weight_budget_bytes: int
    threads: int | None = None


class _HfModels:
    """from_pretrained models under a weight budget, least recently used evicted first."""

    def __init__(self, spec: HfSpec) -> None:
        self.spec = spec
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.loads = 0
        self.load_seconds = 0.0
        self.peak = 0

    def get(self, name: str) -> Any:
        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        from transformers import AutoModelForCausalLM

        need = self.spec.model_bytes[name]
        while self.models and self._bytes() + need > self.spec.weight_budget_bytes:
            self.models.popitem(last=False)
            gc.collect()
        t = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(self.spec.checkpoints[name], dtype="auto")
        self.models[name] = model.eval()
        self.loads += 1
        self.load_seconds += time.monotonic() - t
        self.peak = max(self.peak, self._bytes())
        return model

    def _bytes(self) -> int:
        return sum(self.spec.model_bytes[n] for n in self.models)


def _hf_one(model: Any, req: TraceRequest) -> tuple[int, float | None]:
    import torch

    streamer = _FirstToken()
    ids = torch.tensor([req.prompt_ids], dtype=torch.long)
    gen = model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=req.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            streamer=streamer,
        )
    return int(out.shape[1] - ids.shape[1]), streamer.at


def run_hf_generate(
    spec: HfSpec, trace: Sequence[TraceRequest], by_popularity: Sequence[str], say: Say
) -> tuple[list[Outcome], dict[str, Any]]:
    """Replay the trace one request at a time in arrival order; (outcomes, facts)."""
    import torch
    from transformers.utils import logging as hf_logging

    if spec.threads:
        torch.set_num_threads(spec.threads)
    hf_logging.disable_progress_bar()
    models = _HfModels(spec)
    for name in by_popularity:  # warm start, as per_model gets: off the clock
        if models._bytes() + spec.model_bytes[name] <= spec.weight_budget_bytes:
            models.get(name)
    _hf_one(models.get(next(reversed(models.models))), trace[0])  # warm-up
    models.loads, models.load_seconds = 0, 0.0
    outcomes = [Outcome(r.index, r.model, r.arrival_s) for r in trace]
    t0 = time.monotonic()
    for i, (req, o) in enumerate(zip(trace, outcomes, strict=True)):
        time.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
        try:
            o.tokens, first = _hf_one(models.get(req.model), req)
        except Exception as e:  # counted, the run goes on
            o.error = f"{type(e).__name__}: {e}"
            continue
        o.finish_s = time.monotonic() - t0
        o.first_token_s = None if first is None else first - t0
        if (i + 1) % 10 == 0:
            say(f"hf_generate: {i + 1}/{len(trace)} requests done")
    facts = {
        "loads": models.loads,
        "load_seconds": round(models.load_seconds, 2),
        "peak_weight_bytes": models.peak,
    }
    return outcomes, facts
