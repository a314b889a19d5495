"""Spawning workers: the pure policy's decisions fed synthetic STATS snapshots (when to start
one, that one is under way at a time, when to retire it), and the Spawner's process handling
(templates for a supervisor, SIGTERM -> SIGKILL escalation) with real short-lived processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from blockllm.broker.lifecycle import stop_processes
from blockllm.broker.planner.config import PlannerConfig
from blockllm.broker.planner.planner import Planner
from blockllm.broker.planner.spawn import SpawnAction, Spawner
from blockllm.broker.protocol import LoadStage
from tests.unit.test_planner import MANIFESTS, MB, cfg, snapshot

NONE = {"m": False, "ft": False}


def planner(**kw: Any) -> Planner:
    base = {"max_spawn": 1, "spawn_after_s": 1.0, "spawn_timeout_s": 10.0, "spawn_hold_s": 5.0}
    return Planner(cfg(**{**base, **kw}), lambda: (MANIFESTS, []))


def actions(p: Planner) -> list[tuple[str, str]]:
    return [(a.verb, a.name) for a in p.spawns.take()]


def test_spawning_is_off_by_default() -> None:
    p = Planner(cfg(), lambda: (MANIFESTS, []))
    p.on_stats(snapshot({"w0": [("m", 0, 6)]}), 0.0)
    for t in (1.0, 10.0, 100.0):
        p.on_stats(snapshot({}, NONE), t)
    assert p.spawns.take() == []


def test_an_idle_cluster_still_starting_spawns_nothing_until_requests_wait() -> None:
    p = planner(spawn_after_s=0.0)
    for t in (0.0, 5.0, 50.0):  # no worker registered yet, nothing ever covered
        p.on_stats(snapshot({}, NONE), t)
    p.on_stats(snapshot({"w0": []}, NONE), 60.0)
    assert actions(p) == []
    body = snapshot({}, NONE, waiting={"m": 2})  # ... until requests wait for a model
    p.on_stats(body, 61.0)
    assert actions(p) == [("start", "spare0")]


def test_the_last_worker_lost_spawns_one_after_spawn_after_s_and_it_is_placed_on() -> None:
    p = planner()
    p.on_stats(snapshot({"w0": [("m", 0, 6)]}), 0.0)
    p.on_stats(snapshot({}, NONE), 1.0)
    assert actions(p) == []  # a moment without coverage spawns nothing
    p.on_stats(snapshot({}, NONE), 2.0)
    assert actions(p) == [("start", "spare0")]
    p.on_stats(snapshot({}, NONE), 3.0)
    assert actions(p) == []  # one under way at a time (and max_spawn=1)
    cmds = p.on_stats(snapshot({"spare0": []}, NONE), 4.0)  # registers with no stages
    loads = {(c.worker, c.start, c.end) for c in cmds if isinstance(c, LoadStage)}
    assert loads and {w for w, *_ in loads} == {"spare0"}
    # holding the target's stages, a spawned worker is needed: never retired
    p.on_stats(snapshot({"spare0": [("m", 0, 6), ("ft", 3, 5)]}), 5.0)
    p.on_stats(snapshot({"spare0": [("m", 0, 6), ("ft", 3, 5)]}), 60.0)
    assert actions(p) == []


def test_survivors_that_cannot_hold_the_lost_stages_spawn_but_roomy_ones_do_not() -> None:
    both = {"w0": [("m", 0, 3)], "w1": [("m", 3, 6), ("ft", 3, 5)]}
    for budget, spawns in ((5 * MB, True), (8 * MB, False)):
        p = planner(spawn_after_s=0.0)
        p.on_stats(snapshot(both, budget=budget), 0.0)
        p.on_stats(snapshot({"w0": [("m", 0, 3)]}, NONE, budget=budget), 1.0)
        p.on_stats(snapshot({"w0": [("m", 0, 3)]}, NONE, budget=budget), 2.0)
        assert actions(p) == ([("start", "spare0")] if spawns else []), budget


def test_a_spawn_not_registered_in_time_is_stopped_and_retried_later() -> None:
    p = planner(spawn_after_s=0.0, spawn_timeout_s=5.0)
    p.on_stats(snapshot({"w0": [("m", 0, 6)]}), 0.0)
    p.on_stats(snapshot({}, NONE), 1.0)
    assert actions(p) == [("start", "spare0")]
    p.on_stats(snapshot({}, NONE), 6.5)
    assert actions(p) == [("stop", "spare0")] and p.spawns.failed == 1
    p.on_stats(snapshot({}, NONE), 9.0)
    assert actions(p) == []  # backing off
    p.on_stats(snapshot({}, NONE), 12.0)
    assert actions(p) == [("start", "spare0")]


def test_a_child_that_exits_before_registering_frees_its_slot_after_a_backoff() -> None:
    p = planner(spawn_after_s=0.0, spawn_timeout_s=5.0)
    p.on_stats(snapshot({"w0": [("m", 0, 6)]}), 0.0)
    p.on_stats(snapshot({}, NONE), 1.0)
    assert actions(p) == [("start", "spare0")]
    p.spawns.exited("spare0", 1, 2.0)
    p.on_stats(snapshot({}, NONE), 3.0)
    assert actions(p) == []
    p.on_stats(snapshot({}, NONE), 7.5)
    assert actions(p) == [("start", "spare0")]


def test_a_straggler_without_room_for_a_duplicate_spawns_a_helper_retired_after_recovery():
    p = planner(dup_step_ms=100.0, dup_hold_s=1.0, spawn_hold_s=5.0)
    route = {"m": [["w0", [[0, 6]]]]}
    alone = {"w0": [("m", 0, 6), ("ft", 3, 5)]}
    p.on_stats(snapshot(alone, p50={"w0": 300.0}, routes=route), 0.0)
    assert actions(p) == [("start", "spare0")] and p.duplicates.no_helper == {"w0"}
    with_spare = {**alone, "spare0": []}
    cmds = p.on_stats(snapshot(with_spare, p50={"w0": 300.0}, routes=route), 1.0)
    loads = {(c.worker, c.model, c.start, c.end) for c in cmds if isinstance(c, LoadStage)}
    assert ("spare0", "m", 0, 6) in loads and not p.duplicates.no_helper
    dup = {**alone, "spare0": [("m", 0, 6), ("ft", 3, 5)]}
    p.on_stats(snapshot(dup, p50={"w0": 300.0}, routes=route), 2.0)
    for t in (3.0, 4.5, 20.0):  # serving the duplicate: needed however long
        p.on_stats(snapshot(dup, p50={"w0": 300.0, "spare0": 5.0}, routes=route), t)
    assert actions(p) == []
    healthy = {"w0": 20.0, "spare0": 5.0}
    for t in (21.0, 22.5):  # healthy for dup_hold_s: the duplicate is retired
        p.on_stats(snapshot(dup, p50=healthy, routes=route), t)
    assert p.duplicates.retired == 1
    empty = {**alone, "spare0": []}  # the planner unloaded the duplicate stages
    p.on_stats(snapshot(empty, p50=healthy, routes=route), 23.0)
    p.on_stats(snapshot(empty, p50=healthy, routes=route), 27.0)
    assert actions(p) == []  # unneeded, but not for spawn_hold_s yet
    p.on_stats(snapshot(empty, p50=healthy, routes=route), 28.5)
    assert actions(p) == [("stop", "spare0")] and p.spawns.retired == 1


def test_config_needs_a_stop_template_with_a_spawn_template() -> None:
    import pytest

    with pytest.raises(ValueError, match="stop_command"):
        PlannerConfig(spawn_command="systemctl start blockllm-worker@spare{n}")
    with pytest.raises(ValueError, match="max_spawn"):
        PlannerConfig(max_spawn=-1)


def test_spawner_runs_the_templates_and_the_stop_template_at_close(tmp_path: Path) -> None:
    spawner = Spawner(
        PlannerConfig(
            max_spawn=2,
            spawn_command=f"touch {tmp_path}/start-{{name}}-{{n}}",
            stop_command=f"touch {tmp_path}/stop-{{name}}",
        )
    )
    spawner.apply([SpawnAction("start", "spare0", 0), SpawnAction("start", "spare1", 1)])
    spawner.apply([SpawnAction("stop", "spare0", 0)])
    spawner.close()  # waits for every template run
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "start-spare0-0",
        "start-spare1-1",
        "stop-spare0",
        "stop-spare1",
    ]


def test_a_child_worker_gets_the_planners_broker_zoo_keys_and_extra_flags() -> None:
    cfg = PlannerConfig(
        broker="tcp://10.0.0.1:5555",
        zoo_dir="/z",
        keys_dir="/k",
        spawn_worker_args=("--device", "cuda:1", "--memory-budget", "8GiB"),
    )
    argv = Spawner(cfg).worker_argv("spare3")
    assert argv[:4] == [sys.executable, "-m", "blockllm.client.cli", "worker"]
    assert argv[4:] == [
        "--broker",
        "tcp://10.0.0.1:5555",
        "--name",
        "spare3",
        "--zoo",
        "/z",
        "--keys",
        "/k",
        "--device",
        "cuda:1",
        "--memory-budget",
        "8GiB",
    ]


def test_a_child_ignoring_sigterm_is_killed_after_the_timeout() -> None:
    code = "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=1)"
    child = subprocess.Popen(
        [sys.executable, "-c", code + "; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdout.readline() == b"1\n"  # handler installed
    stop_processes([child], timeout=0.5)
    assert child.returncode == -9


def test_serve_gives_spawned_workers_its_own_workers_flags() -> None:
    from blockllm.client.launcher import spare_worker_args
    from blockllm.worker.config import MiB, WorkerProcConfig

    wcfg = WorkerProcConfig(
        "tcp://b:1", "/z", device="cuda:1", kv_budget_bytes=64 * MiB, memory_budget_bytes=512 * MiB
    )
    args = spare_worker_args(wcfg, threads=2)
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--device"] == "cuda:1" and flags["--threads"] == "2"
    assert flags["--kv-budget"] == str(64 * MiB) and flags["--memory-budget"] == str(512 * MiB)


def test_planner_cli_spawn_flags_reach_the_config_and_a_lone_template_is_refused() -> None:
    from click.testing import CliRunner

    from blockllm.client.cli import cli
    from blockllm.client.cli.common import CliError
    from blockllm.client.cli.planner import planner_config

    cfg = planner_config(
        {"max_spawn": 2, "spawn_hold_s": 5.0, "spawn_command": "a {n}", "stop_command": "b {n}"}
    )
    assert (cfg.max_spawn, cfg.spawn_hold_s, cfg.spawn_command) == (2, 5.0, "a {n}")
    assert planner_config({}).max_spawn == 0  # off unless asked for
    result = CliRunner().invoke(cli, ["planner", "--spawn-command", "systemctl start x@{n}"])
    assert isinstance(result.exception, CliError) and "stop_command" in str(result.exception)
