"""Hedged steps: a decode step late past a deadline is re-sent to a duplicate; the first
answer wins. A part of the `Broker`, pure like it.

The deadline is `max(hedge_after_s, hedge_factor x the fastest worker's recent step p50)`;
only decode steps are hedged (a prefill's time depends on its length). The re-send is a
`Shadow` attempt on a route with credit that avoids the late hop's worker (a duplicate the
planner loaded, or any other replica): a prefill of prompt + generated tokens under the wire id
`rid~attempt`, so its KV never mixes with the original attempt's on a worker both use. Steps are
idempotent by request and step (sampling is seeded by position), so whichever attempt produces
the step's token first wins: the other is RELEASEd (its KV freed) and its late answers are
dropped as stale. A shadow that fails is simply dropped; if the original attempt's worker is
lost, a live shadow takes over instead of a replay.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from blockllm.broker.flow import RequestFlow
from blockllm.broker.protocol import Error, Result
from blockllm.broker.requests import (
    RequestState,
    Shadow,
    hidden_problem,
    split_wire_id,
    token_frame,
    wire_id,
)
from blockllm.broker.rewire import same_route
from blockllm.broker.state import BrokerState, Out

logger = logging.getLogger(__name__)


class Hedging:
    """Shadow attempts of late steps (the broker's loop thread only)."""

    def __init__(self, state: BrokerState, flow: RequestFlow) -> None:
        self.state = state
        self.flow = flow
        self.late: dict[str, float] = {}  # request id -> its late hop's send time (see tick)

    # -- launching ---------------------------------------------------------------------------
    def hedge_deadline(self) -> float:
        """Seconds a decode hop may take before it is hedged."""
        p50s = [w.step_ms_p50 for w in self.state.workers.values() if w.step_ms_p50 > 0]
        typical = min(p50s) / 1000 if p50s else 0.0
        return max(self.state.cfg.hedge_after_s, self.state.cfg.hedge_factor * typical)

    def tick(self, now: float) -> list[Out]:
        """Hedge the decode hops sent longer than the deadline ago. The hops come from the
        state's timer of sent hops (`BrokerState.hop_sent`, broker/hop_timer.py), not a scan
        of every request: the ones past the deadline move to `late`, kept while their hop is
        the current one (a request late but not hedgeable now, e.g. with a shadow that may
        still fail)."""
        if self.state.cfg.hedge_after_s <= 0:
            self.state.sent.clear()
            self.late.clear()
            return []
        requests = self.state.requests

        def current(rid: str) -> float | None:
            req = requests.get(rid)
            return None if req is None else req.hop_sent_at

        for rid, at in self.state.sent.due(now, self.hedge_deadline(), current):
            self.late[rid] = at
        out: list[Out] = []
        for rid, at in list(self.late.items()):
            req = requests.get(rid)
            if req is None or req.hop_sent_at != at:
                del self.late[rid]  # finished, or its hop moved on
                continue
            if req.route is None or req.shadow is not None or req.prefill or req.past_len == 0:
                continue
            del self.late[rid]
            out += self._launch(req, now)
        return out

    def _launch(self, req: RequestState, now: float) -> list[Out]:
        assert req.route is not None
        late = req.route[req.hop].worker
        route, _ = self.flow.route_with_credit(req, now, frozenset({late}))  # type: ignore[arg-type]
        if route is None or same_route(route, req.route):
            self.state.hop_sent(req, now)  # nothing to hedge with now: look again a deadline later
            return []
        req.attempts += 1
        req.shadow = Shadow(req.attempts, route)
        wire = wire_id(req.rid, req.attempts)
        for peer, nbytes in self.flow.kv_need(req, route).items():
            self.state.workers[peer].inflight[wire] = nbytes
        meta, frame = token_frame([*req.prompt, *req.generated])
        self.state.counters["hedges"] += 1
        late_name = self.state.workers[late].name if late in self.state.workers else "?"  # type: ignore[index]
        logger.info(
            "[hedge] request %s step %d late on %s: re-sent as %s",
            req.client_rid,
            req.step,
            late_name,
            wire,
        )
        fwd = self.flow.forward(req, route[0], (meta,), wire=wire, past_len=0)
        return [Out(route[0].worker, fwd, (frame,))]  # type: ignore[arg-type]

    # -- answers of a shadow -----------------------------------------------------------------
    def shadow_of(self, peer: bytes, wire: str) -> RequestState | None:
        """The request whose hedged attempt `wire` is (from a live worker), if any."""
        rid, attempt = split_wire_id(wire)
        req = self.state.requests.get(rid)
        if req is None or req.shadow is None or peer not in self.state.workers:
            return None
        return req if req.shadow.attempt == attempt else None

    def on_result(
        self, req: RequestState, peer: bytes, msg: Result, frames: Sequence[Any], now: float
    ) -> list[Out]:
        sh = req.shadow
        assert sh is not None
        if msg.step != req.step or sh.route[sh.hop].worker != peer:
            self.state.counters["stale_results"] += 1
            return []
        if sh.hop < len(sh.route) - 1:  # a shadow prefills prompt + generated
            if hidden_problem(req, msg.tensors, len(req.prompt) + len(req.generated)):
                self.state.counters["bad_messages"] += 1
                return self.flow.drop_shadow(req)
            sh.hop += 1
            hop = sh.route[sh.hop]
            wire = wire_id(req.rid, sh.attempt)
            fwd = self.flow.forward(req, hop, tuple(msg.tensors), wire=wire, past_len=0)
            return [Out(hop.worker, fwd, tuple(frames))]  # type: ignore[arg-type]
        if msg.tensors or not 0 <= msg.token_id < req.spec.vocab_size:
            return self.flow.drop_shadow(req)
        self.state.counters["hedges_won"] += 1
        logger.info("[hedge] request %s step %d: the re-sent attempt won", req.client_rid, req.step)
        return self.promote(req) + self.flow.on_token(req, msg.token_id, now, msg)

    def on_error(self, req: RequestState, msg: Error) -> list[Out]:
        logger.info("[hedge] request %s: re-sent attempt failed (%s)", req.client_rid, msg.code)
        return self.flow.drop_shadow(req)

    def promote(self, req: RequestState) -> list[Out]:
        """The shadow becomes the request's attempt; the old one is RELEASEd."""
        sh = req.shadow
        assert sh is not None
        out = self.flow.release_route(req.route, req.wire_id)
        req.shadow = None
        self.state.set_route(req, sh.route)
        req.attempt, req.hop = sh.attempt, sh.hop
        req.past_len = 0  # the shadow is a prefill: its remaining hops run with past_len 0
        req.routed_gen = self.state.routes_gen
        return out
