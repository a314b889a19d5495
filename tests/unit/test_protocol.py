"""Round-trip every message; old/new peers; malformed input raises ProtocolError, never crashes."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import torch

from blockllm.broker import frames, protocol
from blockllm.broker.protocol import (
    MESSAGES,
    Error,
    Forward,
    Generate,
    Heartbeat,
    Kind,
    ProtocolError,
    Ready,
    Result,
    StageRef,
    Status,
    Token,
)

SAMPLES = [
    Ready(1, "w0", 123, "host", "cpu", (StageRef("k1", "base", 0, 3, 10),), 100, 50, 8, 4),
    Heartbeat(10, 2, {"k1": 3}, 1000, 5, 1.5, 2.5, 3.0),
    protocol.Dead("boom"),
    Forward("r1", 3, ("k1", "k2"), 7, 64, 0.7, 40, 0.9, 11, (frames.meta_of(torch.zeros(2, 4)),)),
    Result("r1", 3, 42, -0.5),
    protocol.Release("r1"),
    protocol.LoadStage("base", 0, 5, 16),
    protocol.UnloadStage("k1"),
    Generate("r2", "base", "hello", None, 8, 0.0, 0, 1.0, 0, 30.0, (1, 2)),
    Generate("r3", "base", None, (1, 2, 3)),
    protocol.Cancel("r2"),
    protocol.StatusRequest("s1"),
    Token("r2", 0, 5, "he", None, 3),
    Status("s1", protocol.StatusBody((protocol.WorkerStatus("w0", pid=1),))),
    Error("r2", "BAD_REQUEST", "nope", False, 3),
    Ready(1, "w0", 1, "h", "cpu", (), 100, 50, 8, 4, 1 << 30),
    Heartbeat(10, 2, {"k1": 3}, 1000, 5, 1.5, 2.5, 3.0, 77, {"k1": 8}, {"k1": 2.5}),
    protocol.LoadStage("base", 0, 5, 16, "w1", "c1"),
    protocol.UnloadStage("k1", "w1", "c2", 3.0),
    protocol.SetRoutes(
        "c3",
        {
            "base": (
                protocol.PlannedRoute(
                    (
                        protocol.PlannedHop("w0", ((0, 3),)),
                        protocol.PlannedHop("w1", ((3, 4), (4, 6))),
                    ),
                    2.0,
                ),
            )
        },
        True,
    ),
    protocol.SetBatch("c4", "w0", "k1", 8),
    protocol.SetChain("c5", "ft", ("a" * 64, "b" * 64)),
    protocol.Reload("c6"),
    protocol.PlannerReport({"m": "no worker has room for it"}),
    protocol.Ack("c6", True, "3 models"),
    protocol.Stats(7, protocol.StatsBody(models={"base": protocol.ModelStats(rate_rps=1.5)})),
    protocol.StatsDelta(
        8, 7, {"w0": {"steps": 3}}, (), ("w1",), (), {"base": {"rate_rps": 2.0}}, (), (), ()
    ),
    protocol.Fetch("f1", "block", "a" * 64, 4 << 20, 1 << 20),
    protocol.Blob("f1", "block", "a" * 64, 0, 32, (frames.meta_of(torch.zeros(2, 4)),)),
    protocol.KvExport(9, "b1", "k1", 12),
    protocol.KvShard(9, "b1", "k1", 12, 40, (frames.meta_of(torch.zeros(2, 4)),)),
    protocol.KvAck(9, "b1", "k1", False, "CACHE_FULL", "no room"),
    protocol.Speculate(
        "r1", 3, ("k2",), 7, 64, 0.1, 0.7, 40, 0.9, 5, (frames.meta_of(torch.zeros(2, 4)),)
    ),
]


def test_every_kind_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg) -> None:
    tensors = [torch.zeros(2, 4)] if getattr(msg, "tensors", ()) else []
    wire = frames.encode(msg, tensors)
    assert len(wire) == 2 + len(tensors)
    out, got = frames.decode([bytes(f) for f in wire])
    assert out == msg
    assert len(got) == len(tensors)


def test_old_peer_short_array_gets_defaults() -> None:
    header = msgpack.packb(["r1", "base", "hi"])
    msg, _ = frames.decode([Kind.GENERATE.value, header])
    assert msg == Generate("r1", "base", "hi")
    assert msg.max_new_tokens == 32


def test_newer_peer_extra_fields_are_ignored() -> None:
    values = [*msgpack.unpackb(frames.encode(protocol.Cancel("r9"))[1]), "future", 7]
    msg, _ = frames.decode([Kind.CANCEL.value, msgpack.packb(values)])
    assert msg == protocol.Cancel("r9")


@pytest.mark.parametrize(
    "wire",
    [
        [b"?", msgpack.packb(["x"])],  # unknown kind
        [b"GG", msgpack.packb(["x"])],  # kind not one byte
        [Kind.GENERATE.value, b"\xc1\xc1"],  # not msgpack
        [Kind.GENERATE.value, msgpack.packb({"a": 1})],  # not an array
        [Kind.GENERATE.value, msgpack.packb(["r"])],  # missing required field
        [Kind.GENERATE.value, msgpack.packb([1, "base"])],  # wrong type
        [Kind.GENERATE.value, msgpack.packb(["r", "m", None, [1, "x"]])],  # bad token id
        [Kind.GENERATE.value, msgpack.packb(["r", "m", None, None, True])],  # bool as int
        [Kind.CANCEL.value],  # too few frames
        [Kind.CANCEL.value, msgpack.packb(["r"]), b"extra"],  # frame count
    ],
)
def test_malformed_raises_protocol_error(wire) -> None:
    with pytest.raises(ProtocolError):
        frames.decode(wire)


def test_tensor_frame_size_and_dtype_validated() -> None:
    msg = Result("r", 0, tensors=(protocol.TensorMeta("float32", (2, 2)),))
    header = frames.encode(msg, [torch.zeros(2, 2)])[1]
    with pytest.raises(ProtocolError, match="bytes"):
        frames.decode([Kind.RESULT.value, header, b"\0" * 15])
    bad = dataclasses.replace(msg, tensors=(protocol.TensorMeta("complex64", (1,)),))
    with pytest.raises(ProtocolError, match="dtype"):
        frames.decode([Kind.RESULT.value, msgpack.packb(frames.to_wire(bad)), b"\0" * 8])
    with pytest.raises(ProtocolError):
        frames.decode([Kind.RESULT.value, header])  # tensor frame missing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("shape", [(3, 5), (), (0, 4), (1,)])
def test_tensor_round_trip_exact(dtype, shape) -> None:
    t = (torch.arange(max(1, torch.Size(shape).numel())) * 3 - 7).to(dtype)[
        : torch.Size(shape).numel()
    ]
    t = t.reshape(shape)
    msg = Result("r", 1, tensors=(frames.meta_of(t),))
    wire = frames.encode(msg, [t])
    _, (got,) = frames.decode(wire)
    assert got.dtype == dtype and tuple(got.shape) == shape
    assert torch.equal(got, t)


def test_non_contiguous_tensor() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    wire = frames.encode(Result("r", 1, tensors=(frames.meta_of(t),)), [t])
    _, (got,) = frames.decode(wire)
    assert torch.equal(got, t)


def test_error_codes_are_strings() -> None:
    assert protocol.ErrorCode.KV_MISS == "KV_MISS"
    msg, _ = frames.decode(frames.encode(Error("r", protocol.ErrorCode.KV_MISS, "m")))
    assert msg.code == "KV_MISS" and type(msg.code) is str


def test_every_kind_has_its_own_byte():
    """An Enum silently makes a member with a repeated value an alias of the first one."""
    from blockllm.broker.protocol import Kind

    assert len(Kind) == len(Kind.__members__)


def test_every_kind_a_peer_sends_belongs_to_a_role() -> None:
    """Each message kind the broker receives is allowed to some key role (broker/security.py):
    a new kind missing here would be refused (FORBIDDEN) from every key once roles are on."""
    from blockllm.broker.protocol import ROLE_KINDS

    broker_sends = {
        Kind.FORWARD,
        Kind.RELEASE,
        Kind.TOKEN,
        Kind.STATUS,
        Kind.ACK,
        Kind.STATS,
        Kind.STATS_DELTA,
        Kind.BLOB,
        Kind.KV_EXPORT,
        Kind.SPECULATE,
    }
    allowed = set().union(*ROLE_KINDS.values())
    assert set(Kind) - broker_sends <= allowed
