"""KV migration on a route change: a running request that moves keeps its KV instead of
re-prefilling. A part of the `Broker` (the request flow owns it), pure like it.

When a running request moves (SET_ROUTES with move_running, or a stage being drained) and each
decoder stage of its new route is a stage it already holds KV in on some live worker, it is
paused between two steps and every stage whose worker changes is migrated:

    broker --KV_EXPORT(tid, wire id, stage, length)--> old worker
    old worker --KV_SHARD(K, V frames)--> broker --KV_SHARD(same frames, max_total_len)--> new
    new worker --KV_ACK(tid, ok)--> broker

The broker never decodes the shard: it re-sends the received `zmq.Frame`s with a header that
carries the same tensor metas (`frames.encode_passthrough`). Stages that stay on the same
worker keep their KV in place. Once every import is acknowledged the request takes the new
route and its next step is an ordinary decode (past_len = tokens so far - 1); the workers it
left are RELEASEd. Any failure — a refusal (KV_MISS, CACHE_FULL, UNKNOWN_STAGE, ...), a worker
of the migration lost, a send that would block, or `cfg.migrate_timeout_s` passing — falls
back to today's move: release and replay (a prefill of prompt + generated tokens), so nothing
is lost and no token is repeated. Counters: `migrations`, `migrations_failed`,
`migrated_bytes`.

Routing prefers the workers that hold a request's KV: a running request keeps its route for
its whole life unless it fails, a stage of it drains, or the planner asks running requests to
move; even then it stays when its route is still a planned one no busier per weight, counting
the request once, than the new route would be with it (before, it counted itself twice and
hopped to any idle replica of equal weight).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockllm.broker.protocol import Kind, KvAck, KvExport, KvShard, Message, TensorMeta
from blockllm.broker.requests import RequestState
from blockllm.broker.rewire import planned_score, same_route, signature
from blockllm.broker.routing import Hop, WorkerView
from blockllm.broker.state import BrokerState, Out

if TYPE_CHECKING:
    from blockllm.broker.flow import RequestFlow

logger = logging.getLogger(__name__)

Handler = Callable[[bytes, Any, Sequence[Any], float], list[Out]]


@dataclass(slots=True)
class Transfer:
    """One stage's KV of one request on its way from `src` to `dst`."""

    transfer_id: int
    stage_key: str
    src: bytes
    dst: bytes
    state: str = "export"  # export -> import -> done


@dataclass(slots=True)
class Migrating:
    """A paused request's move to `route`: its transfers and when it started."""

    route: list[Hop]
    length: int  # KV positions every stage holds (the next step's past_len)
    started: float
    transfers: dict[int, Transfer] = field(default_factory=dict)
    nbytes: int = 0

    def workers(self) -> set[bytes]:
        return {t.src for t in self.transfers.values()} | {t.dst for t in self.transfers.values()}


def plan_transfers(
    old: Sequence[Hop], new: Sequence[Hop], has_kv: Callable[[int, int], bool]
) -> list[tuple[str, bytes, bytes]] | None:
    """(stage key, old worker, new worker) for each stage with KV whose worker changes, or None
    when a stage with KV of the new route is not one the request holds (nothing to migrate
    from: a replay is needed). Stages without decoder layers hold no KV and are skipped."""
    held = {key: hop.worker for hop in old for key in hop.stage_keys}
    moves: list[tuple[str, bytes, bytes]] = []
    for hop in new:
        for key, (start, end) in zip(hop.stage_keys, hop.spans, strict=True):
            if not has_kv(start, end):
                continue
            if key not in held:
                return None
            if held[key] != hop.worker:
                moves.append((key, held[key], hop.worker))  # type: ignore[arg-type]
    return moves


def shard_nbytes(metas: Sequence[TensorMeta]) -> int:
    """Bytes of a shard's tensor frames, from its header (the frames are never read)."""
    from blockllm.broker.frames import tensor_nbytes

    return sum(tensor_nbytes(m) for m in metas)


class Migration:
    """KV migration of moving requests (the broker's loop thread only); owned by the
    `RequestFlow`, which asks it to `relocate` a request and to `drop` one it releases."""

    def __init__(self, state: BrokerState, flow: RequestFlow) -> None:
        self.state = state
        self.flow = flow
        self.migrating: dict[str, Migrating] = {}  # request id -> its KV migration in flight
        self._tids = itertools.count(1)

    def handlers(self) -> dict[Kind, Handler]:
        return {Kind.KV_SHARD: self._handle_kv_shard, Kind.KV_ACK: self._handle_kv_ack}

    # -- starting ----------------------------------------------------------------------------
    def relocate(self, req: RequestState, now: float) -> list[Out]:
        """Move a running request between two steps (`_should_move` said so): stay when its
        route is as good as the new one, else migrate its KV if it can, else replay."""
        assert req.route is not None
        if req.shadow is not None:
            return self.flow.move(req)
        route, _ = self.flow.route_with_credit(req, now)
        if route is None or same_route(route, req.route):
            return self.flow.move(req)
        if self._stays(req, route, now):  # its KV stays where it is
            return [self.flow.start_step(req, now)]
        if not self.state.cfg.kv_migration:
            return self.flow.move(req)
        spec = req.spec
        moves = plan_transfers(req.route, route, lambda a, b: spec.decoder_layers_in(a, b) > 0)
        if moves is None or any(src not in self.state.workers for _, src, _ in moves):
            return self.flow.move(req)
        mig = Migrating(route, len(req.prompt) + len(req.generated) - 1, now)
        for peer, nbytes in self.flow.kv_need(req, route).items():
            self.state.workers[peer].inflight.setdefault(req.wire_id, nbytes)
        self.migrating[req.rid] = mig
        req.prefill = True  # paused: hedging skips it; a fallback replays anyway
        out = []
        for key, src, dst in moves:
            t = Transfer(next(self._tids), key, src, dst)
            mig.transfers[t.transfer_id] = t
            out.append(Out(src, KvExport(t.transfer_id, req.wire_id, key, mig.length)))
        logger.info(
            "[migrate] request %s (%s): %d stages after %d tokens",
            req.client_rid,
            req.rid,
            len(moves),
            len(req.generated),
        )
        if not moves:  # only stages without KV change workers
            return out + self._migrated(req, now)
        return out

    def _stays(self, req: RequestState, new: list[Hop], now: float) -> bool:
        """Whether a request the planner's new routes would move keeps its route instead:
        its route is still a planned one (no stage draining, workers live and not banned) and
        no busier per weight, counting the request once, than `new` would be with it."""
        planned = self.state.preferred.get(req.model)
        if not planned or req.route is None:
            return False
        for h in req.route:
            w = self.state.workers.get(h.worker)  # type: ignore[call-overload]
            if w is None or w.banned(now) or set(h.stage_keys) & set(w.draining):
                return False
        views = {p: WorkerView(w.live_stages(), w.load()) for p, w in self.state.workers.items()}
        by_name = {w.name: p for p, w in self.state.workers.items()}
        running = Counter(
            signature(r.route)
            for r in self.state.requests.values()
            if r.model == req.model and r.route
        )
        st = self.state
        keys = st.planned_keys.of(req.model, planned, st.keys_gen, st.key_of)
        args = (by_name, views, running)
        stay = planned_score(planned, keys, signature(req.route), *args, joining=0)
        if stay is None:
            return False
        go = planned_score(planned, keys, signature(new), *args, joining=1)
        return go is None or stay <= go

    # -- answers of workers ------------------------------------------------------------------
    def _transfer(self, peer: bytes, msg: KvShard | KvAck) -> tuple[Any, Any]:
        """(request, transfer) a worker's KV message belongs to, or (None, None) if stale."""
        rid = msg.request_id.partition("~")[0]
        req = self.state.requests.get(rid)
        mig = self.migrating.get(rid)
        t = None if mig is None else mig.transfers.get(msg.transfer_id)
        if req is None or t is None or req.wire_id != msg.request_id:
            return None, None
        if t.stage_key != msg.stage_key:
            return None, None
        return req, t

    def _handle_kv_shard(
        self, peer: bytes, msg: KvShard, frames: Sequence[Any], now: float
    ) -> list[Out]:
        req, t = self._transfer(peer, msg)
        if req is None or t.src != peer or t.state != "export":
            self.state.counters["stale_results"] += 1
            return []
        mig = self.migrating[req.rid]
        if msg.length != mig.length or len(msg.tensors) != 2:
            return self._migration_failed(req, f"bad KV_SHARD from {self._name(peer)}")
        t.state = "import"
        mig.nbytes += shard_nbytes(msg.tensors)
        fwd = KvShard(
            t.transfer_id,
            msg.request_id,
            t.stage_key,
            mig.length,
            req.max_total_len,
            tuple(msg.tensors),
        )
        return [Out(t.dst, fwd, tuple(frames))]

    def _handle_kv_ack(
        self, peer: bytes, msg: KvAck, frames: Sequence[Any], now: float
    ) -> list[Out]:
        req, t = self._transfer(peer, msg)
        if req is None or peer not in (t.src, t.dst):
            self.state.counters["stale_results"] += 1
            return []
        if not msg.ok:
            why = f"{msg.code} from {self._name(peer)}: {msg.message}"
            return self._migration_failed(req, why)
        if peer != t.dst or t.state != "import":
            self.state.counters["stale_results"] += 1
            return []
        t.state = "done"
        mig = self.migrating[req.rid]
        if all(x.state == "done" for x in mig.transfers.values()):
            return self._migrated(req, now)
        return []

    # -- the end of a migration --------------------------------------------------------------
    def _migrated(self, req: RequestState, now: float) -> list[Out]:
        """Every shard arrived: take the new route, RELEASE the workers left, next step."""
        mig = self.migrating.pop(req.rid)
        assert req.route is not None
        kept = {h.worker for h in mig.route}
        out = self.flow.release_route([h for h in req.route if h.worker not in kept], req.wire_id)
        self.state.set_route(req, mig.route)
        req.routed_gen = self.state.routes_gen
        req.prefill = False
        self.state.counters["migrations"] += 1
        self.state.counters["moved"] += 1
        self.state.counters["migrated_bytes"] += mig.nbytes
        logger.info(
            "[migrate] request %s (%s): %d bytes in %.1f ms",
            req.client_rid,
            req.rid,
            mig.nbytes,
            (now - mig.started) * 1000,
        )
        return [*out, self.flow.start_step(req, now)]

    def _migration_failed(self, req: RequestState, why: str) -> list[Out]:
        """Fall back to the replay move (its release drops the migration: `_drop_migration`)."""
        self.state.counters["migrations_failed"] += 1
        logger.info("[migrate] request %s (%s) replays instead: %s", req.client_rid, req.rid, why)
        return self.flow.move(req)

    def drop(self, req: RequestState) -> list[Out]:
        """Forget a migration in flight (the request is released, replayed or finished):
        RELEASE the new route's workers that are not on the old one (they may hold a copy)."""
        mig = self.migrating.pop(req.rid, None)
        if mig is None:
            return []
        old = {h.worker for h in req.route or ()}
        return self.flow.release_route([h for h in mig.route if h.worker not in old], req.wire_id)

    def tick(self, now: float) -> list[Out]:
        """Fall back for migrations past their deadline or with a worker lost."""
        out: list[Out] = []
        for rid, mig in list(self.migrating.items()):
            req = self.state.requests.get(rid)
            if req is None:
                self.migrating.pop(rid, None)
                continue
            gone = [p for p in mig.workers() if p not in self.state.workers]
            if gone:
                out += self._migration_failed(req, "a worker of the migration was lost")
            elif now - mig.started >= self.state.cfg.migrate_timeout_s:
                out += self._migration_failed(req, "timed out")
        return out

    def send_failed(self, msg: Message) -> list[Out]:
        """A KV_EXPORT or KV_SHARD could not be sent: that migration replays instead."""
        rid = getattr(msg, "request_id", "").partition("~")[0]
        req = self.state.requests.get(rid)
        if req is None or rid not in self.migrating:
            return []
        return self._migration_failed(req, f"{msg.KIND.name} could not be sent")

    def _name(self, peer: bytes) -> str:
        w = self.state.workers.get(peer)
        return w.name if w is not None else repr(peer)
