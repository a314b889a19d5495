"""The protocol's constants: the version, the decoders' bounds, the kind byte, error codes."""

from __future__ import annotations

import enum

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
