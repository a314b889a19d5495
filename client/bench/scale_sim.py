"""The simulated cluster of `blockllm bench scale`: the REAL `Broker` and the REAL `Planner`
(pure state machines) driven on a simulated clock by synthetic workers and clients.

No sockets and no tensors: every message the broker sends is delivered to a simulated peer
after a network delay, and the peers answer with real protocol messages (READY, HEARTBEAT,
RESULT, TOKEN...). A simulated worker batches the FORWARDs queued at it into one step whose
time comes from a cost model (`StepCost`), answers LOAD_STAGE / UNLOAD_STAGE with READY after
a load time, and pongs heartbeats. Workers sit in nodes (READY's host is the node: the
planner places by it); the broker is on node 0; a message costs `intra_ms` inside a node and
`inter_ms` across. The broker's and the planner's CPU time is measured (time.process_time
around their calls); everything else is the simulation's.

Bytes across nodes, two figures: `relayed_bytes`, the tensor bytes of FORWARDs and RESULTs
between the broker (node 0) and workers on other nodes: what BlockLLM sends, as every hop goes
through the broker (a chain kept inside one node does not change it, unless that node is node
0); and `hop_bytes`, the tensor bytes handed from one hop to the next when the two hops' workers
are on different nodes: what worker-to-worker forwarding (or a broker per node) would send
across nodes, which BlockLLM does not do. Node-aware placement lowers the second.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blockllm.broker import frames
from blockllm.broker.broker import Broker
from blockllm.broker.config import BrokerConfig
from blockllm.broker.models import ModelSpec
from blockllm.broker.planner.config import PlannerConfig
from blockllm.broker.planner.planner import Planner
from blockllm.broker.protocol import (
    PROTOCOL_VERSION,
    Dead,
    Error,
    Forward,
    Generate,
    Heartbeat,
    LoadStage,
    Ready,
    Release,
    Result,
    StageRef,
    Status,
    TensorMeta,
    Token,
    UnloadStage,
)
from blockllm.broker.requests import split_wire_id
from blockllm.client.bench.scale_gc import GcMeter
from blockllm.client.bench.scale_stats import SimStats
from blockllm.client.bench.scale_synth import GB, Tenant, node_of
from blockllm.zoo.chain import stage_key
from blockllm.zoo.manifest import ModelManifest

CLIENT, PLANNER = b"client", b"planner"
HIDDEN_BYTES = 2048 * 2  # one token's activation: hidden 2048 in bf16
KV_TOTAL = 2 * GB
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "int64": 8, "int32": 4}


def tensor_bytes(metas: Any) -> int:
    """The bytes of a message's tensor frames, from their metadata."""
    return sum(ITEMSIZE.get(t.dtype, 4) * math.prod(t.shape) for t in metas or ())


@dataclass(frozen=True)
class StepCost:
    """Time of one batched step over `layers` decoder layers: this machine's measured decode
    step of SmolLM2-135M fp32 (DESIGN.md section 6: 56 ms at batch 1, 97 at 8, 171 at 32, for
    30 layers), per layer, interpolated linearly in the batch size."""

    points: tuple[tuple[int, float], ...] = ((1, 56.0), (8, 97.0), (32, 171.0))
    layers_measured: int = 30

    def seconds(self, batch: int, layers: int) -> float:
        pts = self.points
        b = max(1, batch)
        for (b0, t0), (b1, t1) in itertools.pairwise(pts):
            if b <= b1:
                ms = t0 + (t1 - t0) * (b - b0) / (b1 - b0)
                break
        else:
            (b0, t0), (b1, t1) = pts[-2], pts[-1]
            ms = t1 + (t1 - t0) * (b - b1) / (b1 - b0)
        return ms / 1000.0 * max(1, layers) / self.layers_measured


def manifest_of(t: Tenant) -> ModelManifest:
    config = {"vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": len(t.chain) - 2}
    return ModelManifest(
        name=t.name,
        model_type="llama",
        config=config,
        chain=t.chain,
        tie_word_embeddings=False,
        dtype="bfloat16",
        generation={"eos_token_id": 2},
        source={"block_bytes": list(t.sizes)},
        fingerprint=t.family,
    )


def spec_of(m: ModelManifest) -> ModelSpec:
    return ModelSpec(
        name=m.name,
        chain_len=len(m.chain),
        vocab_size=32000,
        max_positions=4096,
        eos_ids=frozenset({2}),
        kv_bytes_per_token_layer=2 * 8 * 128 * 2,  # K and V, 8 KV heads of 128, bf16
        manifest=m,
    )


@dataclass
class SimWorker:
    name: str
    identity: bytes
    capacity: int
    pid: int
    stages: dict[str, StageRef] = field(default_factory=dict)
    queue: list[tuple[str, Forward]] = field(default_factory=list)  # (stage key, FORWARD)
    busy: bool = False
    alive: bool = True
    slow: float = 1.0
    steps: int = 0
    step_ms: list[float] = field(default_factory=list)

    @property
    def node(self) -> str:
        return node_of(self.name)


@dataclass
class Counters:
    broker_cpu_s: float = 0.0
    broker_calls: int = 0
    # per message kind ("tick" for the timer): [calls, CPU s]
    broker_by_kind: dict[str, list[float]] = field(default_factory=dict)
    routed: int = 0  # FORWARDs the broker sent (one per hop of a step)
    tokens: int = 0
    planner_cpu_s: list[float] = field(default_factory=list)
    bursts: list[int] = field(default_factory=list)
    burst_bytes: list[int] = field(default_factory=list)
    stats_bytes: list[int] = field(default_factory=list)  # every STATS / STATS_DELTA sent
    full_bytes: list[int] = field(default_factory=list)  # the full ones
    delta_bytes: list[int] = field(default_factory=list)  # the deltas
    stats_parts: int = 1  # the most messages one snapshot took (a full one in parts)
    # per snapshot, CPU (client/bench/scale_stats.py): its longest turn of the broker's loop,
    # that less its GC time, the most GC time in one of its turns, all its turns (build to
    # last message), the build alone; how many turns it took
    stats_turn_max_s: list[float] = field(default_factory=list)
    stats_turn_max_less_gc_s: list[float] = field(default_factory=list)
    stats_gc_s: list[float] = field(default_factory=list)
    stats_cpu_s: list[float] = field(default_factory=list)
    stats_build_s: list[float] = field(default_factory=list)
    stats_turns: list[int] = field(default_factory=list)
    status_bytes: list[int] = field(default_factory=list)
    hops: dict[str, list[int]] = field(default_factory=dict)  # model -> hops per token
    relayed_bytes: int = 0  # tensor bytes between the broker (node 0) and other nodes
    hop_bytes: int = 0  # tensor bytes from one hop to the next across nodes (module docstring)
    cross_node_hops: int = 0
    # each request's first route: one of the planner's routes for its model ("planned"), the
    # broker's own (DP or one worker) while the model had planned routes ("own_planned": none
    # resolved) or had none ("own_none")
    first_routes: dict[str, int] = field(default_factory=dict)
    # first routes with more hops than the shortest of the planner's target routes for the
    # model (a moving replica's model routed over pieces), and the extra hops they took
    longer_routes: int = 0
    longer_hops: int = 0
    finished: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    waited_for_coverage: int = 0
    coverage_wait_s: list[float] = field(default_factory=list)


class Sim:
    """One simulated cluster; `run(until)` advances the clock through scheduled events."""

    def __init__(
        self,
        tenants: list[Tenant],
        workers: list[tuple[str, int]],
        *,
        cost: StepCost | None = None,
        intra_ms: float = 0.05,
        inter_ms: float = 0.5,
        load_gbps: float = 2.0,
        planner: bool = True,
    ) -> None:
        self.now = 0.0
        self.cost = cost or StepCost()
        self.intra_s, self.inter_s = intra_ms / 1000, inter_ms / 1000
        self.load_bps = load_gbps * GB
        self.tenants = {t.name: t for t in tenants}
        self.manifests = {t.name: manifest_of(t) for t in tenants}
        self.specs = {n: spec_of(m) for n, m in self.manifests.items()}
        self.chain_len = {t.name: len(t.chain) for t in tenants}  # kept when a tenant leaves
        self._events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = itertools.count()
        self.c = Counters()
        self.cfg = BrokerConfig(default_timeout_s=600.0, max_waiting=100_000, stats_bind="")
        self.broker = Broker(self.cfg, lambda: self.specs, stage_key, now=0.0)
        pcfg = PlannerConfig(log_level="WARNING", duplicates=True, settle_s=5.0)
        self.planner = Planner(pcfg, lambda: (dict(self.manifests), [])) if planner else None
        self.workers: dict[bytes, SimWorker] = {}
        self._pids = itertools.count(1000)
        for name, cap in workers:
            self.add_worker(name, cap)
        self.requests: dict[str, tuple[str, float, bool]] = {}  # rid -> (model, t0, covered)
        self.first_token: set[str] = set()
        self._first_routed: set[str] = set()  # broker request ids whose first route is counted
        self._rids = itertools.count()
        self.stats = SimStats(self)
        self.gc_meter = GcMeter()  # the collections' CPU, entered while it runs (scale_gc.py)
        self.gc_policy: Any = None  # broker/gc_policy.py, as BrokerProc applies it
        self.at(0.05, self._tick)
        self.at(0.5, self._stats)

    # -- the clock ------------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self, until: float) -> None:
        with self.gc_meter:
            while self._events and self._events[0][0] <= until:
                t, _, fn, args = heapq.heappop(self._events)
                self.now = max(self.now, t)
                fn(*args)
        self.now = until

    # -- the broker, measured -------------------------------------------------------------------
    def _broker(self, kind: str, call: Callable[..., list], *args: Any) -> None:
        self.gc_meter.kind = kind
        t0 = time.process_time()
        out = call(*args)
        dt = time.process_time() - t0
        self.gc_meter.kind = None
        self.c.broker_cpu_s += dt
        self.c.broker_calls += 1
        calls_cpu = self.c.broker_by_kind.setdefault(kind, [0, 0.0])
        calls_cpu[0] += 1
        calls_cpu[1] += dt
        for o in out:
            self._deliver(o)

    def to_broker(self, peer: bytes, msg: Any, frames: tuple = ()) -> None:
        self._broker(type(msg).__name__, self.broker.handle, peer, msg, frames, self.now)

    def _delay(self, worker: SimWorker | None) -> float:
        if worker is None:
            return self.intra_s
        return self.intra_s if worker.node == "n000" else self.inter_s

    def _deliver(self, o: Any) -> None:
        w = self.workers.get(o.peer)
        if w is not None:
            if isinstance(o.msg, Forward):
                self.c.routed += 1
                self._count_bytes(w, o.msg)
            self.at(self.now + self._delay(w), self._worker_recv, w, o.msg)
        elif o.peer == CLIENT:
            self._client_recv(o.msg)
        # the planner's ACKs and errors need no answer here

    def _count_bytes(self, w: SimWorker, fwd: Forward) -> None:
        """A FORWARD's tensor bytes: relayed across nodes when `w` is off node 0, and handed
        across nodes when the hop before it is on another node than `w`."""
        nbytes = tensor_bytes(fwd.tensors)
        if w.node != "n000":
            self.c.relayed_bytes += nbytes
        req = self.broker.requests.get(split_wire_id(fwd.request_id)[0])
        route = req.route if req is not None else None
        if route and req.hop == 0 and req.rid not in self._first_routed:
            self._first_routed.add(req.rid)
            self._count_first_route(req.model, route)
        if route and 0 < req.hop < len(route) and route[req.hop].worker == w.identity:
            prev = self.workers.get(route[req.hop - 1].worker)
            if prev is not None and prev.node != w.node:
                self.c.hop_bytes += nbytes

    def _count_first_route(self, model: str, route: Any) -> None:
        """Counters.first_routes for a request's first FORWARD."""
        planned = self.broker.state.preferred.get(model, ())
        hops = tuple((self.workers[h.worker].name, tuple(h.spans)) for h in route)
        if any(tuple((h.worker, tuple(h.spans)) for h in r.hops) == hops for r in planned):
            kind = "planned"
        else:
            kind = "own_planned" if planned else "own_none"
        self.c.first_routes[kind] = self.c.first_routes.get(kind, 0) + 1
        target = self.planner.target if self.planner is not None else None
        want = target.plan.routes.get(model, ()) if target is not None else ()
        if want and len(route) > min(len(r.hops) for r in want):
            self.c.longer_routes += 1
            self.c.longer_hops += len(route) - min(len(r.hops) for r in want)

    def _tick(self) -> None:
        self._broker("tick", self.broker.tick, self.now)
        if self.gc_policy is not None:
            self.gc_policy.tick(self.now)
        self.at(self.now + self.cfg.tick_s, self._tick)

    def _stats(self) -> None:
        """A STATS snapshot as the broker process publishes it (client/bench/scale_stats.py)."""
        self.at(self.now + self.cfg.stats_interval_s, self._stats)
        self.stats.snapshot()

    def on_stats(self, body: Any) -> None:
        """The planner's turn with a body its StatsView rebuilt."""
        if self.planner is None:
            return
        t0 = time.process_time()
        cmds = self.planner.on_stats(body, self.now)
        self.c.planner_cpu_s.append(time.process_time() - t0)
        if cmds:
            self.c.bursts.append(len(cmds))
            self.c.burst_bytes.append(sum(len(frames.encode(m)[1]) for m in cmds))
        for m in cmds:
            self.at(self.now + self.intra_s, self.to_broker, PLANNER, m)

    def status_size(self) -> int:
        body = self.broker.status(self.now)
        n = len(frames.encode(Status("s", body))[1])
        self.c.status_bytes.append(n)
        return n

    # -- tenants --------------------------------------------------------------------------------
    def add_tenant(self, t: Tenant) -> None:
        """A model imported into the zoo: the broker re-reads it (the planner on its own)."""
        self.tenants[t.name] = t
        self.chain_len[t.name] = len(t.chain)
        self.manifests[t.name] = manifest_of(t)
        self.specs[t.name] = spec_of(self.manifests[t.name])
        self.broker.reload(self.now)

    def remove_tenant(self, name: str) -> None:
        for d in (self.tenants, self.manifests, self.specs):
            d.pop(name, None)
        self.broker.reload(self.now)

    # -- workers --------------------------------------------------------------------------------
    def add_worker(self, name: str, capacity: int) -> SimWorker:
        w = SimWorker(name, name.encode(), capacity, next(self._pids))
        self.workers[w.identity] = w
        self.at(self.now + self._delay(w), self._ready, w)
        self.at(self.now + 1.0, self._heartbeat, w)
        return w

    def kill_worker(self, name: str) -> None:
        w = self.workers.get(name.encode())
        if w is not None and w.alive:
            w.alive = False
            self.at(self.now + self._delay(w), self.to_broker, w.identity, Dead("killed"))

    def _ready(self, w: SimWorker) -> None:
        if not w.alive:
            return
        msg = Ready(
            PROTOCOL_VERSION,
            w.name,
            w.pid,
            w.node,
            "sim",
            tuple(w.stages.values()),
            kv_total_bytes=KV_TOTAL,
            kv_free_bytes=KV_TOTAL,
            max_batch_size=32,
            free_slots=64,
            memory_budget_bytes=w.capacity + KV_TOTAL,
        )
        self.to_broker(w.identity, msg)

    def _facts(self, w: SimWorker) -> Heartbeat:
        ms = sorted(w.step_ms[-64:])
        p50 = ms[len(ms) // 2] if ms else 0.0
        p95 = ms[int(0.95 * (len(ms) - 1))] if ms else 0.0
        weight = sum(s.nbytes for s in w.stages.values())
        return Heartbeat(KV_TOTAL, 64, {}, 0, w.steps, p50, p95, 1.0, weight)

    def _heartbeat(self, w: SimWorker) -> None:
        if not w.alive:
            return
        self.to_broker(w.identity, self._facts(w))
        self.at(self.now + 1.0, self._heartbeat, w)

    def _worker_recv(self, w: SimWorker, msg: Any) -> None:
        if not w.alive:
            return
        if isinstance(msg, Forward):
            w.queue.append((msg.stage_keys[-1], msg))
            if not w.busy:
                self._step(w)
        elif isinstance(msg, Heartbeat):
            self.at(self.now + self._delay(w), self.to_broker, w.identity, self._facts(w))
        elif isinstance(msg, LoadStage):
            m = self.manifests.get(msg.model)
            if m is None:
                return
            key = stage_key(m, msg.start, msg.end)
            nbytes = sum(m.block_bytes[msg.start : msg.end])
            ref = StageRef(key, msg.model, msg.start, msg.end, nbytes)
            self.at(self.now + nbytes / self.load_bps, self._loaded, w, ref)
        elif isinstance(msg, UnloadStage):
            w.stages.pop(msg.key, None)
            self.at(self.now + self._delay(w), self._ready, w)
        elif not isinstance(msg, Release):
            pass  # SET_BATCH, KV_EXPORT...: not simulated (a KV move falls back to a replay)

    def _loaded(self, w: SimWorker, ref: StageRef) -> None:
        w.stages[ref.key] = ref
        self._ready(w)

    def _step(self, w: SimWorker) -> None:
        batch, w.queue = w.queue[:32], w.queue[32:]
        layers = 0
        for _, fwd in batch:
            for key in set(fwd.stage_keys):
                s = w.stages.get(key)
                layers = max(layers, (s.end - s.start) if s else 0)
        dt = self.cost.seconds(len(batch), layers) * w.slow
        w.busy = True
        self.at(self.now + dt, self._stepped, w, batch, dt)

    def _stepped(self, w: SimWorker, batch: list[tuple[str, Forward]], dt: float) -> None:
        w.busy = False
        if not w.alive:
            return
        w.steps += 1
        w.step_ms.append(dt * 1000)
        for key, fwd in batch:
            s = w.stages.get(key)
            if s is None:
                res: Any = Error(fwd.request_id, "UNKNOWN_STAGE", "unloaded", retryable=True)
                frames: tuple = ()
            elif s.end == self.chain_len.get(s.model, -1):
                res, frames = Result(fwd.request_id, fwd.step, token_id=7), ()
            else:
                # the hidden state of every position the step ran (a prefill's: all of them)
                positions = fwd.tensors[0].shape[0] if fwd.tensors else 1
                meta = (TensorMeta("bfloat16", (positions, HIDDEN_BYTES // 2)),)
                res, frames = Result(fwd.request_id, fwd.step, tensors=meta), (b"",)
                if w.node != "n000":
                    self.c.relayed_bytes += tensor_bytes(meta)
            self.at(self.now + self._delay(w), self.to_broker, w.identity, res, frames)
        if w.queue:
            self._step(w)

    # -- clients --------------------------------------------------------------------------------
    def generate(self, model: str, prompt: int = 64, tokens: int = 32) -> None:
        rid = f"r{next(self._rids)}"
        covered = self.broker.covered(model) if model in self.broker.models else False
        self.requests[rid] = (model, self.now, covered)
        if not covered:
            self.c.waited_for_coverage += 1
        ids = tuple(range(100, 100 + prompt))
        self.to_broker(CLIENT, Generate(rid, model, input_ids=ids, max_new_tokens=tokens))

    def _client_recv(self, msg: Any) -> None:
        if isinstance(msg, Token):
            self.c.tokens += 1
            rid = self.broker.state.by_client.get((CLIENT, msg.request_id))
            req = self.broker.requests.get(rid) if rid else None
            info = self.requests.get(msg.request_id)
            if req is not None and req.route and info is not None:
                hops = req.route
                self.c.hops.setdefault(info[0], []).append(len(hops))
                nodes = [node_of(self.workers[h.worker].name) for h in hops]
                self.c.cross_node_hops += sum(a != b for a, b in itertools.pairwise(nodes))
                if msg.request_id not in self.first_token:
                    self.first_token.add(msg.request_id)
                    if not info[2]:
                        self.c.coverage_wait_s.append(self.now - info[1])
            if msg.finish_reason:
                self.c.finished += 1
                self.requests.pop(msg.request_id, None)
                self.first_token.discard(msg.request_id)
        elif isinstance(msg, Error):
            self.c.errors[msg.code] = self.c.errors.get(msg.code, 0) + 1
            self.requests.pop(msg.request_id, None)
