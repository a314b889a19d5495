"""Spawning worker processes: the planner's policy for it (`SpawnPolicy`, pure) and the IO that
starts and stops them (`Spawner`, the planner process's main thread).

When the cluster's workers cannot do what the planner needs, it may start up to `max_spawn`
more on this node (0: never):
- a straggler needs a duplicate and no worker has room for it (stragglers.py `no_helper`);
- coverage is lost (a model once covered, or with requests waiting, is not covered for
  `spawn_after_s`) and the survivors cannot hold it: no worker is left, or the placement over
  the current workers leaves it uncovered. An idle cluster still starting spawns nothing.

A spawned worker is named `{spawn_prefix}{n}` (n = 0 .. max_spawn-1, a slot reused after it
is gone), registers with no stages, and the planner loads stages on it as on any worker. The
placement prefers the other workers whenever they cover every model without it (`place`), so a
spawned worker ends up holding nothing once it is not needed (its straggler recovered and the
duplicate was retired, or the lost worker came back). Unneeded (no stage the target or a
duplicate keeps, nothing queued) for `spawn_hold_s`, it is retired. One spawn is under way at a
time; one not registered within `spawn_timeout_s` is stopped and the next try waits as long.

Two ways to start one (`Spawner`):
- a child `python -m blockllm.client.cli worker --broker B --zoo Z --name NAME [--keys K]
  SPAWN_WORKER_ARGS...` (`blockllm serve`, or a planner alone on a node); it gets SIGTERM if
  the planner dies (PR_SET_PDEATHSIG), is reaped, and is stopped SIGTERM -> `spawn_stop_s` ->
  SIGKILL (its process tree) when retired and when the planner exits;
- `spawn_command` / `stop_command` templates run without a shell, `{n}` and `{name}`
  substituted, for a supervisor: `systemctl start --no-block blockllm-worker@spare{n}` (the
  instance name is the worker's name, so `spawn_prefix` must match). When the planner exits
  it runs the stop template for each worker it started.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from blockllm.broker.lifecycle import arm_parent_death, kill_tree, stop_processes
from blockllm.broker.planner.config import PlannerConfig

if TYPE_CHECKING:
    from blockllm.broker.planner.facts import WorkerFacts
    from blockllm.broker.planner.planner import Planner
    from blockllm.broker.protocol import ModelStats

logger = logging.getLogger(__name__)

N = TypeVar("N")


@dataclass(frozen=True, slots=True)
class SpawnAction:
    """What the policy asks the Spawner to do: `verb` "start" or "stop" worker `name`."""

    verb: str
    name: str
    n: int
    reason: str = ""


@dataclass
class Spawned:
    """A worker the planner started (or asked a supervisor to start)."""

    name: str
    n: int
    since: float
    registered: bool = False
    idle_since: float | None = None
    stopping: bool = False


class SpawnPolicy:
    """When to spawn and retire workers (module docstring); the Planner's loop only.

    `step` records actions; the planner process takes them with `take()` and reports exits of
    its children with `exited()`.
    """

    def __init__(self, cfg: PlannerConfig) -> None:
        self.cfg = cfg
        self.spawned: dict[str, Spawned] = {}
        self.actions: list[SpawnAction] = []
        self.uncovered_since: float | None = None
        self.was_covered: set[str] = set()  # models seen covered (a loss is of one of these)
        self.started = 0
        self.retired = 0
        self.failed = 0
        self._retry_at = -math.inf
        self.need = ""  # why capacity is missing in the last snapshot ("": it is not)

    @property
    def enabled(self) -> bool:
        return self.cfg.max_spawn > 0

    def take(self) -> list[SpawnAction]:
        out, self.actions = self.actions, []
        return out

    def step(
        self,
        planner: Planner,
        workers: Mapping[str, WorkerFacts],
        models: Mapping[str, ModelStats],
        served: Sequence[str],
        now: float,
    ) -> None:
        """Look at one snapshot (after the placement and the duplicates have)."""
        if not self.enabled:
            return
        self._track(workers, now)
        self.need = self._need(planner, workers, models, served, now)
        if self.need:
            self._maybe_start(now)
        self._maybe_retire(planner, workers, now)

    def _track(self, workers: Mapping[str, WorkerFacts], now: float) -> None:
        """Registration, and spawned workers that never came or have gone."""
        for s in list(self.spawned.values()):
            if s.name in workers:
                if not s.registered:
                    logger.info("[planner] spawned worker %s registered", s.name)
                s.registered = True
            elif s.registered or s.stopping:
                self._stop(s, "left the broker")
                del self.spawned[s.name]
            elif now - s.since >= self.cfg.spawn_timeout_s:
                logger.warning(
                    "[planner] spawned worker %s not registered after %.0f s", s.name, now - s.since
                )
                self._stop(s, "not registered in time")
                del self.spawned[s.name]
                self.failed += 1
                self._retry_at = now + self.cfg.spawn_timeout_s

    def _need(
        self,
        planner: Planner,
        workers: Mapping[str, WorkerFacts],
        models: Mapping[str, ModelStats],
        served: Sequence[str],
        now: float,
    ) -> str:
        stragglers = sorted(planner.duplicates.no_helper)
        covered = {m for m in served if m in models and models[m].covered}
        self.was_covered |= covered
        # coverage *lost*, or requests waiting for it: an idle cluster still starting (its
        # workers loading) spawns nothing
        waiting = {m for m in served if m in models and models[m].waiting > 0}
        uncovered = [m for m in served if m not in covered and m in self.was_covered | waiting]
        if not uncovered:
            self.uncovered_since = None
        elif self.uncovered_since is None:
            self.uncovered_since = now
        t = planner.target
        short = not workers or (
            t is not None and t.workers == frozenset(workers) and bool(t.plan.uncovered)
        )
        lost = (
            uncovered
            and short
            and self.uncovered_since is not None
            and now - self.uncovered_since >= self.cfg.spawn_after_s
        )
        if lost:
            return f"coverage lost ({', '.join(uncovered)}) and no worker can hold it"
        if stragglers:
            return f"no worker has room for a duplicate of {', '.join(stragglers)}"
        return ""

    def _maybe_start(self, now: float) -> None:
        if now < self._retry_at or any(not s.registered for s in self.spawned.values()):
            return  # one spawn under way at a time; a failed one backs off
        live = [s for s in self.spawned.values() if not s.stopping]
        if len(live) >= self.cfg.max_spawn:
            return
        used = {s.n for s in self.spawned.values()}
        n = next(i for i in range(self.cfg.max_spawn + len(used)) if i not in used)
        s = Spawned(f"{self.cfg.spawn_prefix}{n}", n, now)
        self.spawned[s.name] = s
        self.started += 1
        logger.warning("[planner] spawning worker %s: %s", s.name, self.need)
        self.actions.append(SpawnAction("start", s.name, n, self.need))

    def _maybe_retire(
        self, planner: Planner, workers: Mapping[str, WorkerFacts], now: float
    ) -> None:
        keep = planner.duplicates.stage_keys()
        if planner.target is not None:
            keep |= set(planner.target.stage_keys)
        helpers = {d.helper for d in planner.duplicates.active.values()}
        for s in list(self.spawned.values()):
            w = workers.get(s.name)
            if w is None or s.stopping:
                continue
            held = {(s.name, k) for k in w.stages} & keep
            if self.need or held or s.name in helpers or w.queued > 0:
                s.idle_since = None
                continue
            if s.idle_since is None:
                s.idle_since = now
            if now - s.idle_since >= self.cfg.spawn_hold_s:
                logger.info(
                    "[planner] retiring spawned worker %s: unneeded for %.0f s",
                    s.name,
                    now - s.idle_since,
                )
                self._stop(s, "unneeded")
                self.retired += 1

    def _stop(self, s: Spawned, why: str) -> None:
        if not s.stopping:
            s.stopping = True
            self.actions.append(SpawnAction("stop", s.name, s.n, why))

    def exited(self, name: str, code: int | None, now: float) -> None:
        """A spawned child exited (reaped by the Spawner); its slot is free again."""
        s = self.spawned.pop(name, None)
        if s is not None and not s.stopping:
            logger.warning("[planner] spawned worker %s exited (code %s)", name, code)
            if not s.registered:
                self.failed += 1
                self._retry_at = now + self.cfg.spawn_timeout_s

    def place(self, nodes: Sequence[N], name: Callable[[N], str], place: Callable) -> Any:
        """`place(nodes)` without the spawned workers when the others cover every model,
        else with them: a spawned worker is used only while it is needed."""
        own = [n for n in nodes if name(n) not in self.spawned]
        if self.spawned and own and len(own) < len(nodes):
            plan = place(own)
            if not plan.uncovered:
                return plan
        return place(nodes)


class Spawner:
    """Starts and stops spawned workers (the planner process's main thread only)."""

    def __init__(self, cfg: PlannerConfig) -> None:
        self.cfg = cfg
        self.children: dict[str, subprocess.Popen] = {}  # child workers by name
        self.commands: list[tuple[str, subprocess.Popen]] = []  # template runs in flight
        self.started: dict[str, int] = {}  # started by a template: name -> n (stopped at close)
        self._kill_at: dict[str, float] = {}  # name -> when a SIGTERMed child gets SIGKILL

    def apply(self, actions: Iterable[SpawnAction]) -> None:
        for a in actions:
            try:
                self.start(a.name, a.n) if a.verb == "start" else self.stop(a.name, a.n)
            except (OSError, ValueError) as e:  # a bad template or executable: logged
                logger.error("[planner] cannot %s worker %s: %s", a.verb, a.name, e)

    def worker_argv(self, name: str) -> list[str]:
        """The command line of a child worker."""
        cfg = self.cfg
        argv = [sys.executable, "-m", "blockllm.client.cli", "worker"]
        argv += ["--broker", cfg.broker, "--name", name]
        if cfg.zoo_dir:
            argv += ["--zoo", cfg.zoo_dir]
        if cfg.keys_dir:
            argv += ["--keys", cfg.keys_dir]
        return [*argv, *cfg.spawn_worker_args]

    def start(self, name: str, n: int) -> None:
        if self.cfg.spawn_command:
            self._run_template(self.cfg.spawn_command, name, n)
            self.started[name] = n
            return
        parent = os.getpid()
        # preexec_fn only calls prctl and getppid (no lock a fork could have copied held)
        proc = subprocess.Popen(
            self.worker_argv(name),
            stdin=subprocess.DEVNULL,
            stdout=2,  # its output is log lines: never on serve's stdout (the announcement)
            preexec_fn=lambda: arm_parent_death(parent),
            env={**os.environ, "BLOCKLLM_LOG_LEVEL": self.cfg.log_level},
        )
        self.children[name] = proc
        logger.info("[planner] started worker %s (pid %d)", name, proc.pid)

    def stop(self, name: str, n: int) -> None:
        proc = self.children.get(name)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            self._kill_at.setdefault(name, time.monotonic() + self.cfg.spawn_stop_s)
        elif name in self.started and self.cfg.stop_command:
            self._run_template(self.cfg.stop_command, name, n)
            del self.started[name]

    def _run_template(self, template: str, name: str, n: int) -> None:
        argv = [part.format(n=n, name=name) for part in shlex.split(template)]
        logger.info("[planner] running %s", shlex.join(argv))
        self.commands.append((name, subprocess.Popen(argv, stdin=subprocess.DEVNULL)))

    def reap(self) -> list[tuple[str, int | None]]:
        """Children that exited (name, exit code); escalates overdue SIGTERMs to SIGKILL;
        logs failed template runs. Call every loop turn."""
        out = []
        for name, proc in list(self.children.items()):
            code = proc.poll()
            if code is not None:
                del self.children[name]
                self._kill_at.pop(name, None)
                out.append((name, code))
            elif time.monotonic() >= self._kill_at.get(name, math.inf):
                logger.warning("[planner] worker %s ignored SIGTERM; killing it", name)
                kill_tree(proc)
        for item in list(self.commands):
            code = item[1].poll()
            if code is not None:
                self.commands.remove(item)
                if code != 0:
                    logger.error(
                        "[planner] %s for worker %s exited %d",
                        shlex.join(item[1].args),
                        item[0],
                        code,
                    )
        return out

    def close(self) -> None:
        """Stop everything started: children SIGTERM -> wait `spawn_stop_s` -> SIGKILL;
        templates: the stop template, each waited for (bounded)."""
        for name, n in list(self.started.items()):
            self.stop(name, n)
        stop_processes(list(self.children.values()), self.cfg.spawn_stop_s)
        self.children.clear()
        deadline = time.monotonic() + self.cfg.spawn_stop_s
        for _name, proc in self.commands:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.commands.clear()
