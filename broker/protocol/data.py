"""The data path's messages: workers registering and reporting, the forward/result hops of a
request, client requests and tokens, zoo fetches, KV migration, speculation; and the entries
they carry (TensorMeta, StageRef, KVGeometryUse)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from blockllm.broker.protocol.kinds import Kind


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
class Error:
    """A typed failure of one request (or of a peer's message when request_id is empty)."""

    KIND: ClassVar[Kind] = Kind.ERROR
    request_id: str
    code: str
    message: str
    retryable: bool = False
    step: int = -1


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
