"""Commands of a planner (or an operator tool) to the broker: a part of the `Broker`, pure.

Any peer that is not a registered worker may send them; each is answered by an ACK with its
`command_id`:
- LOAD_STAGE / SET_BATCH (`worker` named): forwarded to that worker; it answers the broker with
  READY (its new stage list) or an ERROR, which the next stats show (`last_error`).
- UNLOAD_STAGE (`worker` named): the stage is drained first: new routes stop using it at once,
  running requests move off it at their next step when another route has credit, and the
  command reaches the worker once no request uses the stage, or when the drain time is over.
- SET_ROUTES: the planner's preferred routes per model (see broker/rewire.py).
- SET_CHAIN: serve a model through an assembled chain (equivalent blocks substituted).
- RELOAD: re-read the zoo's models now.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from blockllm.broker.protocol import (
    Ack,
    Kind,
    LoadStage,
    PlannedRoute,
    Reload,
    SetBatch,
    SetChain,
    SetRoutes,
    UnloadStage,
)
from blockllm.broker.rewire import check_planned
from blockllm.broker.state import BrokerState, Out
from blockllm.broker.workers import WorkerState

logger = logging.getLogger(__name__)

BLOCK_ID = re.compile(r"[0-9a-f]{64}")
Handler = Callable[[bytes, Any, Sequence[Any], float], list[Out]]


class Commands:
    """Command handlers and stage draining (the broker's loop thread only)."""

    def __init__(self, state: BrokerState) -> None:
        self.state = state
        # model -> the spec its kept planned routes were checked against (SET_ROUTES)
        self._checked: dict[str, Any] = {}

    def handlers(self) -> dict[Kind, Handler]:
        return {
            Kind.LOAD_STAGE: self._handle_load_stage,
            Kind.UNLOAD_STAGE: self._handle_unload_stage,
            Kind.SET_ROUTES: self._handle_set_routes,
            Kind.SET_BATCH: self._handle_set_batch,
            Kind.SET_CHAIN: self._handle_set_chain,
            Kind.RELOAD: self._handle_reload,
            Kind.PLANNER_REPORT: self._handle_planner_report,
        }

    # -- helpers ---------------------------------------------------------------------------
    def _ack(self, peer: bytes, command_id: str, ok: bool, message: str = "") -> list[Out]:
        self.state.counters["commands"] += 1
        level = logging.INFO if ok else logging.WARNING
        logger.log(level, "[command] %s %s: %s", command_id, "ok" if ok else "refused", message)
        return [Out(peer, Ack(command_id, ok, message[:500]))]

    def _target(self, peer: bytes, msg: Any, now: float) -> WorkerState | list[Out]:
        """The worker a command names, or the answer refusing the command."""
        if peer in self.state.workers:
            return self.state.bad_message(peer, f"a worker sent {msg.KIND.name}", now)
        worker = self.state.named(msg.worker) if msg.worker else None
        if worker is None:
            return self._ack(peer, msg.command_id, False, f"no live worker {msg.worker!r}")
        return worker

    # -- handlers --------------------------------------------------------------------------
    def _handle_load_stage(
        self, peer: bytes, msg: LoadStage, frames: Sequence[Any], now: float
    ) -> list[Out]:
        worker = self._target(peer, msg, now)
        if not isinstance(worker, WorkerState):
            return worker
        key = self.state.key_of(msg.model, msg.start, msg.end)
        if key is not None:
            worker.draining.pop(key, None)  # loading a stage being drained keeps it
        what = f"load {msg.model}:{msg.start}-{msg.end} on {worker.name}"
        fwd = LoadStage(msg.model, msg.start, msg.end, msg.max_batch_size)
        return [Out(worker.identity, fwd), *self._ack(peer, msg.command_id, True, what)]

    def _handle_unload_stage(
        self, peer: bytes, msg: UnloadStage, frames: Sequence[Any], now: float
    ) -> list[Out]:
        worker = self._target(peer, msg, now)
        if not isinstance(worker, WorkerState):
            return worker
        if msg.key not in worker.dtypes():  # (its stages' keys, kept until they change)
            return self._ack(peer, msg.command_id, False, f"{worker.name} has no stage {msg.key}")
        drain = msg.drain_s if msg.drain_s > 0 else self.state.cfg.unload_drain_s
        worker.draining.setdefault(msg.key, now + drain)
        return self._ack(peer, msg.command_id, True, f"draining {msg.key[:12]} on {worker.name}")

    def _handle_set_batch(
        self, peer: bytes, msg: SetBatch, frames: Sequence[Any], now: float
    ) -> list[Out]:
        worker = self._target(peer, msg, now)
        if not isinstance(worker, WorkerState):
            return worker
        if msg.key not in worker.stage_keys() or msg.max_batch_size < 1:
            text = f"{worker.name}: no stage {msg.key} or batch size {msg.max_batch_size} < 1"
            return self._ack(peer, msg.command_id, False, text)
        what = f"batch {msg.max_batch_size} for {msg.key[:12]} on {worker.name}"
        return [Out(worker.identity, msg), *self._ack(peer, msg.command_id, True, what)]

    def _handle_set_routes(
        self, peer: bytes, msg: SetRoutes, frames: Sequence[Any], now: float
    ) -> list[Out]:
        if peer in self.state.workers:
            return self.state.bad_message(peer, "a worker sent SET_ROUTES", now)
        # a model's routes equal to its last ones keep their tuple (what is kept per route,
        # rewire.PlannedKeys and the shown routes, stays) and, checked against the same
        # spec, are not checked again
        old, checked = self.state.preferred, self._checked
        preferred: dict[str, tuple[PlannedRoute, ...]] = {}
        for model, routes in msg.routes.items():
            if not routes:
                continue
            spec = self.state.models.get(model)
            kept, new = old.get(model), tuple(routes)
            if kept is not None and kept == new:
                preferred[model] = kept
                if checked.get(model) is spec:
                    continue
            for route in new if spec is not None else ():
                why = check_planned(route, spec.chain_len)
                if why is not None:
                    return self._ack(peer, msg.command_id, False, f"{model}: {why}")
            preferred.setdefault(model, new)
        self._checked = {m: self.state.models.get(m) for m in preferred}
        self.state.preferred = preferred
        self.state.routes_gen += 1
        self.state.waiting.wake_all()  # the routes the waiting requests would take changed
        if msg.move_running:
            self.state.move_gen = self.state.routes_gen
        n = sum(len(r) for r in self.state.preferred.values())
        return self._ack(
            peer, msg.command_id, True, f"{n} routes for {len(self.state.preferred)} models"
        )

    def _handle_set_chain(
        self, peer: bytes, msg: SetChain, frames: Sequence[Any], now: float
    ) -> list[Out]:
        if peer in self.state.workers:
            return self.state.bad_message(peer, "a worker sent SET_CHAIN", now)
        spec = self.state.models.get(msg.model)
        if spec is None:
            return self._ack(peer, msg.command_id, False, f"unknown model {msg.model!r}")
        if msg.chain and (
            len(msg.chain) != spec.chain_len or not all(BLOCK_ID.fullmatch(b) for b in msg.chain)
        ):
            text = f"a chain of {spec.chain_len} block ids expected for {msg.model}"
            return self._ack(peer, msg.command_id, False, text)
        self.state.set_chain(msg.model, tuple(msg.chain))
        n = len(self.state.substitutions(msg.model))
        return self._ack(peer, msg.command_id, True, f"{msg.model}: {n} blocks substituted")

    def _handle_reload(
        self, peer: bytes, msg: Reload, frames: Sequence[Any], now: float
    ) -> list[Out]:
        if peer in self.state.workers:
            return self.state.bad_message(peer, "a worker sent RELOAD", now)
        self.state.reload(now)
        for model in [m for m in self.state.chains if m not in self.state.models]:
            del self.state.chains[model]
        return self._ack(peer, msg.command_id, True, ",".join(sorted(self.state.models)))

    # -- draining ------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Out]:
        """UNLOAD_STAGE every drained stage no request uses any more (or whose time is up).

        Only the workers that may have one are looked at (`Registry.drains_to_check`): those
        whose drains changed, or one of whose stages being drained lost its last route
        (`BrokerState.using`), or whose earliest drain deadline passed; not every pending drain
        at every tick."""
        out: list[Out] = []
        workers = self.state.workers
        using = self.state.using
        for peer in workers.drains_to_check(now):
            w = workers.get(peer)
            if w is None or not w.draining:
                continue
            ended = [
                key
                for key, deadline in w.draining.items()
                if now >= deadline or using.get((peer, key), 0) <= 0
            ]
            for key in ended:
                del w.draining[key]
                logger.info("[rewire] unloading %s from %s", key[:12], w.name)
                out.append(Out(w.identity, UnloadStage(key)))
            if ended:
                gone = set(ended)
                w.stages = tuple(s for s in w.stages if s.key not in gone)  # its READY confirms
            if w.draining:  # still used: looked at again when unused or at the deadline
                workers.drain_timer(w, min(w.draining.values()))
        return out

    def _handle_planner_report(
        self, peer: bytes, msg: Any, _frames: Sequence[Any], now: float
    ) -> list[Out]:
        """The planner's view of uncovered models (STATUS `uncovered`); also its liveness."""
        if peer in self.state.workers:
            return self.state.bad_message(peer, "a worker sent PLANNER_REPORT", now)
        self.state.planner_notes = {str(k): str(v)[:300] for k, v in list(msg.notes.items())[:4096]}
        self.state.planner_seen = now
        return []
