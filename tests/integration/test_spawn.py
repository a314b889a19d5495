"""The planner spawning a worker process for real: the only worker of a cluster is SIGKILLed
under load, the planner starts a child `blockllm worker`, places the model on it, every request
finishes with HF's greedy output, and the child is gone once the planner stops; it is retired
once a worker of the cluster's own is back; a lone straggler gets its duplicate on a spawned
worker, which goes when the planner is SIGKILLed.

Waits poll STATUS with deadlines (no sleeps); the test is bounded by pytest-timeout.
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from tests.integration.cluster import cluster, hf_greedy
from tests.integration.test_planner import (
    FAST,
    PROMPTS,
    Streams,
    p95,
    planner_cfg,
    token_gaps,
    wait_status,
)

NEW_TOKENS = 48  # the kill comes at each stream's third token: 45 still to come on w0
SPARE_ARGS = ("--threads", "1", "--kv-budget", "64MiB", "--heartbeat-interval", "0.25")


def _spawned(planner_pid: int) -> list[psutil.Process]:
    """The planner's child workers (`blockllm.client.cli worker ... --name spareN`)."""
    out = []
    for p in psutil.Process(planner_pid).children(recursive=True):
        try:
            if "worker" in p.cmdline():
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.mark.timeout(60)
def test_sigkill_of_the_only_worker_spawns_one_and_loses_no_request(zoo: Path, llama: Path):
    want = {tuple(p): hf_greedy(llama, p, NEW_TOKENS) for p in PROMPTS}
    # w0's steps are slowed a little so the requests are surely running when it is killed
    kw = {"w0": {"fault_step_delay_s": 0.02}}
    with cluster(zoo, {"w0": ["m:0-6"]}, ["m"], broker=FAST, worker_kw=kw) as c:
        cfg = planner_cfg(
            c,
            replicate=False,
            min_demand=1e9,
            max_spawn=1,
            spawn_after_s=0.0,
            spawn_worker_args=SPARE_ARGS,
            spawn_stop_s=10.0,
        )
        planner = c.launcher.start_planner(cfg)
        streams = Streams(c, [("m", p, NEW_TOKENS) for p in PROMPTS])
        streams.started.wait(30)  # every request is running on w0...
        c.launcher.kill_worker("w0", signal.SIGKILL)  # ...the only worker
        assert streams.join() == [want[tuple(p)] for p in PROMPTS]  # nothing lost or repeated
        body = wait_status(c, lambda b: b["models"]["m"]["covered"], 20, "coverage")
        assert [w["name"] for w in body["workers"]] == ["spare0"]
        assert body["counters"]["replays"] >= 1 and body["counters"]["failed"] == 0
        (child,) = _spawned(planner.pid)
        assert "spare0" in child.cmdline()
        # SIGTERM: the planner stops what it spawned, then exits
        assert c.launcher.stop_planner(15.0) == [0]
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        wait_status(c, lambda b: not b["workers"], 10, "spare0 left the broker")


@pytest.mark.timeout(60)
def test_a_spawned_worker_is_retired_once_a_new_worker_covers_its_stages(zoo: Path, llama: Path):
    prompt = PROMPTS[2]
    want = hf_greedy(llama, prompt, 16)
    kw = {"w0": {"fault_step_delay_s": 0.05}}  # the request is surely running at the kill
    with (
        cluster(zoo, {"w0": ["m:0-6"]}, ["m"], broker=FAST, worker_kw=kw) as c,
        c.client(timeout=60) as client,
    ):
        cfg = planner_cfg(
            c,
            replicate=False,
            min_demand=1e9,
            max_spawn=1,
            spawn_after_s=0.0,
            spawn_hold_s=1.0,
            spawn_worker_args=SPARE_ARGS,
        )
        planner = c.launcher.start_planner(cfg)
        streams = Streams(c, [("m", prompt, 16)])
        streams.started.wait(30)
        c.launcher.kill_worker("w0", signal.SIGKILL)  # a request waits: the planner spawns
        assert streams.join() == [want]
        names = lambda b: [w["name"] for w in b["workers"]]  # noqa: E731
        wait_status(
            c,
            lambda b: names(b) == ["spare0"] and b["models"]["m"]["covered"],
            40,
            "spawned worker serving",
        )
        (child,) = _spawned(planner.pid)
        # a worker of the cluster's own comes (a supervisor restarted it): the placement goes
        # back to it, and the spawned worker, unneeded for spawn_hold_s, is stopped
        c.add_worker("w1", [])
        wait_status(
            c,
            lambda b: names(b) == ["w1"] and b["models"]["m"]["covered"],
            40,
            "spawned worker retired",
        )
        psutil.wait_procs([child], timeout=10)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert client.generate("m", input_ids=prompt, max_new_tokens=16).token_ids == want
        assert c.launcher.stop_planner(15.0) == [0]


LONG = 96  # tokens: 24 s on the straggler alone


@pytest.mark.timeout(120)
def test_a_lone_straggler_gets_its_duplicate_on_a_spawned_worker(zoo: Path, llama: Path):
    delay = 0.25  # every step of w0 takes this much longer (test-only fault hook)
    prompt = PROMPTS[1]
    want = hf_greedy(llama, prompt, 24)
    kw = {"w0": {"fault_step_delay_s": delay}}
    with (
        cluster(zoo, {"w0": ["m:0-6"]}, ["m"], broker=FAST, worker_kw=kw) as c,
        c.client(timeout=60) as client,
    ):
        cfg = planner_cfg(
            c,
            replicate=False,
            min_demand=1e9,
            dup_step_ms=delay * 400,
            max_spawn=1,
            spawn_worker_args=SPARE_ARGS,
        )
        planner = c.launcher.start_planner(cfg)
        # requests on the straggler make it visible as one; no other worker has room for
        # its duplicate (there is none): the planner spawns spare0 and duplicates onto it
        # long enough to outlast the spare's start on a loaded machine (a fresh process
        # imports torch: 20 s and more under load 6); once duplicated it finishes fast
        streams = Streams(c, [("m", PROMPTS[0], LONG)])
        streams.started.wait(30)

        def routed_to_spare(b: dict) -> bool:
            weights = {h[0][0]: wt for h, wt in b["models"]["m"]["planned_routes"] or ()}
            return weights.get("spare0", 0.0) > weights.get("w0", 0.0)

        wait_status(c, routed_to_spare, 45, "duplicate on the spawned worker")
        assert streams.join() == [hf_greedy(llama, PROMPTS[0], LONG)]
        tokens, gaps = token_gaps(client, prompt, 24)
        assert tokens == want
        assert p95(gaps) < delay / 2  # served by the spawned duplicate, not the straggler
        # a planner killed outright takes its children along (PR_SET_PDEATHSIG: SIGTERM)
        (child,) = _spawned(planner.pid)
        c.launcher.kill_planner(signal.SIGKILL)
        psutil.wait_procs([child], timeout=20)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
