"""The typed STATUS / STATS bodies (broker/protocol/bodies.py): every field round-trips, an
older peer's shorter entry decodes to the defaults, a malformed body is a ProtocolError, and
`plain()` shows them in the JSON shape `blockllm status --json` has always printed."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from blockllm.broker import frames
from blockllm.broker.protocol import (
    KVGeometryUse,
    ModelStats,
    ModelStatus,
    PlannedHop,
    PlannedRoute,
    ProtocolError,
    RequestCounts,
    SpeculationCounts,
    StageRef,
    Stats,
    StatsBody,
    Status,
    StatusBody,
    StatusPage,
    Substitution,
    Totals,
    WorkerStatus,
    plain,
)

ROUTE = (PlannedHop("w0", ((0, 2),)), PlannedHop("w1", ((2, 3), (3, 4))))
WORKER = WorkerStatus(
    "w0",
    7,
    "h",
    "cpu",
    (StageRef("k", "base", 0, 2, 10, "bfloat16"),),
    {"k": 2},
    kv_total_bytes=4,
    draining=("k",),
    speculation=SpeculationCounts(3, 2, 1),
    kv_geometries=(KVGeometryUse("2x64/bf16", 16, 100, 1, 1, 4096),),
    timings={"queue_s": 0.5},
)
MODEL = ModelStatus(
    2,
    3,
    True,
    "",
    ROUTE,
    1,
    0,
    (PlannedRoute(ROUTE, 2.0),),
    (Substitution(1, "b" * 64, "other"), Substitution(2, "c" * 64)),
)
STATUS = StatusBody(
    (WORKER,),
    {"base": MODEL, "ft": ModelStatus(covered=False, uncovered="no worker")},
    RequestCounts(1, 2),
    {"requests": 3},
    {"loop_s": 0.1},
    "tcp://x:1",
    Totals(1, 2),
    StatusPage(0, 128, 0),
)


def decoded(msg):
    out, _ = frames.decode([bytes(f) for f in frames.encode(msg)])
    return out


def test_status_and_stats_bodies_round_trip_typed() -> None:
    assert decoded(Status("s", STATUS)) == Status("s", STATUS)
    m = ModelStats(**{f.name: getattr(MODEL, f.name) for f in dataclasses.fields(MODEL)})
    body = StatsBody((WORKER,), {"base": dataclasses.replace(m, rate_rps=1.5)}, time=3.0)
    got = decoded(Stats(4, body, 1, 3))
    assert got == Stats(4, body, 1, 3)
    assert isinstance(got.body.workers[0].stages[0], StageRef)
    assert got.body.models["base"].route == ROUTE


def test_model_stats_starts_with_model_status_fields() -> None:
    status = [(f.name, f.type) for f in dataclasses.fields(ModelStatus)]
    stats = [(f.name, f.type) for f in dataclasses.fields(ModelStats)]
    assert stats[: len(status)] == status


def test_an_older_peers_shorter_entries_decode_to_defaults() -> None:
    header = msgpack.packb(["s", [[["w0", 5]], {"m": [4]}]])
    msg, _ = frames.decode([Status.KIND.value, header])
    assert msg.body.workers == (WorkerStatus("w0", 5),)
    assert msg.body.models == {"m": ModelStatus(4)}
    assert msg.body.page is None and msg.body.totals == Totals()


@pytest.mark.parametrize(
    "body",
    [
        {"workers": []},  # a map (an untyped body) where an array is due
        [[["w0", "not a pid"]]],
        [[[]]],  # a worker without its name
        [[], {"m": [1, 2, "yes"]}],  # covered not a bool
        [[], {"m": [1, 2, True, "", [["w0", [[0]]]]]}],  # a span of one bound
        [[], {}, [1, "two"]],
    ],
)
def test_a_malformed_status_body_is_a_protocol_error(body) -> None:
    with pytest.raises(ProtocolError):
        frames.decode([Status.KIND.value, msgpack.packb(["s", body])])


def test_plain_is_the_json_shape_of_status() -> None:
    out = plain(STATUS)
    w = out["workers"][0]
    assert w["stages"] == [
        {"key": "k", "model": "base", "start": 0, "end": 2, "nbytes": 10, "dtype": "bfloat16"}
    ]
    assert w["speculation"] == {"speculated": 3, "accepted": 2, "rejected": 1}
    assert w["draining"] == ["k"] and w["alive"] is True
    assert w["kv_geometries"][0]["page_bytes"] == 4096
    base = out["models"]["base"]
    assert base["route"] == [["w0", [[0, 2]]], ["w1", [[2, 3], [3, 4]]]]
    assert base["planned_routes"] == [[base["route"], 2.0]]
    assert base["substitutions"] == [
        {"position": 1, "block": "b" * 64, "from": "other"},
        {"position": 2, "block": "c" * 64, "from": None},
    ]
    assert out["models"]["ft"]["route"] is None
    assert out["requests"] == {"running": 1, "waiting": 2}
    assert out["totals"] == {"workers": 1, "models": 2}
    assert out["page"] == {"offset": 0, "limit": 128, "next": 0}
    assert "page" not in plain(dataclasses.replace(STATUS, page=None))
    assert set(out) == {
        "workers",
        "models",
        "requests",
        "counters",
        "timings",
        "stats_endpoint",
        "totals",
        "page",
    }
