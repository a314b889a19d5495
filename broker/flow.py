"""The request life cycle of the broker: route with credit, step hop by hop, emit tokens,
finish, replay and fail. Pure like the `Broker` that owns it: no sockets, no clock, every method
returns the messages to send. It owns the KV migration of moving requests (broker/migrate.py).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from blockllm.broker.migrate import Migration
from blockllm.broker.models import kv_reservation
from blockllm.broker.protocol import (
    Error,
    ErrorCode,
    Forward,
    Release,
    Result,
    Speculate,
    TensorMeta,
    Token,
)
from blockllm.broker.requests import RequestState, token_frame, wire_id
from blockllm.broker.rewire import best_planned, same_route
from blockllm.broker.routing import Hop, WorkerView, best_route, best_solo
from blockllm.broker.stage_index import LiveViews
from blockllm.broker.state import BrokerState, Out

logger = logging.getLogger(__name__)


def with_logprobs(token: Token, req: RequestState, res: Result) -> Token:
    """`token` with the logprobs its RESULT carries (the prompt's once, in the first TOKEN)."""
    prompt: dict[str, Any] = {}
    if req.prompt_logprobs:
        req.prompt_logprobs = False
        prompt = {
            "prompt_logprobs": res.prompt_logprobs,
            "prompt_top_ids": res.prompt_top_ids,
            "prompt_top_logprobs": res.prompt_top_logprobs,
        }
    return replace(
        token, logprob=res.logprob, top_ids=res.top_ids, top_logprobs=res.top_logprobs, **prompt
    )


class RequestFlow:
    """Routing, dispatch and the per-request state machine (the broker's loop thread only)."""

    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.migration = Migration(state, self)  # KV migration of requests that move
        self.tries = 0  # route_with_credit calls (what dispatching waiting requests costs)

    # -- routing ---------------------------------------------------------------------------
    def route(
        self, model: str, views: Mapping[Hashable, WorkerView], idle: bool = False
    ) -> list[Hop] | None:
        """The best route of `model` over `views`: a planner-preferred one if one resolves
        (the one with the fewest running requests per weight), else the fewest-hops,
        least-loaded one (routing.find_route, over the stages the routing index says serve the
        model: broker/stage_index.py; when an available worker chains the model alone, the
        least loaded such worker: routing.best_solo, the same route); None if none exists.
        `idle`: as if no request ran (the route STATUS shows: broker/shown.py)."""
        spec = self.state.models.get(model)
        if spec is None:
            return None
        planned = self.state.preferred.get(model)
        if planned:
            running = {} if idle else self.state.running.get(model, {})  # per route (set_route)
            by_name = self.state.names()
            st = self.state
            keys = st.planned_keys.of(model, planned, st.keys_gen, st.key_of)
            hops = best_planned(planned, keys, by_name, views, running)
            if hops is not None:
                return hops
        edges, solo = self.state.stage_index.solo(
            model, spec.chain_len, self.state.workers, self.state.keys_gen, self.state.key_of
        )
        hops = best_solo(solo, views) if solo else None  # one worker chains it: one hop
        if hops is not None:
            return hops
        return best_route(spec.chain_len, edges, views, one_dtype=solo is not None)

    def covered(self, model: str) -> bool:
        """Whether live workers (banned or busy alike) cover the whole chain of `model`."""
        return self.route(model, LiveViews(self.state.workers, lambda p, w: True)) is not None

    def kv_need(self, req: RequestState, route: list[Hop]) -> dict[bytes, int]:
        """KV bytes the request reserves on each worker of `route` (estimate)."""
        need: dict[bytes, int] = {}
        for hop in route:
            # (a hop's spans are consecutive stages of the chain: its layers are those of the
            # span from its first start to its last end)
            layers = req.spec.decoder_layers_in(hop.spans[0][0], hop.spans[-1][1])
            w = self.state.workers.get(hop.worker)
            # in the dtype the worker serves the hop's stages in, in its arena's pages
            dtypes = w.dtypes() if w is not None else {}
            dtype = next((dtypes[k] for k in hop.stage_keys if dtypes.get(k)), "")
            geometries = w.kv_geometries if w is not None else ()
            nbytes = kv_reservation(req.spec, geometries, dtype, layers, req.max_total_len)
            need[hop.worker] = need.get(hop.worker, 0) + nbytes
        return need

    def route_with_credit(
        self, req: RequestState, now: float, exclude: frozenset[bytes] = frozenset()
    ) -> tuple[list[Hop] | None, bool]:
        """A route over workers with credit, avoiding the request's failed workers if possible
        (and `exclude` always), and whether KV bytes (which depend on the request's length)
        were what was missing. A route whose worker lacks the KV bytes is retried without it.
        """
        route, _need, bytes_short = self.credit_route(req, now, exclude)
        return route, bytes_short

    def credit_route(
        self, req: RequestState, now: float, exclude: frozenset[bytes] = frozenset()
    ) -> tuple[list[Hop] | None, dict[bytes, int], bool]:
        """`route_with_credit`, with the KV bytes the route reserves per worker (`kv_need`)."""
        bytes_short = False
        st = self.state
        self.tries += 1
        # (a model with planned routes tries them first: they need no edges)
        if not st.preferred.get(req.model) and not st.stage_index.coverable(
            req.model, req.spec.chain_len, st.workers, st.keys_gen, st.key_of
        ):
            return None, {}, False  # no live stages chain the model: nothing to look at per worker
        for avoid in (req.avoid, set()):
            excluded = set(avoid) | exclude
            while True:
                views = LiveViews(
                    self.state.workers,
                    lambda peer, w, excluded=excluded: (
                        peer not in excluded and not w.banned(now) and w.credit_slots() >= 1
                    ),
                )
                route = self.route(req.model, views)
                if route is None:
                    break
                need = self.kv_need(req, route)
                short = [p for p, n in need.items() if not self.state.workers[p].can_take(n)]
                if not short:
                    return route, need, bytes_short
                bytes_short = True
                excluded.update(short)
            if not avoid:
                break
        return None, {}, bytes_short

    # -- dispatch --------------------------------------------------------------------------
    def dispatch(self, now: float) -> list[Out]:
        """Start the waiting requests that may have a route now and have one with credit, in
        arrival order; the others wait until a change wakes them (broker/waiting.py)."""
        st = self.state
        self.wake(now)
        out: list[Out] = []
        failed_at: dict[str, int] = {}  # model -> smallest max_total_len that found no route
        for rid in st.waiting.take_ready():
            req = st.requests[rid]
            if req.max_total_len >= failed_at.get(req.model, 1 << 62):
                continue
            route, need, bytes_short = self.credit_route(req, now)
            if route is None:
                # without a route for lack of slots, no request of the model has one: skip them
                limit = req.max_total_len if bytes_short else 0
                failed_at[req.model] = min(limit, failed_at.get(req.model, 1 << 62))
                continue
            st.waiting.remove(rid)
            for peer, nbytes in need.items():
                st.workers[peer].inflight[req.wire_id] = nbytes
            st.set_route(req, route)
            req.routed_gen = st.routes_gen
            out.append(self.start_step(req, now))
        for model in failed_at:  # blocked until a worker serving it, or its stages, change
            spec = st.models.get(model)
            peers = () if spec is None else self.peers_of(model, spec.chain_len)
            st.waiting.block(model, peers)
        return out

    def wake(self, now: float) -> None:
        """Wake the waiting models a change since the last dispatch may have given a route:
        workers that may take more work, stages that changed (broker/waiting.py)."""
        st = self.state
        freed = st.workers.freed
        if freed:
            st.waiting.wake_workers(freed)
            freed.clear()
        every, models = st.stage_index.take_dropped(st.workers, st.keys_gen)
        if every:
            st.waiting.wake_all()
        else:
            for model in models:
                st.waiting.wake(model)

    def peers_of(self, model: str, chain_len: int) -> set[Hashable]:
        """The workers whose live stages serve `model` (those whose credit it waits for)."""
        st = self.state
        return st.stage_index.peers_of(model, chain_len, st.workers, st.keys_gen, st.key_of)

    def forward(
        self,
        req: RequestState,
        hop: Hop,
        tensors: tuple[TensorMeta, ...],
        wire: str | None = None,
        past_len: int | None = None,
    ) -> Forward:
        past_len = req.past_len if past_len is None else past_len
        return Forward(
            request_id=req.wire_id if wire is None else wire,
            step=req.step,
            stage_keys=hop.stage_keys,
            past_len=past_len,
            max_total_len=req.max_total_len,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            seed=req.seed,
            tensors=tensors,
            top_logprobs=req.top_logprobs,
            targets=req.targets(hop, past_len),
            **self.adapter_fields(req, hop),
            hops=len(req.route or ()),
        )

    def adapter_fields(self, req: RequestState, hop: Hop) -> dict[str, tuple]:
        """A LoRA adapter's blocks at the positions of the hop's spans (FORWARD's fields)."""
        spec = self.state.models.get(req.model)
        pairs = getattr(getattr(spec, "manifest", None), "adapter_blocks", ())
        inside = [(p, b) for p, b in pairs if any(lo <= p < hi for lo, hi in hop.spans)]
        if not inside:
            return {}
        return {
            "adapter_positions": tuple(p for p, _ in inside),
            "adapter_blocks": tuple(b for _, b in inside),
        }

    def speculative(
        self, req: RequestState, tensors: tuple[TensorMeta, ...], frames: Sequence[Any]
    ) -> list[Out]:
        """SPECULATE for hop `req.hop + 1` with the input just forwarded to hop `req.hop`
        (the same frames, never decoded): only for a model that speculates, on a decode step
        (one position) past hop 0, when the next hop is on another worker."""
        tol = self.state.cfg.speculation_tolerance(req.model)
        route, j = req.route, req.hop
        spec = self.state.models.get(req.model)
        if getattr(getattr(spec, "manifest", None), "adapter", None) is not None:
            return []  # SPECULATE carries no adapter blocks: a LoRA tenant never speculates
        if tol is None or route is None or req.prefill or not 1 <= j < len(route) - 1:
            return []
        if route[j + 1].worker == route[j].worker or len(tensors) != 1:
            return []
        if tuple(tensors[0].shape[:1]) != (1,):
            return []
        nxt = route[j + 1]
        self.state.counters["speculated"] += 1
        msg = Speculate(
            req.wire_id,
            req.step,
            nxt.stage_keys,
            req.past_len,
            req.max_total_len,
            tol,
            req.temperature,
            req.top_k,
            req.top_p,
            req.seed,
            tensors,
            req.top_logprobs,
        )
        return [Out(nxt.worker, msg, tuple(frames))]

    def start_step(self, req: RequestState, now: float) -> Out:
        """FORWARD the next step's token ids to hop 0 (a prefill after (re)routing)."""
        assert req.route
        self.state.hop_sent(req, now)
        ids, req.past_len = req.step_input()
        req.step += 1
        req.hop = 0
        meta, frame = token_frame(ids)
        hop = req.route[0]
        return Out(hop.worker, self.forward(req, hop, (meta,)), (frame,))

    # -- tokens and the end of a request -----------------------------------------------------
    def on_token(
        self, req: RequestState, token_id: int, now: float, res: Result | None = None
    ) -> list[Out]:
        """The last hop sampled `token_id` (RESULT `res`): stream it, then finish or start the
        next step."""
        lost_race = self.drop_shadow(req)  # this step is done: a hedged attempt lost
        req.generated.append(token_id)
        req.prefill = False
        self.state.counters["tokens"] += 1
        self.state.metrics.on_token(req.model, now, req.created, req.last_token_at)
        req.last_token_at = now
        text = req.detok.push(token_id) if req.detok else ""
        finish = None
        if token_id in req.spec.eos_ids:
            finish = "stop"
        elif len(req.generated) >= req.max_new_tokens:
            finish = "length"
        if finish is not None and req.detok is not None:
            text += req.detok.finish()
        token = Token(
            req.client_rid, len(req.generated) - 1, token_id, text, finish, len(req.prompt)
        )
        if res is not None:
            token = with_logprobs(token, req, res)
        out = [Out(req.client, token), *lost_race]
        if finish is None:
            if self.should_move(req, now):
                return out + self.migration.relocate(req, now)  # migrate its KV, or replay
            return [*out, self.start_step(req, now)]
        self.state.counters["completed"] += 1
        self.state.metrics.on_complete(req.model)
        return out + self.finish(req, None)

    # -- live rewiring: between two steps, a request may move to a better route -------------
    def should_move(self, req: RequestState, now: float) -> bool:
        """Whether the request should leave its route before its next step: a stage of it is
        being drained, or the planner asked running requests to move (SET_ROUTES with
        move_running) since it was routed; and a different route with credit exists now."""
        assert req.route is not None
        if req.shadow is not None:
            return False
        draining = any(
            (w := self.state.workers.get(h.worker)) is not None
            and set(h.stage_keys) & set(w.draining)
            for h in req.route
        )
        if not draining and not (
            self.state.move_gen > req.routed_gen and self.state.preferred.get(req.model)
        ):
            return False
        req.routed_gen = self.state.routes_gen  # decide once per change of the planner's routes
        route, _ = self.route_with_credit(req, now)
        return route is not None and not same_route(route, req.route)

    def move(self, req: RequestState) -> list[Out]:
        """Release the request's hops and route it again (a prefill of everything so far):
        nothing is lost or sent twice, the client sees one slower token."""
        out = self.release(req)
        req.prefill = True
        self.state.counters["moved"] += 1
        logger.info(
            "[rewire] request %s (%s) moves after %d tokens",
            req.client_rid,
            req.rid,
            len(req.generated),
        )
        self.state.waiting.appendleft(req.rid)
        return out

    def finish(self, req: RequestState, final: Out | None) -> list[Out]:
        """Forget the request: RELEASE its hops, return its credit, send `final` if any."""
        out = [final] if final is not None else []
        out += self.release(req)
        self.state.drop_request(req)
        self.state.by_client.pop((req.client, req.client_rid), None)
        if req.route is None and req.rid in self.state.waiting:
            self.state.waiting.remove(req.rid)
        return out

    def release(self, req: RequestState) -> list[Out]:
        """RELEASE to every live worker of the route (and of a hedged attempt), and return
        their credit."""
        out = self.drop_shadow(req)
        out += self.migration.drop(req)
        out += self.release_route(req.route, req.wire_id)
        self.state.set_route(req, None)
        return out

    def release_route(self, route: list[Hop] | None, wire: str) -> list[Out]:
        out = []
        for peer in dict.fromkeys(h.worker for h in route or ()):
            worker = self.state.workers.get(peer)  # type: ignore[call-overload]
            if worker is not None:
                worker.inflight.pop(wire, None)
                out.append(Out(peer, Release(wire)))  # type: ignore[arg-type]
        return out

    def drop_shadow(self, req: RequestState) -> list[Out]:
        """Forget a hedged attempt: RELEASE its workers (its late answers are dropped)."""
        sh, req.shadow = req.shadow, None
        return [] if sh is None else self.release_route(sh.route, wire_id(req.rid, sh.attempt))

    def fail(
        self, req: RequestState, code: ErrorCode, message: str, retryable: bool = False
    ) -> list[Out]:
        """End the request with a typed error to its client."""
        self.state.counters["failed"] += 1
        if code is ErrorCode.TIMEOUT or code is ErrorCode.NO_ROUTE:
            self.state.counters["timeouts"] += 1
        logger.info("request %s (%s) failed: %s %s", req.client_rid, req.rid, code.value, message)
        error = Error(req.client_rid, code.value, message, retryable, req.step)
        return self.finish(req, Out(req.client, error))

    def replay(self, req: RequestState, now: float, failed: bytes, why: str) -> list[Out]:
        """Move the request off its route: release, route again later, re-prefill everything.

        The client sees only a delay: the generated tokens are kept and not re-sent.
        """
        out = self.release(req)
        req.replays += 1
        req.prefill = True
        req.last_failure = why
        req.avoid.add(failed)
        self.state.counters["replays"] += 1
        if req.replays > self.state.cfg.max_replays:
            text = f"gave up after {req.replays - 1} replays; last: {why}"
            return out + self.fail(req, ErrorCode.WORKER_LOST, text, retryable=True)
        logger.info(
            "[replay] request %s (%s) after %d tokens: %s",
            req.client_rid,
            req.rid,
            len(req.generated),
            why,
        )
        self.state.waiting.appendleft(req.rid)
        return out
