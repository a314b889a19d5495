"""`bench pipeline --breakdown`: where a decode token's time goes, per phase and process.

Every process sums the phases its decode items pass (broker/timings.py): a worker's come with
its heartbeat facts into STATUS (`workers[].timings`), the broker's are STATUS's `timings`. A
run reads STATUS once the previous run's items are all counted, runs, reads it again once
this run's are (`settled`), and divides the differences by the run's decode tokens: ms per
decode token, each row a phase the token passes once per hop. The clients time the tokens of
each stream; what the rows do not cover (zmq transit, OS scheduling, the broker's socket
queue, the client) is that measured time minus the rows' sum: `untimed`.
"""

from __future__ import annotations

import time
from typing import Any

from blockllm.broker.timings import difference

# (phase, what it covers), in the order a token meets them at a worker
WORKER_PHASES = (
    ("deserialise", "IO thread: decode the FORWARD, copy the tensor out"),
    ("queue", "ready -> the engine step that runs it starts"),
    ("compute", "the batched forwards of that step"),
    ("step_python", "the rest of the step: Python around torch"),
    ("after_step", "step end -> its RESULT queued for the IO thread"),
    ("handoff", "queued -> the IO thread takes it"),
    ("serialise", "IO thread: encode + send the RESULT"),
)
BROKER_PHASES = (
    ("decode", "broker: decode the RESULT's header"),
    ("handle", "broker: route it (Python)"),
    ("send", "broker: encode + send what it caused"),
)
SETTLE_TIMEOUT_S = 30.0  # heartbeats carry the workers' sums: about a beat after the last token


def snapshot(status: dict[str, Any]) -> dict[str, Any]:
    """The timings of one STATUS body: {"workers": {name: sums}, "broker": sums}."""
    return {
        "workers": {w["name"]: dict(w.get("timings") or {}) for w in status["workers"]},
        "broker": dict(status.get("timings") or {}),
    }


def settled(client: Any, decode_items: int, timeout_s: float = SETTLE_TIMEOUT_S) -> dict:
    """STATUS timings once every worker has counted `decode_items` decode items (queue and
    serialise both: the compute loop's and the IO thread's sums); the last read, with
    "settled": False, if that does not happen within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        snap = snapshot(client.status())
        done = all(
            t.get("queue_n", 0) >= decode_items and t.get("serialise_n", 0) >= decode_items
            for t in snap["workers"].values()
        )
        if done or time.monotonic() >= deadline:
            snap["settled"] = done
            return snap
        time.sleep(0.1)  # STATUS is cheap; heartbeats come once a beat


def per_token(before: dict, after: dict, tokens: int, measured_s: float) -> dict[str, Any]:
    """ms per decode token by phase: {"workers": {name: {phase: ms}}, "broker": {phase: ms},
    "timed", "measured", "untimed" (ms), "mean_batch": {name: items per step}}."""
    tokens = max(tokens, 1)
    workers, batch = {}, {}
    for name, sums in after["workers"].items():
        d = difference(sums, before["workers"].get(name, {}))
        workers[name] = {p: _ms(d, p, tokens) for p, _ in WORKER_PHASES}
        steps = d.get("steps", 0)
        batch[name] = round(d.get("compute_n", 0) / steps, 2) if steps else 0.0
    b = difference(after["broker"], before["broker"])
    broker = {p: _ms(b, p, tokens) for p, _ in BROKER_PHASES}
    timed = sum(sum(w.values()) for w in workers.values()) + sum(broker.values())
    measured = 1000 * measured_s
    return {
        "workers": workers,
        "broker": broker,
        "timed": round(timed, 3),
        "measured": round(measured, 3),
        "untimed": round(measured - timed, 3),
        "mean_batch": batch,
        "settled": bool(before.get("settled", True) and after.get("settled", True)),
    }


def _ms(sums: dict[str, float], phase: str, tokens: int) -> float:
    return round(1000 * sums.get(phase + "_s", 0.0) / tokens, 3)


def table(streams: int, b: dict[str, Any]) -> str:
    """One run's breakdown as text: a row per phase, a column per worker and the broker."""
    names = list(b["workers"])
    width = max(10, *(len(n) + 2 for n in names))
    head = f"{'ms per decode token, ' + str(streams) + ' streams':52s}"
    lines = [head + "".join(f"{n:>{width}s}" for n in names) + f"{'total':>{width}s}"]
    for phase, what in WORKER_PHASES:
        row = [b["workers"][n][phase] for n in names]
        cells = "".join(f"{v:{width}.2f}" for v in row)
        lines.append(f"{phase + ': ' + what:52.52s}{cells}{sum(row):{width}.2f}")
    pad = " " * (width * len(names))
    for phase, what in BROKER_PHASES:
        lines.append(f"{what:52.52s}{pad}{b['broker'][phase]:{width}.2f}")
    for label, key in (
        ("timed (the rows above)", "timed"),
        ("untimed: zmq transit, OS scheduling, socket queues", "untimed"),
        ("measured: between two tokens of a stream", "measured"),
    ):
        lines.append(f"{label:52s}{pad}{b[key]:{width}.2f}")
    batch = "".join(f"{b['mean_batch'][n]:{width}.2f}" for n in names)
    lines.append(f"{'mean items per engine step':52s}{batch}")
    if not b["settled"]:
        lines.append("(not settled: a worker's heartbeat had not counted every item)")
    return "\n".join(lines)
