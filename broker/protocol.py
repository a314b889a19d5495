"""THE wire schema of BlockLLM: every message type, the kind byte, error codes, the version.

A message on the wire is `[kind: 1 byte][header: msgpack array][tensor frames...]`. Each
message is a frozen dataclass encoded as the msgpack array of its fields in declaration order.
Fields are only ever appended, each new one with a default, so a shorter array from an older
peer decodes to the defaults. No pickle anywhere. Tensors are described by `TensorMeta` in the
header and travel as raw frames (see `frames.py`).

Peers: clients, workers and the planner are DEALERs connected to the broker's one ROUTER.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

PROTOCOL_VERSION = 1

# Upper bounds every decoder enforces (a hostile peer cannot make us allocate more).
MAX_HEADER_BYTES = 1 << 20
MAX_TENSOR_BYTES = 1 << 30
MAX_FRAMES = 16
# Log-probability alternatives one position may ask for (Generate.top_logprobs); with the
# prompt's log-probabilities at most MAX_PROMPT_TOP (they bound the first TOKEN's header)
MAX_TOP_LOGPROBS = 20
MAX_PROMPT_TOP = 5


class Kind(bytes, enum.Enum):
    """First frame of every message; one byte, dispatched without decoding the header."""

    # worker -> broker
    READY = b"R"
    RESULT = b"O"
    DEAD = b"D"
    # both ways between broker and worker (ping-pong liveness; carries load facts)
    HEARTBEAT = b"H"
    # broker -> worker
    FORWARD = b"F"
    RELEASE = b"C"
    LOAD_STAGE = b"L"
    UNLOAD_STAGE = b"U"
    # client -> broker
    GENERATE = b"G"
    CANCEL = b"X"
    STATUS_REQUEST = b"Q"
    # broker -> client
    TOKEN = b"T"
    STATUS = b"S"
    # anyone -> anyone
    ERROR = b"E"
    # planner (or an operator tool) -> broker: commands, each answered by an ACK
    SET_ROUTES = b"W"
    SET_BATCH = b"B"
    SET_CHAIN = b"A"
    RELOAD = b"Z"
    # broker -> planner: the answer to a command
    ACK = b"K"
    # broker PUB socket -> planner SUB: the periodic statistics snapshot
    STATS = b"Y"
    STATS_DELTA = b"y"
    # worker -> broker: read a chunk of the broker's zoo; broker -> worker: the chunk
    FETCH = b"N"
    BLOB = b"V"
    # KV migration (broker/migrate.py): broker -> old worker: export; old worker -> broker ->
    # new worker: the shard (its frames forwarded as received); new worker -> broker: the ack
    KV_EXPORT = b"M"
    KV_SHARD = b"J"
    KV_ACK = b"I"
    # speculative execution: broker -> worker, a decode step's input forwarded (frames as
    # received) to the hop after the one it is meant for, as that hop's predicted input
    SPECULATE = b"P"
    # planner -> broker: why each uncovered model is uncovered, as the planner sees it (also
    # its liveness for STATUS); not answered
    PLANNER_REPORT = b"r"


class ErrorCode(str, enum.Enum):
    """Typed error codes, end to end (client exceptions carry them)."""

    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    OVERLOADED = "OVERLOADED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    NO_ROUTE = "NO_ROUTE"
    WORKER_LOST = "WORKER_LOST"
    KV_MISS = "KV_MISS"
    CACHE_FULL = "CACHE_FULL"
    QUEUE_FULL = "QUEUE_FULL"
    UNKNOWN_STAGE = "UNKNOWN_STAGE"
    PROTOCOL_VERSION = "PROTOCOL_VERSION"
    INTERNAL = "INTERNAL"
    # the broker is stopping (drain over, or not admitting): retry on the next broker, resuming
    # from the tokens received, as after a lost connection (client/demux.py)
    SHUTTING_DOWN = "SHUTTING_DOWN"
    FORBIDDEN = "FORBIDDEN"  # the sender's key has no role that may send this kind


class ProtocolError(ValueError):
    """A message that cannot be decoded: unknown kind, bad header, wrong frame count or size."""


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Describes one tensor frame: dtype name (a torch dtype attribute) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StageRef:
    """A stage a worker hosts: content key, and which model positions [start, end) it covers."""

    key: str
    model: str
    start: int
    end: int
    nbytes: int = 0
    dtype: str = ""  # what the worker serves it in ("": not said; an older worker)


@dataclass(frozen=True, slots=True)
class KVGeometryUse:
    """One KV geometry of a worker's arena (worker/kv_cache.py): its label (`<kv heads>x<head
    dim>/<dtype>`), tokens per page, bytes in use, sequences and stages holding it."""

    label: str
    page_size: int = 0
    used_bytes: int = 0
    sequences: int = 0
    stages: int = 0
    page_bytes: int = 0  # what one page costs (the same for every geometry of the arena)


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker -> broker after start-up (and after every reconnect): the facts it serves with."""

    KIND: ClassVar[Kind] = Kind.READY
    protocol_version: int
    name: str
    pid: int
    host: str
    device: str
    stages: tuple[StageRef, ...] = ()
    kv_total_bytes: int = 0
    kv_free_bytes: int = 0
    max_batch_size: int = 0
    free_slots: int = 0
    # weights + KV the worker may use (0: not limited by the worker; the planner's default)
    memory_budget_bytes: int = 0
    # block ids this worker cannot get (fetched corrupt from its source): the planner places
    # stages holding them elsewhere
    refused_blocks: tuple[str, ...] = ()
    # keys of the stages its operator configured (`blockllm worker --stage`): pins the planner
    # keeps while the worker lives (docs/internals.md, Planner)
    pinned: tuple[str, ...] = ()
    kv_geometries: tuple[KVGeometryUse, ...] = ()  # the KV arena's share per geometry


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Ping-pong liveness. From a worker it carries its load facts; from the broker, nothing."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT
    kv_free_bytes: int = 0
    free_slots: int = 0
    queue_depths: dict[str, int] = field(default_factory=dict)
    rss_bytes: int = 0
    steps: int = 0
    step_ms_p50: float = 0.0
    step_ms_p95: float = 0.0
    mean_batch: float = 0.0
    # distinct block bytes held; per stage key: max batch size now, mean batch lately
    weight_bytes: int = 0
    stage_batch_limits: dict[str, int] = field(default_factory=dict)
    stage_mean_batch: dict[str, float] = field(default_factory=dict)
    # per stage key: ms per batched forward lately (with stage_mean_batch: its batch curve)
    stage_step_ms: dict[str, float] = field(default_factory=dict)
    # speculative execution (worker/speculate.py): runs started, real inputs answered from a
    # kept run, real inputs out of tolerance (the hop reran)
    speculated: int = 0
    accepted: int = 0
    rejected: int = 0
    # per stage key: LoRA adapter blocks resident for its decoder layers (worker/lora.py)
    stage_adapters: dict[str, int] = field(default_factory=dict)
    kv_geometries: tuple[KVGeometryUse, ...] = ()  # the KV arena's share per geometry
    # cumulative seconds and counts of the phases its decode items passed (broker/timings.py)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Dead:
    """Worker -> broker: 'I am exiting' (fatal error or shutdown); fail my requests now."""

    KIND: ClassVar[Kind] = Kind.DEAD
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Forward:
    """Broker -> worker: run `stage_keys` (in order) for one request's new positions.

    Tensor 0 is the input: int64 token ids [T] when the first stage starts with the embedding,
    else the hidden states [T, D]. `past_len` positions are already in the worker's KV.
    """

    KIND: ClassVar[Kind] = Kind.FORWARD
    request_id: str
    step: int
    stage_keys: tuple[str, ...]
    past_len: int
    max_total_len: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    tensors: tuple[TensorMeta, ...] = ()
    # head stage only: top-k alternatives of the sampled token (0: none), and the prompt's
    # tokens 1..T-1 whose log-probabilities to return (a prefill; worker/logprobs.py)
    top_logprobs: int = 0
    targets: tuple[int, ...] = ()
    # a LoRA adapter's request: its adapter block per chain position of these stages (the
    # positions where it changes the layer; worker/lora.py), as two parallel arrays
    adapter_positions: tuple[int, ...] = ()
    adapter_blocks: tuple[str, ...] = ()
    # hops of the request's route (0: not told): the worker keeps about this many groups of
    # its running requests in flight (worker/groups.py)
    hops: int = 0


@dataclass(frozen=True, slots=True)
class Result:
    """Worker -> broker: the output of one Forward: a hidden-state tensor, or a sampled token."""

    KIND: ClassVar[Kind] = Kind.RESULT
    request_id: str
    step: int
    token_id: int = -1
    logprob: float = 0.0
    tensors: tuple[TensorMeta, ...] = ()
    # asked for by Forward.top_logprobs / targets: the sampled token's alternatives (ids and
    # logprobs, most likely first), the targets' logprobs, and per target position its
    # top_logprobs alternatives, flattened (len(prompt_logprobs) * top_logprobs each)
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    prompt_logprobs: tuple[float, ...] = ()
    prompt_top_ids: tuple[int, ...] = ()
    prompt_top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Release:
    """Broker -> worker: the request is over (or moved); free its KV in every stage."""

    KIND: ClassVar[Kind] = Kind.RELEASE
    request_id: str


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
class Generate:
    """Client -> broker: generate for `prompt` (text) or `input_ids`; tokens stream back."""

    KIND: ClassVar[Kind] = Kind.GENERATE
    request_id: str
    model: str
    prompt: str | None = None
    input_ids: tuple[int, ...] | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    timeout_s: float = 0.0
    resume_ids: tuple[int, ...] = ()
    # log-probabilities (the model's own, before temperature/filtering): every TOKEN carries
    # its logprob; `top_logprobs` alternatives per position (0..20); `prompt_logprobs`: the
    # first TOKEN also carries the prompt's (positions 1..T-1; then top_logprobs <= 5)
    top_logprobs: int = 0
    prompt_logprobs: bool = False


@dataclass(frozen=True, slots=True)
class Cancel:
    """Client -> broker: stop this request (its KV is freed)."""

    KIND: ClassVar[Kind] = Kind.CANCEL
    request_id: str


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
class Token:
    """Broker -> client: one generated token of a request, with its incremental text."""

    KIND: ClassVar[Kind] = Kind.TOKEN
    request_id: str
    index: int
    token_id: int
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    # see Generate.top_logprobs / prompt_logprobs (the prompt's only in the first TOKEN); the
    # alternatives are flattened as in Result
    logprob: float = 0.0
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    prompt_logprobs: tuple[float, ...] = ()
    prompt_top_ids: tuple[int, ...] = ()
    prompt_top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Status:
    """Broker -> client: `{"workers": [...], "models": {...}, ...}` as a msgpack map."""

    KIND: ClassVar[Kind] = Kind.STATUS
    request_id: str
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Error:
    """A typed failure of one request (or of a peer's message when request_id is empty)."""

    KIND: ClassVar[Kind] = Kind.ERROR
    request_id: str
    code: str
    message: str
    retryable: bool = False
    step: int = -1


@dataclass(frozen=True, slots=True)
class PlannedHop:
    """One hop of a planned route: a worker (by name) and the chain spans it runs."""

    worker: str
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class PlannedRoute:
    """A route the planner prefers for a model; requests spread over routes by `weight`."""

    hops: tuple[PlannedHop, ...]
    weight: float = 1.0


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
    """Broker PUB -> planner: a statistics snapshot (see broker/stats.py for `body`). A body
    past the header bound travels in `parts` messages of the same `seq` (broker/stats_delta.py):
    each has a share of the "workers" and "models", part 0 also the rest of the body."""

    KIND: ClassVar[Kind] = Kind.STATS
    seq: int
    body: dict[str, Any] = field(default_factory=dict)
    part: int = 0
    parts: int = 1


@dataclass(frozen=True, slots=True)
class StatsDelta:
    """Broker PUB -> planner: a STATS body as what changed since the full STATS `base`
    (broker/stats_delta.py): per worker / model name, the fields that differ (the whole entry
    for names in `whole_*`: new, or a field went), the names gone, the names' order when it is
    not the base's with the gone ones left out and the new ones last, and the top-level
    `summary` (every body key but "workers" and "models"). A planner that predates it skips
    it as an unknown kind and plans from the full STATS alone."""

    KIND: ClassVar[Kind] = Kind.STATS_DELTA
    seq: int
    base: int
    workers: dict[str, Any] = field(default_factory=dict)
    whole_workers: tuple[str, ...] = ()
    gone_workers: tuple[str, ...] = ()
    worker_order: tuple[str, ...] = ()
    models: dict[str, Any] = field(default_factory=dict)
    whole_models: tuple[str, ...] = ()
    gone_models: tuple[str, ...] = ()
    model_order: tuple[str, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fetch:
    """Worker -> broker: bytes [offset, offset + length) of a zoo object the worker lacks.

    `what` is "manifest" (name = model name) or "block" (name = block id). Answered by a BLOB,
    or by an ERROR (UNKNOWN_MODEL / BAD_REQUEST) carrying `request_id`.
    """

    KIND: ClassVar[Kind] = Kind.FETCH
    request_id: str
    what: str
    name: str
    offset: int = 0
    length: int = 0  # 0 -> the broker's chunk size; larger is capped to it


@dataclass(frozen=True, slots=True)
class Blob:
    """Broker -> worker: one chunk of a zoo object; the bytes are one uint8 frame (tensors[0]).

    `total` is the object's whole size; the fetcher asks for the next offset until it has all.
    """

    KIND: ClassVar[Kind] = Kind.BLOB
    request_id: str
    what: str
    name: str
    offset: int
    total: int
    tensors: tuple[TensorMeta, ...] = ()


@dataclass(frozen=True, slots=True)
class KvExport:
    """Broker -> worker: send the KV of `request_id` in stage `stage_key`, positions
    [0, length), as a KV_SHARD (all layers of the stage); refused with a KV_ACK(ok=False)."""

    KIND: ClassVar[Kind] = Kind.KV_EXPORT
    transfer_id: int
    request_id: str
    stage_key: str
    length: int


@dataclass(frozen=True, slots=True)
class KvShard:
    """Worker -> broker (an export), then broker -> worker (an import, the same frames): K and
    V of one request in one stage, each `[n_layers, length, n_kv_heads, head_dim]`. The
    importer reserves pages for `max_total_len` tokens and answers a KV_ACK."""

    KIND: ClassVar[Kind] = Kind.KV_SHARD
    transfer_id: int
    request_id: str
    stage_key: str
    length: int
    max_total_len: int = 0
    tensors: tuple[TensorMeta, ...] = ()


@dataclass(frozen=True, slots=True)
class KvAck:
    """Worker -> broker: an import done (ok) or an export/import refused (`code`: KV_MISS,
    CACHE_FULL, UNKNOWN_STAGE, BAD_REQUEST)."""

    KIND: ClassVar[Kind] = Kind.KV_ACK
    transfer_id: int
    request_id: str
    stage_key: str
    ok: bool
    code: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class Speculate:
    """Broker -> worker: run `stage_keys` for one decode step on a *predicted* input (tensor 0,
    hidden states [1, D]: the previous hop's input, its frames as received) and keep the result;
    the real FORWARD of that step is answered from it when its input is within `tolerance`
    (relative L2 distance) of the prediction. Never answered itself; RELEASE forgets it."""

    KIND: ClassVar[Kind] = Kind.SPECULATE
    request_id: str
    step: int
    stage_keys: tuple[str, ...]
    past_len: int
    max_total_len: int
    tolerance: float = 0.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    tensors: tuple[TensorMeta, ...] = ()
    top_logprobs: int = 0  # as Forward.top_logprobs (a kept run answers the real FORWARD)


@dataclass(frozen=True, slots=True)
class PlannerReport:
    """Planner -> broker, after STATS snapshots (at least every few seconds): for each model
    the planner sees uncovered, why (STATUS `models[m].uncovered`). Not answered."""

    KIND: ClassVar[Kind] = Kind.PLANNER_REPORT
    notes: dict[str, str] = field(default_factory=dict)


Message = (
    Ready
    | Heartbeat
    | Dead
    | Forward
    | Result
    | Release
    | LoadStage
    | UnloadStage
    | Generate
    | Cancel
    | StatusRequest
    | Token
    | Status
    | Error
    | SetRoutes
    | SetBatch
    | SetChain
    | Reload
    | Ack
    | Stats
    | StatsDelta
    | Fetch
    | Blob
    | KvExport
    | KvShard
    | KvAck
    | Speculate
    | PlannerReport
)

MESSAGES: dict[Kind, type] = {cls.KIND: cls for cls in typing.get_args(Message)}

# Commands a planner (any peer that is not a worker) may send the broker.
_COMMANDS = ("LOAD_STAGE", "UNLOAD_STAGE", "SET_ROUTES", "SET_BATCH", "SET_CHAIN", "RELOAD")
COMMAND_KINDS = frozenset(Kind[name] for name in _COMMANDS)

# What each key role may send the broker (broker/security.py: roles; the broker refuses the
# rest with ERROR(FORBIDDEN)). A client may FETCH manifests and tokenizers, not blocks.
_WORKER = ("READY", "HEARTBEAT", "DEAD", "RESULT", "ERROR", "KV_SHARD", "KV_ACK", "FETCH")
_CLIENT = ("GENERATE", "CANCEL", "STATUS_REQUEST", "FETCH")
ROLE_KINDS: dict[str, frozenset[Kind]] = {
    "worker": frozenset(Kind[name] for name in _WORKER),
    "planner": COMMAND_KINDS | {Kind.STATUS_REQUEST, Kind.FETCH, Kind.PLANNER_REPORT},
    "client": frozenset(Kind[name] for name in _CLIENT),
}

# Messages whose header carries `tensors: tuple[TensorMeta, ...]` (the only ones with frames).
TENSOR_KINDS = frozenset({Kind.FORWARD, Kind.RESULT, Kind.BLOB, Kind.KV_SHARD, Kind.SPECULATE})
