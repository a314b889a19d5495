"""Broker: the pure routing state machine (no sockets, no clock; STYLE 7.5).

Every entry point takes the current time `now` (monotonic seconds) and returns the messages to
send as `Out(peer, message, frames)`; `BrokerProc` does the IO. Tensor frames are opaque here:
a RESULT's frames are handed back unchanged as the next hop's FORWARD input.

The request flow is docs/internals.md's: validate -> bounded waiting queue -> route over the
stages workers advertised (only workers with credit) -> FORWARD hop by hop -> TOKEN to the
client -> RELEASE at the end. A worker's KV_MISS / CACHE_FULL / QUEUE_FULL / UNKNOWN_STAGE,
its DEAD or its silence replays the request: release the old hops, route again avoiding the
failed worker, and re-prefill prompt + generated tokens with past_len 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from blockllm.broker.commands import Commands
from blockllm.broker.config import BrokerConfig
from blockllm.broker.flow import RequestFlow
from blockllm.broker.hedge import Hedging
from blockllm.broker.membership import Membership
from blockllm.broker.migrate import Migrating
from blockllm.broker.models import Catalog, ModelSpec
from blockllm.broker.protocol import (
    Cancel,
    Error,
    ErrorCode,
    Forward,
    Generate,
    Heartbeat,
    Kind,
    KvExport,
    KvShard,
    Message,
    PlannedRoute,
    Result,
    StatsBody,
    Status,
    StatusBody,
    StatusRequest,
    Token,
)
from blockllm.broker.requests import (
    RequestError,
    RequestState,
    hidden_problem,
    split_wire_id,
    validate,
)
from blockllm.broker.routing import Hop, WorkerView
from blockllm.broker.state import BrokerState, Out, StageKeyFn, error_code
from blockllm.broker.stats import Metrics, stats_body
from blockllm.broker.status import status_body
from blockllm.broker.text import IncrementalDetokenizer
from blockllm.broker.waiting import WaitQueue
from blockllm.broker.workers import WorkerState
from blockllm.zoo.chain import stage_key as zoo_stage_key

logger = logging.getLogger(__name__)

REPLAY_CODES = frozenset({"KV_MISS", "CACHE_FULL", "QUEUE_FULL", "UNKNOWN_STAGE", "WORKER_LOST"})
BAN_CODES = frozenset({"CACHE_FULL", "QUEUE_FULL"})
Handler = Callable[[bytes, Any, Sequence[Any], float], list[Out]]


class Broker:
    """The broker's protocol handlers over its parts: one `BrokerState` (registries, queues,
    counters, models), the `RequestFlow` (routing, steps, tokens, replay; it owns the KV
    `Migration`), `Hedging` (late steps), `Commands` (the planner's) and `Membership` (workers
    joining, reporting, leaving: broker/membership.py). Loop thread only.

    Public: `handle`, `bad_message`, `tick`, `peer_lost`, `send_failed`, `begin_shutdown`,
    `abort_all`, `reload`, `status`, `stats`, `idle`, `route`, `covered`; the state's
    `workers`, `requests`, `waiting`, `models`, `counters`, `metrics`, `preferred` (the
    planner's routes), `chains` (assembled chains) and `stats_endpoint` read through. No method
    raises on peer input: bad input is answered or counted.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        catalog: Catalog,
        stage_key: StageKeyFn | None = None,
        now: float = 0.0,
    ) -> None:
        self.cfg = cfg
        self.state = BrokerState(cfg, catalog, stage_key or zoo_stage_key, now)
        self.flow = RequestFlow(self.state)
        self.hedging = Hedging(self.state, self.flow)
        self.commands = Commands(self.state)
        self.membership = Membership(self.state, self.flow, self.hedging)
        self._handlers: dict[Kind, Handler] = {
            **self.commands.handlers(),
            **self.flow.migration.handlers(),
            **self.membership.handlers(),
            Kind.RESULT: self._handle_result,
            Kind.ERROR: self._handle_error,
            Kind.GENERATE: self._handle_generate,
            Kind.CANCEL: self._handle_cancel,
            Kind.STATUS_REQUEST: self._handle_status_request,
        }
        self.state.reload(now)

    # -- the state, read through -------------------------------------------------------------
    @property
    def workers(self) -> dict[bytes, WorkerState]:
        return self.state.workers

    @property
    def requests(self) -> dict[str, RequestState]:
        return self.state.requests

    @property
    def waiting(self) -> WaitQueue:
        return self.state.waiting

    @property
    def models(self) -> dict[str, ModelSpec]:
        return self.state.models

    @property
    def counters(self) -> dict[str, int]:
        return self.state.counters

    @property
    def metrics(self) -> Metrics:
        return self.state.metrics

    @property
    def preferred(self) -> dict[str, tuple[PlannedRoute, ...]]:
        return self.state.preferred

    @property
    def chains(self) -> dict[str, tuple[str, ...]]:
        return self.state.chains

    @property
    def migrating(self) -> dict[str, Migrating]:
        return self.flow.migration.migrating

    @property
    def stats_endpoint(self) -> str:
        return self.state.stats_endpoint

    @stats_endpoint.setter
    def stats_endpoint(self, endpoint: str) -> None:
        self.state.stats_endpoint = endpoint

    # -- entry points ----------------------------------------------------------------------
    def handle(self, peer: bytes, msg: Message, frames: Sequence[Any], now: float) -> list[Out]:
        """Handle one decoded message from `peer`; `frames` are its tensor frames, untouched.

        The message goes to its handler once, then waiting requests are dispatched once (a
        GENERATE's handler dispatches itself: it must know whether the request started)."""
        worker = self.state.workers.get(peer)
        if worker is not None:
            worker.touch(now, self.cfg.expiry_s)
        handler = self._handlers.get(msg.KIND)
        if handler is None:
            return self.bad_message(peer, f"unexpected message kind {msg.KIND.name}", now)
        out = handler(peer, msg, frames, now)
        if msg.KIND is Kind.GENERATE:
            return out
        return out + self.flow.dispatch(now)

    def bad_message(self, peer: bytes, reason: str, now: float) -> list[Out]:
        """A message that failed to decode (or makes no sense here): count it, answer it."""
        return self.state.bad_message(peer, reason, now)

    def route(self, model: str, views: Mapping[Hashable, WorkerView]) -> list[Hop] | None:
        """The best route of `model` over `views` (see RequestFlow.route)."""
        return self.flow.route(model, views)

    def covered(self, model: str) -> bool:
        """Whether live workers (banned or busy alike) cover the whole chain of `model`."""
        return self.flow.covered(model)

    def tick(self, now: float) -> list[Out]:
        """Deadlines, worker expiry and pings; call at least every `cfg.tick_s`."""
        out: list[Out] = []
        for req in self.state.past_deadline(now):
            code = ErrorCode.TIMEOUT
            if req.route is None and not self.flow.covered(req.model):
                code = ErrorCode.NO_ROUTE
            out += self.flow.fail(req, code, f"deadline passed ({req.last_failure or 'waiting'})")
        workers = self.state.workers  # its timers: heaps, not a scan of every worker
        workers.bans_ended(now)  # the requests waiting for them are tried again (waiting.py)
        for w in workers.expired(now):
            self.state.counters["workers_expired"] += 1
            out += self.membership.lose(w, now, "heartbeat expired")
        for w in workers.pings_due(now, self.cfg.heartbeat_s):
            w.last_ping = now
            out.append(Out(w.identity, Heartbeat()))
        out += self.commands.tick(now) + self.hedging.tick(now) + self.flow.migration.tick(now)
        return out + self.flow.dispatch(now)

    def peer_lost(self, peer: bytes, now: float) -> list[Out]:
        """The transport says `peer` is gone (EHOSTUNREACH): drop it as a worker and client."""
        out: list[Out] = []
        if peer in self.state.workers:
            out += self.membership.lose(self.state.workers[peer], now, "unreachable")
        for req in [r for r in self.state.requests.values() if r.client == peer]:
            out += self.flow.finish(req, None)
        return out + self.flow.dispatch(now)

    def send_failed(self, peer: bytes, msg: Message, now: float) -> list[Out]:
        """A send to `peer` would block (its queue is full): undo what depended on it."""
        self.state.counters["dropped_sends"] += 1
        if isinstance(msg, KvExport | KvShard):
            return self.flow.migration.send_failed(msg) + self.flow.dispatch(now)
        if isinstance(msg, Forward) and (req := self.state.requests.get(msg.request_id)):
            worker = self.state.workers.get(peer)
            if worker is not None:
                worker.ban(now, self.cfg.ban_base_s, self.cfg.ban_max_s)
            return self.flow.replay(req, now, peer, "worker queue full") + self.flow.dispatch(now)
        if isinstance(msg, Token) and (rid := self.state.by_client.get((peer, msg.request_id))):
            return self.flow.finish(self.state.requests[rid], None)  # a client that stopped reading
        return []

    def begin_shutdown(self, now: float) -> list[Out]:
        """Stop admitting (new GENERATEs get SHUTTING_DOWN: clients resume on the next broker).
        An accepted request waiting for credit still runs in the drain; one whose model no
        live worker covers gets SHUTTING_DOWN now."""
        self.state.shutting_down = True
        out: list[Out] = []
        for rid in list(self.state.waiting):
            req = self.state.requests[rid]
            if not self.flow.covered(req.model):
                out += self.flow.fail(
                    req, ErrorCode.SHUTTING_DOWN, "broker shutting down", retryable=True
                )
        return out

    def abort_all(self, now: float, reason: str) -> list[Out]:
        """End every request still running with SHUTTING_DOWN (its client resumes it on the next
        broker from the tokens it has, as after a lost connection) and release its hops."""
        out: list[Out] = []
        for req in list(self.state.requests.values()):
            out += self.flow.fail(req, ErrorCode.SHUTTING_DOWN, reason, retryable=True)
        return out

    @property
    def idle(self) -> bool:
        return not self.state.requests

    def reload(self, now: float = 0.0) -> None:
        """Re-read the models (zoo manifests and tokenizers); requests keep the spec they had."""
        self.state.reload(now)

    def status(
        self,
        now: float,
        model: str = "",
        worker: str = "",
        *,
        offset: int = 0,
        limit: int | None = None,
    ) -> StatusBody:
        """The STATUS body (see broker/status.py), filtered to a model and/or a worker; one
        page of it with `limit` (0: the broker's page size), all of it with None."""
        return status_body(
            self.state, self.flow.route, now, model=model, worker=worker, offset=offset, limit=limit
        )

    def stats(self, now: float) -> StatsBody:
        """The STATS body the broker publishes for the planner (see broker/stats.py)."""
        return stats_body(self.state, self.flow.route, now, entries=self.state.stats_entries)

    # -- workers -----------------------------------------------------------------------------
    # -- results and worker errors ---------------------------------------------------------
    def _current(self, peer: bytes, wire: str, step: int) -> RequestState | None:
        """The request a worker's answer belongs to, if it is the answer being waited for."""
        rid, attempt = split_wire_id(wire)
        req = self.state.requests.get(rid)
        if req is None or req.route is None or peer not in self.state.workers:
            return None
        if attempt != req.attempt or step != req.step or req.route[req.hop].worker != peer:
            return None
        return req

    def _handle_result(
        self, peer: bytes, msg: Result, frames: Sequence[Any], now: float
    ) -> list[Out]:
        shadowed = self.hedging.shadow_of(peer, msg.request_id)
        if shadowed is not None:
            return self.hedging.on_result(shadowed, peer, msg, frames, now)
        req = self._current(peer, msg.request_id, msg.step)
        if req is None:
            self.state.counters["stale_results"] += 1
            return []
        assert req.route is not None
        self.state.workers[peer].ban_count = 0
        last = req.hop == len(req.route) - 1
        if not last:
            why = hidden_problem(req, msg.tensors, req.step_tokens())
            if why:
                return self._misbehaved(req, peer, now, why)
            req.hop += 1
            self.state.hop_sent(req, now)
            hop = req.route[req.hop]
            out = [Out(hop.worker, self.flow.forward(req, hop, tuple(msg.tensors)), tuple(frames))]
            return out + self.flow.speculative(
                req, tuple(msg.tensors), frames
            )  # speculation: flow.py
        if msg.tensors or not 0 <= msg.token_id < req.spec.vocab_size:
            return self._misbehaved(req, peer, now, f"bad final RESULT (token {msg.token_id})")
        return self.flow.on_token(req, msg.token_id, now, msg)

    def _misbehaved(self, req: RequestState, peer: bytes, now: float, why: str) -> list[Out]:
        self.state.counters["bad_messages"] += 1
        logger.warning("worker %s: %s", self.state.workers[peer].name, why)
        return self.flow.replay(req, now, peer, why)

    def _handle_error(
        self, peer: bytes, msg: Error, frames: Sequence[Any], now: float
    ) -> list[Out]:
        worker = self.state.workers.get(peer)
        if worker is not None and not msg.request_id:  # about a command (LOAD_STAGE, ...)
            worker.last_error = f"{msg.code}: {msg.message}"[:300]
            logger.warning("worker %s: %s", worker.name, worker.last_error)
        shadowed = self.hedging.shadow_of(peer, msg.request_id)
        if shadowed is not None:
            return self.hedging.on_error(shadowed, msg)
        rid, attempt = split_wire_id(msg.request_id)
        req = self.state.requests.get(rid)
        if req is not None and attempt != req.attempt:
            req = None  # an answer to an attempt that lost its race
        if worker is None or req is None or peer not in req.workers():
            logger.debug("error from %r ignored: %s %s", peer, msg.code, msg.message)
            self.state.counters["stale_results"] += 1
            return []
        if msg.step not in (-1, req.step):
            self.state.counters["stale_results"] += 1
            return []
        if msg.code in BAN_CODES:
            seconds = worker.ban(now, self.cfg.ban_base_s, self.cfg.ban_max_s)
            logger.info("[replay] worker %s %s: banned %.2fs", worker.name, msg.code, seconds)
        if msg.code == ErrorCode.UNKNOWN_STAGE.value:
            hop_keys = {k for h in req.route or () if h.worker == peer for k in h.stage_keys}
            worker.drop_stages(frozenset(hop_keys))
        if msg.code in REPLAY_CODES or msg.retryable:
            return self.flow.replay(req, now, peer, f"{msg.code} from {worker.name}: {msg.message}")
        return self.flow.fail(req, error_code(msg.code), f"worker {worker.name}: {msg.message}")

    # -- clients ---------------------------------------------------------------------------
    def _handle_generate(
        self, peer: bytes, msg: Generate, frames: Sequence[Any], now: float
    ) -> list[Out]:
        def error(code: ErrorCode, text: str, retryable: bool = False) -> list[Out]:
            self.state.counters["rejected"] += 1
            return [Out(peer, Error(msg.request_id, code.value, text, retryable))]

        if self.state.shutting_down:
            return error(ErrorCode.SHUTTING_DOWN, "broker shutting down", True)
        if not msg.request_id or (peer, msg.request_id) in self.state.by_client:
            return error(ErrorCode.BAD_REQUEST, f"request_id {msg.request_id!r} empty or in use")
        spec = self.state.models.get(msg.model) or self.state.reload_for(
            [msg.model], now, msg.model
        )
        if spec is None:
            return error(ErrorCode.UNKNOWN_MODEL, f"unknown model {msg.model!r}")
        try:
            prompt = validate(msg, spec, self.cfg)
        except RequestError as e:
            return error(e.code, e.message, e.retryable)
        req = self._new_request(peer, msg, spec, prompt, now)
        self.state.add_request(req)
        self.state.by_client[(peer, msg.request_id)] = req.rid
        self.state.waiting.append(req.rid)
        out = self.flow.dispatch(now)
        if req.route is None and len(self.state.waiting) > self.cfg.max_waiting:
            self.flow.finish(req, None)  # it could not start and the queue is full
            self.state.counters["overloaded"] += 1
            return error(ErrorCode.OVERLOADED, f"{len(self.state.waiting)} requests waiting", True)
        self.state.counters["requests"] += 1
        self.state.metrics.on_request(spec.name, now)
        return out

    def _new_request(
        self, peer: bytes, msg: Generate, spec: ModelSpec, prompt: tuple[int, ...], now: float
    ) -> RequestState:
        timeout = msg.timeout_s if msg.timeout_s > 0 else self.cfg.default_timeout_s
        req = RequestState(
            rid=f"b{next(self.state.ids)}",
            client=peer,
            client_rid=msg.request_id,
            spec=spec,
            prompt=prompt,
            max_new_tokens=msg.max_new_tokens,
            temperature=msg.temperature,
            top_k=msg.top_k,
            top_p=msg.top_p,
            seed=msg.seed,
            deadline=now + timeout,
            created=now,
            generated=list(msg.resume_ids),
            top_logprobs=msg.top_logprobs,
            prompt_logprobs=msg.prompt_logprobs,
        )
        if spec.tokenizer is not None:
            req.detok = IncrementalDetokenizer(spec.tokenizer)
            req.detok.prime(msg.resume_ids)
        return req

    def _handle_cancel(
        self, peer: bytes, msg: Cancel, frames: Sequence[Any], now: float
    ) -> list[Out]:
        rid = self.state.by_client.get((peer, msg.request_id))
        if rid is None:
            return []
        self.state.counters["cancelled"] += 1
        return self.flow.fail(
            self.state.requests[rid], ErrorCode.CANCELLED, "cancelled by the client"
        )

    def _handle_status_request(
        self, peer: bytes, msg: StatusRequest, frames: Sequence[Any], now: float
    ) -> list[Out]:
        body = self.status(now, msg.model, msg.worker, offset=msg.offset, limit=msg.limit)
        return [Out(peer, Status(msg.request_id, body))]
