"""The `per_model` baseline of `bench multitenant`: every tenant served as a whole model with
nothing shared, as many resident as fit in the memory budget, the others loaded on demand.

It runs BlockLLM's own stage engine (`blockllm.worker.Worker`) in this process, so the only
difference from `blockllm` is sharing: each resident model is its own engine holding its own
copy of every block (one stage spanning the whole chain), requests of one model are batched
together in its engine's steps, and requests of different models never share a forward.
No messaging costs at all (no broker, no hops): that favours this baseline.

Scheduling, in real time against the trace (one thread, the way a simple model server runs):
arrivals queue per model; a resident model starts its queued requests at once; when requests
wait for a model that is not resident, the model whose oldest request came first is loaded
(from the zoo, block hashes not re-checked: the cheapest honest load; the time it takes is on
the clock and delays everything, as it would), evicting idle resident models least recently
used first. When every resident model is busy, the least recently used one stops taking new
requests (drains), and is evicted once its running requests are done.

A LoRA adapter tenant (`--family lora`) is loaded the way a user of such a server serves one:
its base whole, with the adapter merged into the weights at load (W += s B A, PEFT's
`merge_and_unload`), the load's time on the clock; its requests then run as the merged model's.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockllm.client.bench.arrivals import Arrivals
from blockllm.client.bench.family import model_bytes
from blockllm.client.bench.trace import Outcome, TraceRequest

logger = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass(slots=True)
class _Run:
    req: TraceRequest
    outcome: Outcome
    step: int = 0
    past: int = 0


@dataclass(slots=True)
class _Resident:
    engine: Any  # blockllm.worker.worker.Worker
    key: str
    nbytes: int
    eos: frozenset[int]
    running: dict[str, _Run] = field(default_factory=dict)
    draining: bool = False


@dataclass(frozen=True, slots=True)
class PerModelConfig:
    zoo_dir: str
    weight_budget_bytes: int  # weights of the resident models together (KV is separate)
    kv_budget_bytes: int  # each engine's KV pool
    threads: int | None = None
    max_batch_size: int = 32
    device: str = "cpu"
    # each engine holds its own copy of its blocks, as a tenant served whole from its own
    # checkpoint would (zoo blocks are memory-mapped files: engines in one process mapping the
    # same block file would share its pages, and the measured memory would not be "whole")
    private_weights: bool = True


def _private_zoo(root: str) -> Any:
    """A zoo whose blocks come out as private in-memory copies, not file mappings."""
    from blockllm.zoo import Zoo

    class PrivateCopies(Zoo):
        def load_block(self, block_id: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
            tensors = super().load_block(block_id, *args, **kwargs)
            return {name: t.clone() for name, t in tensors.items()}

    return PrivateCopies(root)


class PerModelServer:
    """Whole models under a weight budget, LRU, no sharing, no cross-model batching."""

    def __init__(self, cfg: PerModelConfig, say: Say) -> None:
        from blockllm.zoo import Zoo

        self.cfg = cfg
        self.say = say
        self.zoo = Zoo(cfg.zoo_dir)
        self.weights = _private_zoo(cfg.zoo_dir) if cfg.private_weights else self.zoo
        self.resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU first
        self.waiting: dict[str, deque[_Run]] = {}
        self.loads = 0
        self.load_seconds = 0.0
        self.peak_weight_bytes = 0
        self._t0 = time.monotonic()
        self.arrivals = Arrivals(())

    # -- residency ----------------------------------------------------------------------------
    def _resident_bytes(self) -> int:
        return sum(r.nbytes for r in self.resident.values())

    def load(self, model: str) -> None:
        """Load `model` whole as its own engine (no block shared with any other engine)."""
        from blockllm.broker.models import eos_ids_of
        from blockllm.worker.worker import Worker, WorkerConfig

        t = time.monotonic()
        engine = Worker(
            self.weights,
            WorkerConfig(
                kv_budget_bytes=self.cfg.kv_budget_bytes,
                max_batch_size=self.cfg.max_batch_size,
                threads=self.cfg.threads,
                verify_blocks=False,
                device=self.cfg.device,
            ),
        )
        m = self.zoo.manifest(model)
        info = engine.load_stage(model, 0, len(m.chain))
        if m.adapter_blocks:
            merge_adapter(engine.stage_model(info.key), m.adapter_blocks, self.weights)
        nbytes = engine.stats().weight_bytes
        self.resident[model] = _Resident(engine, info.key, nbytes, eos_ids_of(m, None))
        self.loads += 1
        self.load_seconds += time.monotonic() - t
        self.peak_weight_bytes = max(self.peak_weight_bytes, self._resident_bytes())
        logger.info("[per_model] loaded %s in %.2f s", model, time.monotonic() - t)

    def evict(self, model: str) -> None:
        res = self.resident.pop(model)
        assert not res.running, "only idle models are evicted"
        del res
        gc.collect()  # free the weights now: the next load counts on that memory
        logger.info("[per_model] evicted %s", model)

    def fits(self, model: str) -> bool:
        return model_bytes(self.zoo, model) <= self.cfg.weight_budget_bytes

    def preload(self, by_popularity: Sequence[str]) -> None:
        """Warm start: load the most popular models while they fit (not on the clock)."""
        for model in by_popularity:
            need = model_bytes(self.zoo, model)
            if self._resident_bytes() + need <= self.cfg.weight_budget_bytes:
                self.load(model)

    def _make_room(self) -> None:
        """Load the model whose oldest waiting request came first, if it can be made to fit."""
        waiting = [(q[0].req.arrival_s, m) for m, q in self.waiting.items() if q]
        targets = sorted(x for x in waiting if x[1] not in self.resident)
        if not targets:
            return
        target = targets[0][1]
        need = model_bytes(self.zoo, target)
        while self._resident_bytes() + need > self.cfg.weight_budget_bytes:
            idle = [m for m, r in self.resident.items() if not r.running]
            if idle:
                self.evict(idle[0])
                continue
            lru = next(iter(self.resident))
            self.resident[lru].draining = True  # stop taking requests; evicted when idle
            return
        for r in self.resident.values():
            r.draining = False
        self.load(target)

    # -- requests -----------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self._t0

    def _start_waiting(self) -> None:
        import torch

        from blockllm.worker.worker import WorkItem

        for model, res in list(self.resident.items()):
            q = self.waiting.get(model)
            if not q or res.draining:
                continue
            self.resident.move_to_end(model)  # most recently used
            while q:
                run = q.popleft()
                rid = str(run.req.index)
                total = len(run.req.prompt_ids) + run.req.max_new_tokens
                tokens = torch.tensor(run.req.prompt_ids, dtype=torch.long)
                res.engine.submit(WorkItem(rid, 0, (res.key,), 0, tokens, max_total_len=total))
                res.running[rid] = run

    def _on_result(self, res: _Resident, result: Any) -> None:
        import torch

        from blockllm.worker.worker import WorkItem

        run = res.running[result.request_id]
        o = run.outcome
        if result.error is not None:
            o.error = f"{result.error}: {result.message}"
            self._finish(res, result.request_id)
            return
        now = self.now()
        if o.tokens == 0:
            o.first_token_s = now
        o.tokens += 1
        run.past += len(run.req.prompt_ids) if run.step == 0 else 1
        run.step += 1
        if result.token_id in res.eos or o.tokens >= run.req.max_new_tokens:
            o.finish_s = now
            self._finish(res, result.request_id)
            return
        tok = torch.tensor([result.token_id], dtype=torch.long)
        total = len(run.req.prompt_ids) + run.req.max_new_tokens
        item = WorkItem(result.request_id, run.step, (res.key,), run.past, tok, max_total_len=total)
        res.engine.submit(item)

    def _finish(self, res: _Resident, rid: str) -> None:
        res.engine.release(rid)
        self.arrivals.finished(res.running.pop(rid).outcome)

    def replay(self, trace: Sequence[TraceRequest] | Arrivals) -> list[Outcome]:
        """Serve the trace in real time (open loop, or closed loop when given `Arrivals` with
        clients); one Outcome per request (in trace order)."""
        arrivals = trace if isinstance(trace, Arrivals) else Arrivals(trace)
        self.arrivals = arrivals
        self._t0 = time.monotonic()
        while not arrivals.exhausted() or any(self.waiting.values()) or self._running():
            for req, o in arrivals.due(self.now()):
                if not self.fits(req.model):
                    o.error = "model larger than the whole budget"
                    arrivals.finished(o)
                    continue
                self.waiting.setdefault(req.model, deque()).append(_Run(req, o))
            self._make_room()
            self._start_waiting()
            worked = False
            for res in list(self.resident.values()):
                if res.running:
                    worked = True
                    for result in res.engine.step():
                        self._on_result(res, result)
            nxt = arrivals.next_at()
            if not worked and nxt is not None and not any(self.waiting.values()):
                time.sleep(max(0.0, min(0.05, nxt - self.now())))
        return arrivals.outcomes

    def _running(self) -> bool:
        return any(r.running for r in self.resident.values())

    def warm_up(self) -> None:
        """One short request on a resident model (first-call costs off the clock)."""
        if not self.resident:
            return
        model = next(reversed(self.resident))
        ids = tuple(range(1, 9))
        self.replay([TraceRequest(-1, 0.0, model, ids, 2)])


def merge_adapter(stage: Any, pairs: Sequence[tuple[int, str]], zoo: Any) -> None:
    """Merge LoRA adapter blocks (chain position, block id) into a whole-chain stage's weights:
    each target projection's weight becomes a new tensor W + s B A (the stage's other weights,
    the zoo's, are not touched)."""
    import torch

    from blockllm.worker.lora import adapter_weights

    with torch.no_grad():
        for pos, bid in pairs:
            layer = stage.layers[pos - 1]  # position 0 is the embedding
            for name, (a, b, s) in adapter_weights(zoo.load_block(bid)).items():
                lin = layer.get_submodule(name)
                w = lin.weight
                lin.weight = torch.nn.Parameter(w + (b.to(w) @ a.to(w)) * s, requires_grad=False)


def fastest_threads(zoo_dir: str, model: str, choices: Sequence[int]) -> tuple[int, dict]:
    """The torch thread count (of `choices`) with the fastest batch-4 decode step of `model`
    in this process right now, and the median step ms of each: the in-process baselines get
    their best setting (on a busy machine more threads can be much slower)."""
    import statistics

    import torch

    from blockllm.worker.worker import Worker, WorkerConfig, WorkItem
    from blockllm.zoo import Zoo

    zoo = Zoo(zoo_dir)
    chain = len(zoo.manifest(model).chain)
    timings: dict[int, float] = {}
    for threads in dict.fromkeys(choices):
        engine = Worker(zoo, WorkerConfig(threads=threads, verify_blocks=False))
        key = engine.load_stage(model, 0, chain).key
        rids = [f"t{i}" for i in range(4)]
        for r in rids:
            engine.submit(WorkItem(r, 0, (key,), 0, torch.arange(1, 17), max_total_len=64))
        engine.step()
        steps = []
        for s in range(1, 9):
            for r in rids:
                item = WorkItem(r, s, (key,), 15 + s, torch.tensor([s]), max_total_len=64)
                engine.submit(item)
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
        timings[threads] = round(statistics.median(steps) * 1000, 2)
        del engine
    best = min(timings, key=lambda t: timings[t])
    torch.set_num_threads(best)
    return best, timings


def run_per_model(
    cfg: PerModelConfig,
    trace: Sequence[TraceRequest],
    by_popularity: Sequence[str],
    say: Say,
    clients: int | None = None,
    on_start: Callable[[], None] | None = None,
) -> tuple[list[Outcome], dict[str, Any]]:
    """Replay `trace` on the per-model baseline (closed loop with `clients`); (outcomes, facts:
    loads, peak weight bytes). `on_start` is called as the replay begins."""
    server = PerModelServer(cfg, say)
    server.preload(by_popularity)
    say(f"per_model: {len(server.resident)} model(s) resident at start: {list(server.resident)}")
    server.warm_up()
    server.loads, server.load_seconds = 0, 0.0
    if on_start is not None:
        on_start()
    outcomes = server.replay(Arrivals(trace, clients))
    facts = {
        "loads": server.loads,
        "load_seconds": round(server.load_seconds, 2),
        "peak_weight_bytes": server.peak_weight_bytes,
    }
    say(f"per_model: {server.loads} model loads took {server.load_seconds:.1f} s")
    return outcomes, facts
