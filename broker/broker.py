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

import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from blockllm.broker import status as status_mod
from blockllm.broker.commands import Commands
from blockllm.broker.config import BrokerConfig
from blockllm.broker.flow import Out, RequestFlow, error_code
from blockllm.broker.hedge import Hedging
from blockllm.broker.migrate import Migrating, Migration
from blockllm.broker.models import Catalog, ModelSpec
from blockllm.broker.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Dead,
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
    Ready,
    Result,
    Status,
    StatusRequest,
    Token,
)
from blockllm.broker.requests import RequestError, RequestState, split_wire_id, validate
from blockllm.broker.stats import Metrics, stats_body
from blockllm.broker.text import IncrementalDetokenizer
from blockllm.broker.workers import WorkerState

logger = logging.getLogger(__name__)

StageKeyFn = Callable[[Any, int, int], str]
REPLAY_CODES = frozenset({"KV_MISS", "CACHE_FULL", "QUEUE_FULL", "UNKNOWN_STAGE", "WORKER_LOST"})
BAN_CODES = frozenset({"CACHE_FULL", "QUEUE_FULL"})


def _default_stage_key() -> StageKeyFn:
    from blockllm.worker.items import stage_key

    return stage_key


class ChainView:
    """A manifest seen through an assembled chain (SET_CHAIN): what `stage_key` reads."""

    def __init__(self, manifest: Any, chain: tuple[str, ...]) -> None:
        self.chain = chain
        self.name = manifest.name
        self.fingerprint = getattr(manifest, "fingerprint", "")
        self.config = getattr(manifest, "config", {})
        self.tie_word_embeddings = getattr(manifest, "tie_word_embeddings", False)


class Broker(Commands, Hedging, Migrating, RequestFlow):
    """Registries of workers and requests, and every protocol handler. Loop thread only.

    Public: `handle`, `bad_message`, `tick`, `peer_lost`, `send_failed`, `begin_shutdown`,
    `abort_all`, `reload`, `status`, `stats`, `idle`; attributes `workers`, `requests`,
    `waiting`, `models`, `counters`, `metrics`, `preferred` (the planner's routes), `chains`
    (assembled chains). No method raises on peer input: bad input is answered or counted.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        catalog: Catalog,
        stage_key: StageKeyFn | None = None,
        now: float = 0.0,
    ) -> None:
        self.cfg = cfg
        self._catalog = catalog
        self._stage_key = stage_key or _default_stage_key()
        self.models: dict[str, ModelSpec] = {}
        self.workers: dict[bytes, WorkerState] = {}
        self.requests: dict[str, RequestState] = {}
        self.waiting: deque[str] = deque()
        self.by_client: dict[tuple[bytes, str], str] = {}
        self.counters: dict[str, int] = dict.fromkeys(status_mod.COUNTERS, 0)
        self.shutting_down = False
        self._ids = itertools.count(1)
        self._keys: dict[tuple[str, int, int], str | None] = {}
        self._last_reload = now
        self.metrics = Metrics()
        self.preferred: dict[str, tuple[PlannedRoute, ...]] = {}
        self.routes_gen = 0
        self.move_gen = 0
        self.chains: dict[str, tuple[str, ...]] = {}
        self.migrating: dict[str, Migration] = {}  # request id -> its KV migration in flight
        self.stats_endpoint = ""  # set by BrokerProc once its PUB socket is bound
        self._handlers: dict[Kind, Callable[[bytes, Any, Sequence[Any], float], list[Out]]] = {
            **self.command_handlers(),
            **self.migration_handlers(),
            Kind.READY: self._handle_ready,
            Kind.HEARTBEAT: self._handle_heartbeat,
            Kind.DEAD: self._handle_dead,
            Kind.RESULT: self._handle_result,
            Kind.ERROR: self._handle_error,
            Kind.GENERATE: self._handle_generate,
            Kind.CANCEL: self._handle_cancel,
            Kind.STATUS_REQUEST: self._handle_status_request,
        }
        self.reload(now)

    # -- entry points ----------------------------------------------------------------------
    def handle(self, peer: bytes, msg: Message, frames: Sequence[Any], now: float) -> list[Out]:
        """Handle one decoded message from `peer`; `frames` are its tensor frames, untouched."""
        worker = self.workers.get(peer)
        if worker is not None:
            worker.touch(now, self.cfg.expiry_s)
        handler = self._handlers.get(msg.KIND)
        if handler is None:
            return self.bad_message(peer, f"unexpected message kind {msg.KIND.name}", now)
        return handler(peer, msg, frames, now) + self._dispatch(now)

    def bad_message(self, peer: bytes, reason: str, now: float) -> list[Out]:
        """A message that failed to decode (or makes no sense here): count it, answer it."""
        self.counters["bad_messages"] += 1
        worker = self.workers.get(peer)
        if worker is not None:
            worker.touch(now, self.cfg.expiry_s)
        logger.debug("bad message from %r: %s", peer, reason)
        return [Out(peer, Error("", ErrorCode.BAD_REQUEST.value, reason[:200]))]

    def tick(self, now: float) -> list[Out]:
        """Deadlines, worker expiry and pings; call at least every `cfg.tick_s`."""
        out: list[Out] = []
        for req in [r for r in self.requests.values() if now >= r.deadline]:
            code = ErrorCode.TIMEOUT
            if req.route is None and not self.covered(req.model):
                code = ErrorCode.NO_ROUTE
            out += self._fail(req, code, f"deadline passed ({req.last_failure or 'waiting'})")
        for w in list(self.workers.values()):
            if now >= w.expires_at:
                self.counters["workers_expired"] += 1
                out += self._lose_worker(w, now, "heartbeat expired")
            elif now - w.last_recv >= self.cfg.heartbeat_s and now - w.last_ping >= (
                self.cfg.heartbeat_s
            ):
                w.last_ping = now
                out.append(Out(w.identity, Heartbeat()))
        out += self._drain_tick(now) + self._hedge_tick(now) + self._migrate_tick(now)
        return out + self._dispatch(now)

    def peer_lost(self, peer: bytes, now: float) -> list[Out]:
        """The transport says `peer` is gone (EHOSTUNREACH): drop it as a worker and client."""
        out: list[Out] = []
        if peer in self.workers:
            out += self._lose_worker(self.workers[peer], now, "unreachable")
        for req in [r for r in self.requests.values() if r.client == peer]:
            out += self._finish(req, None)
        return out + self._dispatch(now)

    def send_failed(self, peer: bytes, msg: Message, now: float) -> list[Out]:
        """A send to `peer` would block (its queue is full): undo what depended on it."""
        self.counters["dropped_sends"] += 1
        if isinstance(msg, KvExport | KvShard):
            return self._migration_send_failed(msg) + self._dispatch(now)
        if isinstance(msg, Forward) and (req := self.requests.get(msg.request_id)):
            worker = self.workers.get(peer)
            if worker is not None:
                worker.ban(now, self.cfg.ban_base_s, self.cfg.ban_max_s)
            return self._replay(req, now, peer, "worker queue full") + self._dispatch(now)
        if isinstance(msg, Token) and (rid := self.by_client.get((peer, msg.request_id))):
            return self._finish(self.requests[rid], None)  # a client that stopped reading
        return []

    def begin_shutdown(self, now: float) -> list[Out]:
        """Stop admitting (new GENERATEs get OVERLOADED). An accepted request waiting for credit
        still runs in the drain; one whose model no live worker covers fails now (retryable)."""
        self.shutting_down = True
        out: list[Out] = []
        for rid in list(self.waiting):
            req = self.requests[rid]
            if not self.covered(req.model):
                out += self._fail(req, ErrorCode.OVERLOADED, "broker shutting down")
        return out

    def abort_all(self, now: float, reason: str) -> list[Out]:
        """Fail every request still running (retryable) and release its hops."""
        out: list[Out] = []
        for req in list(self.requests.values()):
            out += self._fail(req, ErrorCode.INTERNAL, reason, retryable=True)
        return out

    @property
    def idle(self) -> bool:
        return not self.requests

    def reload(self, now: float = 0.0) -> None:
        """Re-read the models (zoo manifests and tokenizers); requests keep the spec they had."""
        self._last_reload = now
        try:
            self.models = dict(self._catalog())
        except Exception:  # a broken zoo must not take the broker down: keep the old view
            logger.exception("[models] reading the zoo failed; keeping %d models", len(self.models))
        self._keys.clear()
        logger.info("[models] %d: %s", len(self.models), ", ".join(sorted(self.models)) or "-")

    def status(self, now: float) -> dict[str, Any]:
        """The STATUS body (see broker/status.py)."""
        return status_mod.status_body(self, now)

    def stats(self, now: float) -> dict[str, Any]:
        """The STATS body the broker publishes for the planner (see broker/stats.py)."""
        return stats_body(self, now)

    # -- workers -----------------------------------------------------------------------------
    def _handle_ready(
        self, peer: bytes, msg: Ready, frames: Sequence[Any], now: float
    ) -> list[Out]:
        if msg.protocol_version != PROTOCOL_VERSION:
            text = f"protocol version {msg.protocol_version}, broker speaks {PROTOCOL_VERSION}"
            logger.warning("[ready] refused %s (pid %s): %s", msg.name, msg.pid, text)
            out = [Out(peer, Error("", ErrorCode.PROTOCOL_VERSION.value, text))]
            if peer in self.workers:
                out += self._lose_worker(self.workers[peer], now, "protocol version")
            return out
        self._maybe_reload_for([s.model for s in msg.stages], now)
        old = self.workers.get(peer)
        if old is None:
            self.workers[peer] = WorkerState.from_ready(peer, msg, now, self.cfg.expiry_s)
            logger.info(
                "[ready] worker %s pid %s on %s (%s): %d stages",
                msg.name,
                msg.pid,
                msg.host,
                msg.device,
                len(msg.stages),
            )
            self._check_keys(msg)
            return []
        restarted = old.pid != msg.pid
        kept = frozenset() if restarted else {s.key for s in msg.stages}
        out: list[Out] = []
        for req in self._requests_on(peer):
            used = {k for h in req.route or () if h.worker == peer for k in h.stage_keys}
            if restarted or not used <= kept:
                out += self._replay(req, now, peer, "worker re-registered without its stages")
        if restarted:
            old.inflight.clear()
        old.apply_ready(msg)
        logger.info("[ready] worker %s re-registered: %d stages", msg.name, len(msg.stages))
        self._check_keys(msg)
        return out

    def _check_keys(self, msg: Ready) -> None:
        """Warn when a stage's key is not what this broker computes (it would never route)."""
        for s in msg.stages:
            spec = self.models.get(s.model)
            key = s.key if spec is None else self._own_key(spec, s.start, s.end)
            if key != s.key:
                logger.warning(
                    "[ready] %s: stage %s[%d:%d] key differs from the broker's stage_key",
                    msg.name,
                    s.model,
                    s.start,
                    s.end,
                )

    def _handle_heartbeat(
        self, peer: bytes, msg: Heartbeat, frames: Sequence[Any], now: float
    ) -> list[Out]:
        worker = self.workers.get(peer)
        if worker is None:
            # a worker this broker does not know (it restarted): ask it to READY again
            self.counters["unknown_worker_messages"] += 1
            text = "unknown worker: send READY"
            return [Out(peer, Error("", ErrorCode.WORKER_LOST.value, text, retryable=True))]
        worker.apply_heartbeat(msg)
        return []

    def _handle_dead(self, peer: bytes, msg: Dead, frames: Sequence[Any], now: float) -> list[Out]:
        worker = self.workers.get(peer)
        if worker is None:
            return []
        return self._lose_worker(worker, now, f"DEAD: {msg.reason}")

    def _lose_worker(self, worker: WorkerState, now: float, why: str) -> list[Out]:
        """Purge a worker and replay every request routed through it."""
        level = logging.INFO if why == "DEAD: shutdown" else logging.WARNING  # a clean stop
        logger.log(level, "[dead] worker %s pid %s: %s", worker.name, worker.pid, why)
        self.workers.pop(worker.identity, None)
        out: list[Out] = []
        for req in self.requests.values():  # a hedged attempt through it is dropped
            if req.shadow is not None and worker.identity in {h.worker for h in req.shadow.route}:
                out += self._drop_shadow(req)
        for req in self._requests_on(worker.identity):
            if req.shadow is not None:  # the hedged attempt carries on: no replay
                out += self._promote(req)
                continue
            out += self._replay(req, now, worker.identity, f"worker {worker.name} lost ({why})")
        return out

    def _requests_on(self, peer: bytes) -> list[RequestState]:
        return [r for r in self.requests.values() if peer in r.workers()]

    # -- results and worker errors ---------------------------------------------------------
    def _current(self, peer: bytes, wire: str, step: int) -> RequestState | None:
        """The request a worker's answer belongs to, if it is the answer being waited for."""
        rid, attempt = split_wire_id(wire)
        req = self.requests.get(rid)
        if req is None or req.route is None or peer not in self.workers:
            return None
        if attempt != req.attempt or step != req.step or req.route[req.hop].worker != peer:
            return None
        return req

    def _shadow_of(self, peer: bytes, wire: str) -> RequestState | None:
        """The request whose hedged attempt `wire` is (from a live worker), if any."""
        rid, attempt = split_wire_id(wire)
        req = self.requests.get(rid)
        if req is None or req.shadow is None or peer not in self.workers:
            return None
        return req if req.shadow.attempt == attempt else None

    def _handle_result(
        self, peer: bytes, msg: Result, frames: Sequence[Any], now: float
    ) -> list[Out]:
        shadowed = self._shadow_of(peer, msg.request_id)
        if shadowed is not None:
            return self._shadow_result(shadowed, peer, msg, frames, now)
        req = self._current(peer, msg.request_id, msg.step)
        if req is None:
            self.counters["stale_results"] += 1
            return []
        assert req.route is not None
        self.workers[peer].ban_count = 0
        last = req.hop == len(req.route) - 1
        if not last:
            if len(msg.tensors) != 1:
                return self._misbehaved(req, peer, now, "RESULT mid-route without one tensor")
            req.hop += 1
            req.hop_sent_at = now
            hop = req.route[req.hop]
            out = [Out(hop.worker, self._forward(req, hop, tuple(msg.tensors)), tuple(frames))]
            return out + self._speculative(req, tuple(msg.tensors), frames)  # speculation: flow.py
        if msg.tensors or not 0 <= msg.token_id < req.spec.vocab_size:
            return self._misbehaved(req, peer, now, f"bad final RESULT (token {msg.token_id})")
        return self._on_token(req, msg.token_id, now, msg)

    def _misbehaved(self, req: RequestState, peer: bytes, now: float, why: str) -> list[Out]:
        self.counters["bad_messages"] += 1
        logger.warning("worker %s: %s", self.workers[peer].name, why)
        return self._replay(req, now, peer, why)

    def _handle_error(
        self, peer: bytes, msg: Error, frames: Sequence[Any], now: float
    ) -> list[Out]:
        worker = self.workers.get(peer)
        if worker is not None and not msg.request_id:  # about a command (LOAD_STAGE, ...)
            worker.last_error = f"{msg.code}: {msg.message}"[:300]
            logger.warning("worker %s: %s", worker.name, worker.last_error)
        shadowed = self._shadow_of(peer, msg.request_id)
        if shadowed is not None:
            return self._shadow_error(shadowed, msg)
        rid, attempt = split_wire_id(msg.request_id)
        req = self.requests.get(rid)
        if req is not None and attempt != req.attempt:
            req = None  # an answer to an attempt that lost its race
        if worker is None or req is None or peer not in req.workers():
            logger.debug("error from %r ignored: %s %s", peer, msg.code, msg.message)
            self.counters["stale_results"] += 1
            return []
        if msg.step not in (-1, req.step):
            self.counters["stale_results"] += 1
            return []
        if msg.code in BAN_CODES:
            seconds = worker.ban(now, self.cfg.ban_base_s, self.cfg.ban_max_s)
            logger.info("[replay] worker %s %s: banned %.2fs", worker.name, msg.code, seconds)
        if msg.code == ErrorCode.UNKNOWN_STAGE.value:
            hop_keys = {k for h in req.route or () if h.worker == peer for k in h.stage_keys}
            worker.drop_stages(frozenset(hop_keys))
        if msg.code in REPLAY_CODES or msg.retryable:
            return self._replay(req, now, peer, f"{msg.code} from {worker.name}: {msg.message}")
        return self._fail(req, error_code(msg.code), f"worker {worker.name}: {msg.message}")

    # -- clients ---------------------------------------------------------------------------
    def _handle_generate(
        self, peer: bytes, msg: Generate, frames: Sequence[Any], now: float
    ) -> list[Out]:
        def error(code: ErrorCode, text: str, retryable: bool = False) -> list[Out]:
            self.counters["rejected"] += 1
            return [Out(peer, Error(msg.request_id, code.value, text, retryable))]

        if self.shutting_down:
            return error(ErrorCode.OVERLOADED, "broker shutting down", True)
        if not msg.request_id or (peer, msg.request_id) in self.by_client:
            return error(ErrorCode.BAD_REQUEST, f"request_id {msg.request_id!r} empty or in use")
        spec = self.models.get(msg.model) or self._maybe_reload_for([msg.model], now, msg.model)
        if spec is None:
            return error(ErrorCode.UNKNOWN_MODEL, f"unknown model {msg.model!r}")
        try:
            prompt = validate(msg, spec, self.cfg)
        except RequestError as e:
            return error(e.code, e.message, e.retryable)
        req = self._new_request(peer, msg, spec, prompt, now)
        self.requests[req.rid] = req
        self.by_client[(peer, msg.request_id)] = req.rid
        self.waiting.append(req.rid)
        out = self._dispatch(now)
        if req.route is None and len(self.waiting) > self.cfg.max_waiting:
            self._finish(req, None)  # it could not start and the queue is full
            self.counters["overloaded"] += 1
            return error(ErrorCode.OVERLOADED, f"{len(self.waiting)} requests waiting", True)
        self.counters["requests"] += 1
        self.metrics.on_request(spec.name, now)
        return out

    def _new_request(
        self, peer: bytes, msg: Generate, spec: ModelSpec, prompt: tuple[int, ...], now: float
    ) -> RequestState:
        timeout = msg.timeout_s if msg.timeout_s > 0 else self.cfg.default_timeout_s
        req = RequestState(
            rid=f"b{next(self._ids)}",
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
        rid = self.by_client.get((peer, msg.request_id))
        if rid is None:
            return []
        self.counters["cancelled"] += 1
        return self._fail(self.requests[rid], ErrorCode.CANCELLED, "cancelled by the client")

    def _handle_status_request(
        self, peer: bytes, msg: StatusRequest, frames: Sequence[Any], now: float
    ) -> list[Out]:
        return [Out(peer, Status(msg.request_id, self.status(now)))]

    # -- models ----------------------------------------------------------------------------
    def _maybe_reload_for(
        self, names: Sequence[str], now: float, want: str | None = None
    ) -> ModelSpec | None:
        """Re-read the zoo (rate-limited) when a name is unknown; the spec of `want` if any."""
        missing = [n for n in names if n not in self.models]
        if missing and now >= self._last_reload + self.cfg.reload_min_interval_s:
            self.reload(now)
        return self.models.get(want) if want is not None else None

    def key_of(self, model: str, start: int, end: int) -> str | None:
        """stage_key over the chain `model` is served with (its own, or the assembled one of
        SET_CHAIN), memoized; None for an unknown model or span."""
        k = (model, start, end)
        if k not in self._keys:
            spec = self.models.get(model)
            manifest = None if spec is None else spec.manifest
            if manifest is not None and model in self.chains:
                manifest = ChainView(manifest, self.chains[model])
            try:
                self._keys[k] = None if spec is None else self._stage_key(manifest, start, end)
            except Exception:  # a span the model does not have
                self._keys[k] = None
        return self._keys[k]

    def _own_key(self, spec: ModelSpec, start: int, end: int) -> str | None:
        """stage_key over the model's own chain (what a worker loading it computes)."""
        if spec.name not in self.chains:
            return self.key_of(spec.name, start, end)
        try:
            return self._stage_key(spec.manifest, start, end)
        except Exception:
            return None
