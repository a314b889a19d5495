"""Control messages: stage loads and unloads, the planner's commands and their ACKs, STATUS
(client <-> broker) and STATS (broker -> planner), whose bodies are in bodies.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from blockllm.broker.protocol.bodies import PlannedRoute, StatsBody, StatusBody
from blockllm.broker.protocol.kinds import Kind


@dataclass(frozen=True, slots=True)
class LoadStage:
    """Broker/planner -> worker: host positions [start, end) of `model` (answered by READY).

    From a planner, `worker` names the target worker: the broker forwards the command to it
    and answers the planner with an ACK carrying `command_id`.
    """

    KIND: ClassVar[Kind] = Kind.LOAD_STAGE
    model: str
    start: int
    end: int
    max_batch_size: int = 0
    worker: str = ""
    command_id: str = ""


@dataclass(frozen=True, slots=True)
class UnloadStage:
    """Broker/planner -> worker: drain then drop a stage (answered by READY).

    From a planner, `worker` names the target: the broker stops routing new requests through
    the stage, moves running ones off it at their next step where it can, and forwards the
    command once no request uses the stage (or after `drain_s`, 0 = the broker's default).
    """

    KIND: ClassVar[Kind] = Kind.UNLOAD_STAGE
    key: str
    worker: str = ""
    command_id: str = ""
    drain_s: float = 0.0


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Client -> broker: ask for the cluster status."""

    KIND: ClassVar[Kind] = Kind.STATUS_REQUEST
    request_id: str = ""
    # filters ("" = all): one model and the workers serving it; one worker and its models
    model: str = ""
    worker: str = ""
    # one page of the (filtered) lists: entries [offset, offset + limit) of the workers and
    # of the models; limit 0 (or more than the broker's page) = the broker's page size, so one
    # STATUS stays bounded (body "page": {"offset", "limit", "next"}; next 0: the last page)
    offset: int = 0
    limit: int = 0


@dataclass(frozen=True, slots=True)
class Status:
    """Broker -> client: the cluster status (bodies.py StatusBody; broker/status.py)."""

    KIND: ClassVar[Kind] = Kind.STATUS
    request_id: str
    body: StatusBody = field(default_factory=StatusBody)


@dataclass(frozen=True, slots=True)
class SetRoutes:
    """Planner -> broker: preferred routes per model (replacing all earlier ones).

    Applied when a request is routed (start, replay) and, with `move_running`, at a running
    request's next step when its route is not one of its model's preferred routes: it moves by
    a replay (prefill of prompt + generated tokens) onto a preferred route, between tokens.
    A preferred route that is not hosted (or has no credit) now is skipped; with none left the
    broker routes by itself. A model absent from `routes` has no preference.
    """

    KIND: ClassVar[Kind] = Kind.SET_ROUTES
    command_id: str
    routes: dict[str, tuple[PlannedRoute, ...]] = field(default_factory=dict)
    move_running: bool = False


@dataclass(frozen=True, slots=True)
class SetBatch:
    """Planner -> broker -> worker: the max batch size of one stage (key) of `worker`."""

    KIND: ClassVar[Kind] = Kind.SET_BATCH
    command_id: str
    worker: str
    key: str
    max_batch_size: int


@dataclass(frozen=True, slots=True)
class SetChain:
    """Planner -> broker: serve `model` with `chain` (block ids; () = its own chain).

    Adaptive chain assembly: blocks the planner substituted with equivalent ones (within the
    model's tolerance) that other models' stages already host. Routing matches stage keys
    computed over this chain; running requests keep the route they have.
    """

    KIND: ClassVar[Kind] = Kind.SET_CHAIN
    command_id: str
    model: str
    chain: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reload:
    """Operator/planner -> broker: re-read the zoo's models now (answered by an ACK)."""

    KIND: ClassVar[Kind] = Kind.RELOAD
    command_id: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    """Broker -> the sender of a command: done (or forwarded), or why not."""

    KIND: ClassVar[Kind] = Kind.ACK
    command_id: str
    ok: bool
    message: str = ""


@dataclass(frozen=True, slots=True)
class Stats:
    """Broker PUB -> planner: a statistics snapshot (bodies.py StatsBody; broker/stats.py).
    A body past the header bound travels in `parts` messages of the same `seq`
    (broker/stats_delta.py): each has a share of the workers and models, part 0 also the
    rest of the body."""

    KIND: ClassVar[Kind] = Kind.STATS
    seq: int
    body: StatsBody = field(default_factory=StatsBody)
    part: int = 0
    parts: int = 1


@dataclass(frozen=True, slots=True)
class StatsDelta:
    """Broker PUB -> planner: a STATS body as what changed since the full STATS `base`
    (broker/stats_delta.py): per worker / model name, the fields of its entry (WorkerStatus,
    ModelStats) that differ, by field name, as on the wire (every field for the names in
    `whole_*`: new since the base); the names gone; the names' order when it is not the
    base's with the gone ones left out and the new ones last; and `summary`, the body with
    empty lists. Decoding (StatsView.apply) yields typed entries again. A planner that
    predates it skips it as an unknown kind and plans from the full STATS alone."""

    KIND: ClassVar[Kind] = Kind.STATS_DELTA
    seq: int
    base: int
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    whole_workers: tuple[str, ...] = ()
    gone_workers: tuple[str, ...] = ()
    worker_order: tuple[str, ...] = ()
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    whole_models: tuple[str, ...] = ()
    gone_models: tuple[str, ...] = ()
    model_order: tuple[str, ...] = ()
    summary: StatsBody = field(default_factory=StatsBody)


@dataclass(frozen=True, slots=True)
class PlannerReport:
    """Planner -> broker, after STATS snapshots (at least every few seconds): for each model
    the planner sees uncovered, why (STATUS `models[m].uncovered`). Not answered."""

    KIND: ClassVar[Kind] = Kind.PLANNER_REPORT
    notes: dict[str, str] = field(default_factory=dict)
