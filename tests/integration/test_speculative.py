"""Speculative execution through real processes (broker + 2 workers, a tiny llama).

The workers split the chain into three hops, w0 (embedding, layers 0-1: positions 0-3) -> w1
(layers 2-3: positions 3-5) -> w0 (the head: position 5), so a decode step's input to hop 1 is
also sent to w0 as hop 2's prediction (SPECULATE). With tolerance 0 a
prediction is kept only when identical to the real input, which never happens across two
layers: every run is rolled back (rejected) or withdrawn (overtaken), and the output must equal
HF `generate` token for token. Without `--speculate` (the default) nothing is sent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cluster import Cluster, cluster, hf_greedy, make_zoo

WORKERS = {"w0": ["llama:0-3", "llama:5-6"], "w1": ["llama:3-5"]}
PROMPT = [5, 17, 42, 9]
NEW = 8
KEYS = ("speculated", "accepted", "rejected")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def zoo(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("zoo"), {"llama": checkpoint})


def _speculation(client: Any, expect_runs: int, deadline_s: float = 15.0) -> dict[str, dict]:
    """Per worker name, its speculation counters once the broker's facts show `expect_runs`
    runs in all (facts travel with the pongs of idle workers: a few beats)."""
    deadline = time.monotonic() + deadline_s
    while True:
        status = client.status()
        by_name = {w["name"]: w["speculation"] for w in status["workers"]}
        runs = sum(s["speculated"] for s in by_name.values())
        if runs >= expect_runs or time.monotonic() > deadline:
            return {"workers": by_name, "counters": status["counters"]}


def _run(c: Cluster, checkpoint: Path) -> dict[str, Any]:
    want = hf_greedy(checkpoint, PROMPT, NEW)
    with c.client(timeout=60) as client:
        got = client.generate("llama", input_ids=PROMPT, max_new_tokens=NEW).token_ids
        assert got == want
        sent = client.status()["counters"]["speculated"]
        return {"sent": sent, **_speculation(client, sent)}


@pytest.mark.timeout(120)
def test_speculation_at_tolerance_zero_is_exact_and_runs(zoo: Path, checkpoint: Path) -> None:
    with cluster(zoo, WORKERS, ["llama"], broker={"speculate": (("llama", 0.0),)}) as c:
        seen = _run(c, checkpoint)
    # every decode step (all but the prefill) sent hop 1's input to w0 as hop 2's prediction
    assert seen["sent"] == NEW - 1, seen
    w0, w1 = seen["workers"]["w0"], seen["workers"]["w1"]
    assert w0["speculated"] == NEW - 1, seen
    assert w0["accepted"] == 0, seen  # tolerance 0 across two layers: never identical
    assert w0["rejected"] <= w0["speculated"], seen  # the rest were overtaken
    assert w1 == dict.fromkeys(KEYS, 0), seen


@pytest.mark.timeout(120)
def test_speculation_is_off_by_default(zoo: Path, checkpoint: Path) -> None:
    with cluster(zoo, WORKERS, ["llama"]) as c:
        seen = _run(c, checkpoint)
    assert seen["sent"] == 0, seen
    for counters in seen["workers"].values():
        assert counters == dict.fromkeys(KEYS, 0), seen


@pytest.mark.timeout(120)
def test_accepted_runs_answer_the_real_forward(zoo: Path) -> None:
    """At a tolerance every input meets, a run that finished before its real input arrives is
    accepted: the hop's answer is the kept result (the output may differ from exact serving).
    w1 is slowed (test-only straggler hook) so w0's run has time to finish first."""
    slow = {"w1": {"fault_step_delay_s": 0.3}}
    spec = {"speculate": (("llama", 1e9),)}
    with (
        cluster(zoo, WORKERS, ["llama"], broker=spec, worker_kw=slow) as c,
        c.client(timeout=60) as client,
    ):
        got = client.generate("llama", input_ids=PROMPT, max_new_tokens=NEW).token_ids
        assert len(got) == NEW
        sent = client.status()["counters"]["speculated"]
        seen = _speculation(client, sent)
    w0 = seen["workers"]["w0"]
    assert sent == w0["speculated"] == NEW - 1, seen
    assert w0["accepted"] >= 1 and w0["rejected"] == 0, seen
