"""Encode and decode protocol messages to and from ZeroMQ frames: the only place bytes are touched.

`encode(msg, tensors)` -> `[kind, header, *tensor frames]`; `decode(frames)` validates
everything (kind known, header a msgpack array of the right field types, frame count, tensor
byte sizes) and raises `ProtocolError` otherwise. Tensors are sent as zero-copy `uint8` views
(bf16-safe) and received as zero-copy views of the frame: treat them as read-only and copy them
to the device promptly (a live view pins the whole zmq message).

torch is imported only where tensors are touched (`tensor_frame`, `tensor_from_frame`,
`decode`, `encode` with tensors): a text-in/text-out client and the broker's envelope path
(`decode_header`, `encode_passthrough`, `tensor_nbytes`) never load it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from blockllm.broker.protocol import (
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_TENSOR_BYTES,
    MESSAGES,
    TENSOR_KINDS,
    Kind,
    Message,
    ProtocolError,
    TensorMeta,
)

if TYPE_CHECKING:
    import torch

# Received frames are read-only buffers; the tensors aliasing them are never written to.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

# The dtypes a frame may carry (torch dtype names) and their item sizes in bytes.
ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
}

Buffer = bytes | memoryview


def meta_of(t: torch.Tensor) -> TensorMeta:
    """The header description of a tensor."""
    return TensorMeta(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape))


def tensor_frame(t: torch.Tensor) -> memoryview:
    """Raw bytes of a CPU tensor as a zero-copy view; bf16-safe (reinterpret as uint8).

    The caller keeps `t` alive and unmodified until zmq has sent it.
    """
    import torch

    if t.device.type != "cpu":
        raise ValueError("frame tensors from CPU memory; copy off the accelerator first")
    flat = t.detach().contiguous().reshape(-1)  # 0-dim and N-dim alike -> [numel]
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_from_frame(buf: Buffer, meta: TensorMeta) -> torch.Tensor:
    """Zero-copy, read-only view of a received frame as a tensor described by `meta`."""
    import torch

    dtype = getattr(torch, meta.dtype)
    if len(buf) == 0:  # torch.frombuffer rejects empty buffers
        return torch.empty(meta.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(meta.shape)


_PLAIN = frozenset({str, int, float, bool, bytes, type(None)})
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # per dataclass: its fields, in order


def to_wire(value: Any) -> Any:
    """Dataclasses become arrays of their fields; tuples lists; enums their values."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    names = _FIELD_NAMES.get(kind)
    if names is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES[kind] = tuple(f.name for f in dataclasses.fields(value))
    if names is not None:
        return [to_wire(getattr(value, n)) for n in names]
    if isinstance(value, (tuple, list)):
        return [to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def encode(msg: Message, tensors: Sequence[torch.Tensor] = ()) -> list[Buffer]:
    """Frames for `msg` (and its tensors, whose metas must already be in `msg.tensors`)."""
    metas = getattr(msg, "tensors", ())
    if len(metas) != len(tensors):
        raise ValueError(f"{type(msg).__name__} describes {len(metas)} tensors, got {len(tensors)}")
    header = msgpack.packb(to_wire(msg), use_bin_type=True)
    return [msg.KIND.value, header, *(tensor_frame(t) for t in tensors)]


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ProtocolError(what)


def _converter(tp: Any) -> Callable[[Any], Any]:
    """A validating converter from a msgpack value to the annotated field type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return lambda v: v
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        conv = _converter(inner[0])
        return lambda v: None if v is None else conv(v)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        items = [_converter(a) for a in args]  # a fixed-size tuple: tuple[int, int]

        def conv_fixed(v: Any) -> tuple:
            _check(isinstance(v, list) and len(v) == len(items), f"expected {len(items)} items")
            return tuple(conv(x) for conv, x in zip(items, v, strict=True))

        return conv_fixed
    if origin is tuple:
        item = _converter(args[0])

        def conv_tuple(v: Any) -> tuple:
            _check(isinstance(v, list), f"expected array, got {type(v).__name__}")
            return tuple(item(x) for x in v)

        return conv_tuple
    if origin is dict:
        key, val = _converter(args[0]), _converter(args[1])

        def conv_dict(v: Any) -> dict:
            _check(isinstance(v, dict), f"expected map, got {type(v).__name__}")
            return {key(k): val(x) for k, x in v.items()}

        return conv_dict
    if dataclasses.is_dataclass(tp):
        return functools.partial(_build, tp)
    if tp is float:

        def conv_float(v: Any) -> float:
            _check(isinstance(v, (int, float)) and not isinstance(v, bool), "expected number")
            return float(v)

        return conv_float
    if tp in (int, str, bool, bytes):

        def conv_plain(v: Any) -> Any:
            ok = isinstance(v, tp) and (tp is bool or not isinstance(v, bool))
            _check(ok, f"expected {tp.__name__}, got {type(v).__name__}")
            return v

        return conv_plain
    raise TypeError(f"no wire converter for {tp!r}")


@functools.cache
def _field_converters(cls: type) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _converter(hints[f.name])) for f in dataclasses.fields(cls))


def _build(cls: type, values: Any) -> Any:
    """cls(*values) with each value validated; a shorter array keeps the defaults (old peer),
    a longer one drops the fields this side does not know yet (newer peer)."""
    _check(isinstance(values, list), f"{cls.__name__}: header is not an array")
    convs = _field_converters(cls)
    required = sum(
        1
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    _check(len(values) >= required, f"{cls.__name__}: {len(values)} fields < {required} required")
    try:
        return cls(*(conv(v) for (_name, conv), v in zip(convs, values, strict=False)))
    except ProtocolError as e:
        raise ProtocolError(f"{cls.__name__}: {e}") from None


def from_fields(cls: type, fields: Any, base: Any = None) -> Any:
    """A `cls` from wire values by field name (a STATS_DELTA's entries): `base`'s fields (or
    the defaults) with `fields` applied, each validated; a name this side does not know is
    dropped (a newer peer). ProtocolError for a malformed value or a required field missing."""
    _check(isinstance(fields, dict), f"{cls.__name__}: fields are not a map")
    convs = dict(_field_converters(cls))
    try:
        values = {k: convs[k](v) for k, v in fields.items() if k in convs}
    except ProtocolError as e:
        raise ProtocolError(f"{cls.__name__}: {e}") from None
    if base is not None:
        return dataclasses.replace(base, **values)
    try:
        return cls(**values)
    except TypeError:
        raise ProtocolError(f"{cls.__name__}: a required field is missing") from None


def peek_kind(frame: Buffer) -> Kind:
    """The message kind of a first frame, without decoding anything else."""
    raw = bytes(frame)
    try:
        return Kind(raw)
    except ValueError:
        raise ProtocolError(f"unknown message kind {raw[:8]!r}") from None


def decode_header(frames: Sequence[Any]) -> Message:
    """Validate and decode kind + header only (the broker's view: tensor frames untouched)."""
    _check(2 <= len(frames) <= MAX_FRAMES, f"bad frame count {len(frames)}")
    kind = peek_kind(_buf(frames[0]))
    raw = _buf(frames[1])
    _check(len(raw) <= MAX_HEADER_BYTES, "header too large")
    try:
        values = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not msgpack: {e}") from None
    msg = _build(MESSAGES[kind], values)
    n_tensors = len(msg.tensors) if kind in TENSOR_KINDS else 0
    _check(
        len(frames) == 2 + n_tensors,
        f"{kind.name}: {len(frames) - 2} frames, header says {n_tensors}",
    )
    for meta in msg.tensors if kind in TENSOR_KINDS else ():
        check_meta(meta)
    return msg


def check_meta(meta: TensorMeta) -> None:
    """ProtocolError unless `meta` is a tensor we can hold: a known dtype, at most 8 dims, and
    at most MAX_TENSOR_BYTES counting every dimension as at least 1. So a zero dimension
    beside huge ones (0 bytes: it passes the size checks) is refused too, and every stride
    (a product of dimensions) stays bounded."""
    _check(meta.dtype in ITEMSIZE, f"unsupported dtype {meta.dtype!r}")
    _check(len(meta.shape) <= 8 and all(d >= 0 for d in meta.shape), "bad tensor shape")
    span = math.prod(max(d, 1) for d in meta.shape) * ITEMSIZE[meta.dtype]
    _check(span <= MAX_TENSOR_BYTES, f"tensor shape {meta.shape} too large")


def _buf(frame: Any) -> Buffer:
    return frame.buffer if hasattr(frame, "buffer") else frame


def tensor_nbytes(meta: TensorMeta) -> int:
    return math.prod(meta.shape) * ITEMSIZE[meta.dtype]


def decode(frames: Sequence[Any]) -> tuple[Message, list[torch.Tensor]]:
    """Decode a whole message (kind, header, tensors as zero-copy views); ProtocolError if bad."""
    msg = decode_header(frames)
    metas = msg.tensors if msg.KIND in TENSOR_KINDS else ()
    tensors = []
    for meta, frame in zip(metas, frames[2:], strict=True):
        buf = _buf(frame)
        want = tensor_nbytes(meta)
        _check(want <= MAX_TENSOR_BYTES, "tensor too large")
        _check(len(buf) == want, f"tensor frame has {len(buf)} bytes, header says {want}")
        tensors.append(tensor_from_frame(buf, meta))
    return msg, tensors


def encode_passthrough(msg: Message, tensor_frames: Sequence[Any]) -> list[Any]:
    """Frames for `msg` whose tensor frames are passed on as received (the broker forwards the
    `zmq.Frame` objects of a RESULT as the next FORWARD's input: never decoded, never copied).

    `msg.tensors` must describe them (the header's metas travel with the frames unchanged).
    """
    metas = getattr(msg, "tensors", ())
    if len(metas) != len(tensor_frames):
        n = len(tensor_frames)
        raise ValueError(f"{type(msg).__name__} describes {len(metas)} tensors, got {n} frames")
    header = msgpack.packb(to_wire(msg), use_bin_type=True)
    return [msg.KIND.value, header, *tensor_frames]
