"""THE wire schema of BlockLLM: every message type, the kind byte, error codes, the version.

A message on the wire is `[kind: 1 byte][header: msgpack array][tensor frames...]`. Each
message is a frozen dataclass encoded as the msgpack array of its fields in declaration order.
Fields are only ever appended, each new one with a default, so a shorter array from an older
peer decodes to the defaults. No pickle anywhere. Tensors are described by `TensorMeta` in the
header and travel as raw frames (see `frames.py`).

Peers: clients, workers and the planner are DEALERs connected to the broker's one ROUTER.

One namespace (`from blockllm.broker.protocol import X`), defined by topic in: `kinds.py`
(version, bounds, Kind, ErrorCode, ProtocolError), `data.py` (the data path's messages),
`control.py` (commands, ACK, STATUS, STATS), `bodies.py` (the STATUS and STATS bodies and
the planned routes); the message union and the kind sets are here.
"""

from __future__ import annotations

import typing

from blockllm.broker.protocol.bodies import (
    ModelStats,
    ModelStatus,
    PlannedHop,
    PlannedRoute,
    RequestCounts,
    SpeculationCounts,
    StatsBody,
    StatusBody,
    StatusPage,
    Substitution,
    Totals,
    WorkerStatus,
    plain,
)
from blockllm.broker.protocol.control import (
    Ack,
    LoadStage,
    PlannerReport,
    Reload,
    SetBatch,
    SetChain,
    SetRoutes,
    Stats,
    StatsDelta,
    Status,
    StatusRequest,
    UnloadStage,
)
from blockllm.broker.protocol.data import (
    Blob,
    Cancel,
    Dead,
    Error,
    Fetch,
    Forward,
    Generate,
    Heartbeat,
    KvAck,
    KvExport,
    KVGeometryUse,
    KvShard,
    Ready,
    Release,
    Result,
    Speculate,
    StageRef,
    TensorMeta,
    Token,
)
from blockllm.broker.protocol.kinds import (
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_PROMPT_TOP,
    MAX_TENSOR_BYTES,
    MAX_TOP_LOGPROBS,
    PROTOCOL_VERSION,
    ErrorCode,
    Kind,
    ProtocolError,
)

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

__all__ = [
    "COMMAND_KINDS",
    "MAX_FRAMES",
    "MAX_HEADER_BYTES",
    "MAX_PROMPT_TOP",
    "MAX_TENSOR_BYTES",
    "MAX_TOP_LOGPROBS",
    "MESSAGES",
    "PROTOCOL_VERSION",
    "ROLE_KINDS",
    "TENSOR_KINDS",
    "Ack",
    "Blob",
    "Cancel",
    "Dead",
    "Error",
    "ErrorCode",
    "Fetch",
    "Forward",
    "Generate",
    "Heartbeat",
    "KVGeometryUse",
    "Kind",
    "KvAck",
    "KvExport",
    "KvShard",
    "LoadStage",
    "Message",
    "ModelStats",
    "ModelStatus",
    "PlannedHop",
    "PlannedRoute",
    "PlannerReport",
    "ProtocolError",
    "Ready",
    "Release",
    "Reload",
    "RequestCounts",
    "Result",
    "SetBatch",
    "SetChain",
    "SetRoutes",
    "Speculate",
    "SpeculationCounts",
    "StageRef",
    "Stats",
    "StatsBody",
    "StatsDelta",
    "Status",
    "StatusBody",
    "StatusPage",
    "StatusRequest",
    "Substitution",
    "TensorMeta",
    "Token",
    "Totals",
    "UnloadStage",
    "WorkerStatus",
    "plain",
]
