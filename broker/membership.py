"""Workers joining, reporting and leaving: a part of the `Broker`, pure.

READY registers a worker (or re-registers it: a restarted worker's requests, and those using
stages it no longer has, are replayed), HEARTBEAT takes its load facts, DEAD or its silence
(the Broker's `tick`) or an unreachable peer purges it and replays the requests routed through
it (a hedged attempt through a survivor carries on instead).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from blockllm.broker.flow import RequestFlow
from blockllm.broker.hedge import Hedging
from blockllm.broker.protocol import (
    PROTOCOL_VERSION,
    Dead,
    Error,
    ErrorCode,
    Heartbeat,
    Kind,
    Ready,
)
from blockllm.broker.state import BrokerState, Out
from blockllm.broker.workers import WorkerState

logger = logging.getLogger(__name__)

Handler = Callable[[bytes, Any, Sequence[Any], float], list[Out]]


class Membership:
    """The worker registry's protocol side (module docstring). Loop thread only."""

    def __init__(self, state: BrokerState, flow: RequestFlow, hedging: Hedging) -> None:
        self.state = state
        self.flow = flow
        self.hedging = hedging

    def handlers(self) -> dict[Kind, Handler]:
        return {Kind.READY: self.ready, Kind.HEARTBEAT: self.heartbeat, Kind.DEAD: self.dead}

    def ready(self, peer: bytes, msg: Ready, frames: Sequence[Any], now: float) -> list[Out]:
        if msg.protocol_version != PROTOCOL_VERSION:
            text = f"protocol version {msg.protocol_version}, broker speaks {PROTOCOL_VERSION}"
            logger.warning("[ready] refused %s (pid %s): %s", msg.name, msg.pid, text)
            out = [Out(peer, Error("", ErrorCode.PROTOCOL_VERSION.value, text))]
            if peer in self.state.workers:
                out += self.lose(self.state.workers[peer], now, "protocol version")
            return out
        self.state.reload_for([s.model for s in msg.stages], now)
        old = self.state.workers.get(peer)
        if old is None:
            self.state.workers[peer] = WorkerState.from_ready(
                peer, msg, now, self.state.cfg.expiry_s
            )
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
        checked = old.stage_keys()  # their keys were checked when they came
        kept = frozenset() if restarted else {s.key for s in msg.stages}
        out: list[Out] = []
        for req in self.state.requests_on(peer):
            used = {k for h in req.route or () if h.worker == peer for k in h.stage_keys}
            if restarted or not used <= kept:
                out += self.flow.replay(req, now, peer, "worker re-registered without its stages")
        if restarted:
            old.inflight.clear()
        old.apply_ready(msg)
        logger.info("[ready] worker %s re-registered: %d stages", msg.name, len(msg.stages))
        self._check_keys(msg, frozenset() if restarted else checked)
        return out

    def _check_keys(self, msg: Ready, checked: frozenset[str] = frozenset()) -> None:
        """Warn when a stage's key is not what this broker computes (it would never route);
        the stages whose keys are `checked` already are skipped."""
        for s in msg.stages:
            if s.key in checked:
                continue
            spec = self.state.models.get(s.model)
            key = s.key if spec is None else self.state.own_key(spec, s.start, s.end)
            if key != s.key:
                logger.warning(
                    "[ready] %s: stage %s[%d:%d] key differs from the broker's stage_key",
                    msg.name,
                    s.model,
                    s.start,
                    s.end,
                )

    def heartbeat(
        self, peer: bytes, msg: Heartbeat, frames: Sequence[Any], now: float
    ) -> list[Out]:
        worker = self.state.workers.get(peer)
        if worker is None:
            # a worker this broker does not know (it restarted): ask it to READY again
            self.state.counters["unknown_worker_messages"] += 1
            text = "unknown worker: send READY"
            return [Out(peer, Error("", ErrorCode.WORKER_LOST.value, text, retryable=True))]
        worker.apply_heartbeat(msg)
        return []

    def dead(self, peer: bytes, msg: Dead, frames: Sequence[Any], now: float) -> list[Out]:
        worker = self.state.workers.get(peer)
        if worker is None:
            return []
        return self.lose(worker, now, f"DEAD: {msg.reason}")

    def lose(self, worker: WorkerState, now: float, why: str) -> list[Out]:
        """Purge a worker and replay every request routed through it."""
        level = logging.INFO if why == "DEAD: shutdown" else logging.WARNING  # a clean stop
        logger.log(level, "[dead] worker %s pid %s: %s", worker.name, worker.pid, why)
        self.state.workers.pop(worker.identity, None)
        out: list[Out] = []
        for req in self.state.requests.values():  # a hedged attempt through it is dropped
            if req.shadow is not None and worker.identity in {h.worker for h in req.shadow.route}:
                out += self.flow.drop_shadow(req)
        for req in self.state.requests_on(worker.identity, worker):
            if req.shadow is not None:  # the hedged attempt carries on: no replay
                out += self.hedging.promote(req)
                continue
            out += self.flow.replay(req, now, worker.identity, f"worker {worker.name} lost ({why})")
        return out
