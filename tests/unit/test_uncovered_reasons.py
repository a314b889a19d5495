"""STATUS says why a model is not covered (14.6): no worker, no planner, or the planner's own
words (PLANNER_REPORT), which go stale when the planner stops reporting."""

from __future__ import annotations

from blockllm.broker.planner.notes import uncovered_notes
from blockllm.broker.protocol import PlannerReport
from blockllm.broker.status import PLANNER_STALE_S
from tests.unit.broker_harness import Harness
from tests.unit.test_planner import planner, snapshot

PLANNER = b"planner-1"


def why(h: Harness, model: str = "base") -> str:
    entry = h.broker.status(h.now).models[model]
    assert entry.covered is (entry.uncovered == "")
    return entry.uncovered


def test_status_names_the_missing_worker_planner_or_the_planners_reason():
    h = Harness()
    assert why(h) == "no worker is registered"
    h.ready(b"w0", [("base", 0, 3)])  # half of the chain, and nothing to place the rest
    assert why(h).startswith("no planner is connected (start `blockllm planner --broker")
    assert h.send(PLANNER, PlannerReport({"base": "no worker has room for it"})) == []
    assert why(h) == "no worker has room for it"
    assert why(h, "ft") == "the planner has not placed it yet"  # reported nothing about ft
    h.now += PLANNER_STALE_S + 1  # the planner went quiet (no tick: w0 stays registered)
    assert why(h).startswith("no planner is connected")
    h.ready(b"w1", [("base", 3, 6)])
    assert why(h) == ""


def test_a_worker_cannot_pose_as_the_planner():
    h = Harness()
    h.ready(b"w0", [("base", 0, 3)])
    h.send(b"w0", PlannerReport({"base": "lies"}))
    assert why(h) != "lies"


def test_the_planner_says_when_no_worker_has_room():
    p = planner(worker_memory_bytes=1)  # far too small for any stage
    body = snapshot({"w0": []}, covered={"m": False, "ft": False})
    p.on_stats(body, 0.0)
    notes = uncovered_notes(p, body)
    assert notes["m"].startswith("no worker has room for it: its weights (")
    assert "--memory-budget" in notes["m"]
    assert uncovered_notes(p, snapshot({}, covered={"m": False})) == {
        "m": "no worker is registered"
    }


def test_the_planner_says_what_it_is_doing_for_a_placed_model():
    p = planner()
    body = snapshot({"w0": []}, covered={"m": False, "ft": False})
    p.on_stats(body, 0.0)  # places and loads: LOAD_STAGE sent
    assert uncovered_notes(p, body)["m"] == "its stages are loading on w0"
    q = planner()
    assert uncovered_notes(q, body)["m"].startswith("the planner has no manifest for it yet")
