"""Process supervision for `blockllm serve` (and the multi-process tests): one pattern for all.

STYLE 7.8, in order:
1. children start with `multiprocessing.get_context("spawn")` (torch is not fork-safe), except
   workers: they fork from multiprocessing's fork server (`FORKSERVER`), a process started
   once (spawn-like, by exec) that imports the worker's modules (`WORKER_PRELOAD`: torch and
   transformers' decoder layers, ~8 CPU-s) and never runs a tensor op, initialises a device or
   starts a thread pool; what is unsafe to fork (CUDA, OpenMP pools in use) happens only in
   the worker, after the fork. A worker (re)start costs a fork instead of the imports (the
   e2e parity tests: 57 -> 36 user CPU-s). The child is given the launcher's environment and
   working directory of that moment; its PR_SET_PDEATHSIG names the fork server, which exits
   when the launcher does (EOF on its "alive" pipe, whose copy every forked child closes at
   once: `_arm_forked`), so the chain still ends at the launcher;
2. a child's first lines arm PR_SET_PDEATHSIG (SIGTERM: it drains and exits when the launcher
   dies, even by SIGKILL) and re-check `os.getppid()` against the pid read before spawning, name
   the process, configure logging, start their own process group (a terminal's Ctrl-C reaches
   only the launcher, which stops the children in order), then call `run_<name>_process(cfg)`;
3. handshake: the broker reports its bound endpoint through a one-way pipe (UTF-8 bytes, no
   pickle); workers are ready when the broker's STATUS lists them and covers every model;
   both waits are bounded and fail with an actionable message, and a child that dies while we
   wait is reported at once;
4. a monitor thread watches the children's sentinels and reports any that exits unexpectedly;
5. cleanup is the module-level `stop_processes(procs, timeout)` (terminate -> join until the
   deadline -> kill the process tree with psutil), registered with `weakref.finalize` on the
   `Launcher`; teardown order is the HTTP API, the planner, the workers, then the broker.
Steps 2 and 5 are broker/lifecycle.py's, shared by every process.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from typing import Any

from blockllm.broker.lifecycle import (
    WakePipe,
    arm_parent_death,
    set_process_name,
    stop_processes,
)
from blockllm.broker.ratelog import few

logger = logging.getLogger(__name__)

SPAWN = multiprocessing.get_context("spawn")
# Workers fork from multiprocessing's fork server, which imported the worker's modules once
# (torch, transformers' decoder layers: ~8 CPU-s a process) and never touched a device.
FORKSERVER = multiprocessing.get_context("forkserver")
WORKER_PRELOAD = ["blockllm.worker.proc"]
BROKER_TARGET = "blockllm.broker.proc:run_broker_process"
WORKER_TARGET = "blockllm.worker.proc:run_worker_process"
PLANNER_TARGET = "blockllm.broker.planner.proc:run_planner_process"
HTTP_TARGET = "blockllm.client.http.server:run_http_process"


def _child_main(
    target: str,
    cfg: Any,
    parent_pid: int,
    name: str,
    log_level: str,
    forked: tuple[dict[str, str], str] | None = None,
) -> None:
    """Entry point of every child: arm, name, log, then run `target(cfg)`. `forked`: (the
    launcher's environment and working directory when it started this child) for a child of
    the fork server, which started earlier from whatever they were then."""
    if forked is None:
        arm_parent_death(parent_pid)
    else:
        _arm_forked(parent_pid)
        env, cwd = forked
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
    os.setpgid(0, 0)  # own process group: terminal signals go to the launcher only
    set_process_name(f"blockllm-{name}")
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    module, _, func = target.partition(":")
    run = getattr(importlib.import_module(module), func)
    sys.exit(int(run(cfg) or 0))


def _arm_forked(launcher_pid: int) -> None:
    """A fork server's child: SIGTERM when the server dies, and exit now if the launcher is
    gone already. The server exits once no process holds the write end of its "alive" pipe:
    the launcher, and every child it forked, which inherits a copy. The child closes its
    copy, so the server (and with it this child) ends with the launcher; kept, a launcher
    killed outright left its workers and the server running for good."""
    from multiprocessing import forkserver

    import psutil

    server = os.getppid()
    arm_parent_death(server)
    alive = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive is not None:
        os.close(alive)
        forkserver._forkserver._forkserver_alive_fd = None
    try:
        ok = psutil.Process(server).ppid() == launcher_pid
    except psutil.Error:
        ok = False
    if not ok:
        os._exit(1)


def infrastructure_pids() -> set[int]:
    """The helper processes multiprocessing keeps for this process's whole life, never ours
    to stop: its resource tracker and the workers' fork server (those it started)."""
    from multiprocessing import forkserver, resource_tracker

    pids = {
        getattr(resource_tracker._resource_tracker, "_pid", None),
        getattr(forkserver._forkserver, "_forkserver_pid", None),
    }
    return {p for p in pids if p}


def _stop_groups(
    groups: Sequence[Sequence[BaseProcess]], timeout: float, stopping: threading.Event
) -> None:
    """weakref.finalize of a Launcher never stopped: its children, group by group."""
    stopping.set()  # the monitor reports no deaths from here on
    for group in groups:
        stop_processes(group, timeout)


class LaunchError(RuntimeError):
    """A child did not come up (or died); the message says which one and what to do."""


# -- the launcher -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Death:
    """A child that exited while it was expected to run."""

    name: str
    pid: int | None
    exitcode: int | None

    def __str__(self) -> str:
        code = self.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        return f"{self.name} (pid {self.pid}) exited unexpectedly ({how})"


class Launcher:
    """Starts and supervises the broker and worker processes of one machine.

    Call from the main thread (PR_SET_PDEATHSIG fires when the *thread* that spawned a child
    exits). `on_death(death)` runs in the monitor thread for every unexpected exit.
    """

    def __init__(
        self,
        *,
        log_level: str = "WARNING",
        stop_timeout: float = 15.0,
        on_death: Callable[[Death], None] | None = None,
    ) -> None:
        self.log_level = log_level
        self.stop_timeout = stop_timeout
        self.on_death = on_death
        self.broker: BaseProcess | None = None
        self.endpoint: str | None = None
        self.workers: dict[str, BaseProcess] = {}
        self.deaths: list[Death] = []
        self._brokers: list[BaseProcess] = []
        self._workers: list[BaseProcess] = []
        self._planners: list[BaseProcess] = []
        self._https: list[BaseProcess] = []
        self.http: BaseProcess | None = None  # the HTTP API process (start_http)
        self.http_url: str | None = None
        self.http_port: int | None = None  # the port it bound (a restart binds it again)
        self._stopping = threading.Event()
        # multiprocessing's Process.exitcode reaps with waitpid and is not thread-safe: two
        # threads polling one child can make one of them see None for a dead child.
        self._lock = threading.Lock()
        self._wake = WakePipe()
        self._expected: set[int] = set()  # id() of children whose exit is not a failure
        self._monitor: threading.Thread | None = None
        # The HTTP API, the planner, workers, then the broker (filled as children start).
        groups = [self._https, self._planners, self._workers, self._brokers]
        self._finalizer = weakref.finalize(self, _stop_groups, groups, stop_timeout, self._stopping)

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- starting ----------------------------------------------------------------------------
    def _spawn(self, name: str, target: str, cfg: Any, fork: bool = False) -> BaseProcess:
        here = threading.current_thread()
        if here is not threading.main_thread():
            # The child's PR_SET_PDEATHSIG would fire when this thread ends: a broker restarted
            # from a helper thread died with it, silently, and took its requests along.
            raise LaunchError(
                f"cannot start {name} from thread {here.name!r}: a child started from a thread "
                "is SIGTERMed by the kernel when that thread ends; start it from the main thread"
            )
        args: tuple[Any, ...] = (target, cfg, os.getpid(), name, self.log_level)
        ctx: Any = SPAWN
        if fork:
            FORKSERVER.set_forkserver_preload(WORKER_PRELOAD)  # used when it first starts
            ctx, args = FORKSERVER, (*args, (dict(os.environ), os.getcwd()))
        proc = ctx.Process(
            target=_child_main,
            args=args,
            name=name,
            daemon=False,  # workers may not be daemons' children; we stop them ourselves
        )
        proc.start()
        logger.info("started %s (pid %d)", name, proc.pid)
        return proc

    def start_broker(self, cfg: Any, ready_timeout: float = 60.0) -> str:
        """Start the broker; return its bound endpoint once it reports it (LaunchError if not)."""
        recv, send = SPAWN.Pipe(duplex=False)
        cfg = replace(cfg, ready_conn=send, parent_pid=os.getpid())
        self.broker = self._spawn("broker", BROKER_TARGET, cfg)
        self._brokers.append(self.broker)
        send.close()  # ours; the child holds its own copy: EOF when it dies
        try:
            ready = multiprocessing.connection.wait([recv, self.broker.sentinel], ready_timeout)
            if recv in ready:
                with contextlib.suppress(EOFError):  # EOF: it died before reporting
                    self.endpoint = recv.recv_bytes().decode()
        finally:
            recv.close()
        if self.endpoint is None:
            code = self.wait_exit(self.broker, 2.0)  # the pipe closed: it is exiting
            what = f"exited with code {code}" if code is not None else "not ready"
            raise LaunchError(
                f"broker {what} after {ready_timeout:.0f} s binding {cfg.bind}; see its log above"
                " (is the address in use? raise --ready-timeout if the zoo is slow to read)"
            )
        logger.info("[ready] broker at %s", self.endpoint)
        self._start_monitor()
        return self.endpoint

    def start_worker(self, name: str, cfg: Any) -> BaseProcess:
        """Start one worker process (`cfg`: a WorkerProcConfig); readiness: `wait_ready`."""
        proc = self._spawn(name, WORKER_TARGET, cfg, fork=True)
        self.workers[name] = proc
        self._workers.append(proc)
        self._start_monitor()
        return proc

    def start_planner(self, cfg: Any) -> BaseProcess:
        """Start the planner process (`cfg`: a PlannerConfig whose `broker` is set)."""
        proc = self._spawn("planner", PLANNER_TARGET, cfg)
        self._planners.append(proc)
        self._start_monitor()
        return proc

    def start_http(self, cfg: Any, ready_timeout: float = 60.0) -> str:
        """Start the HTTP API (`cfg`: an HttpConfig whose `broker` is set); return its base URL
        once it listens and answers GET /health (LaunchError if not)."""
        from blockllm.client.http.config import answers, url_host

        recv, send = SPAWN.Pipe(duplex=False)
        proc = self.http = self._spawn("http", HTTP_TARGET, replace(cfg, ready_conn=send))
        self._https.append(proc)
        send.close()
        deadline = time.monotonic() + ready_timeout
        bound = None
        try:
            if recv in multiprocessing.connection.wait([recv, proc.sentinel], ready_timeout):
                with contextlib.suppress(EOFError):
                    bound = recv.recv_bytes().decode()
        finally:
            recv.close()
        if bound is None or not answers(bound, deadline):
            code = self.wait_exit(proc, 2.0)
            what = f"exited with code {code}" if code is not None else "not answering"
            raise LaunchError(f"HTTP API {what} on {cfg.host}:{cfg.port}; see its log above")
        host, _, port = bound.rpartition(":")
        self.http_port = int(port)
        self.http_url = f"http://{url_host(host)}:{port}/v1"
        logger.info("[ready] HTTP API at %s", self.http_url)
        self._start_monitor()
        return self.http_url

    def wait_ready(
        self,
        models: Sequence[str] | None,
        timeout: float,
        describe: dict[str, str] | None = None,
        keys_dir: str | None = None,
    ) -> dict[str, Any]:
        """Poll the broker's STATUS until every started worker is registered and every model
        in `models` is covered; returns the last status. LaunchError naming what is missing,
        or the child that died meanwhile."""
        from blockllm.client.client import Client
        from blockllm.client.demux import require_covered
        from blockllm.client.errors import BlockLLMError

        assert self.endpoint is not None, "start_broker first"
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        missing: list[str] = list(self.workers)
        uncovered: list[str] = list(models or [])
        with Client(self.endpoint, keys_dir=keys_dir) as client:
            while True:
                self._raise_if_died(describe)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(BlockLLMError):
                    body = client.status(timeout=min(left, 5.0))
                    names = {w.get("name") for w in body.get("workers", [])}
                    missing = [n for n in self.workers if n not in names]
                    uncovered = require_covered(body, models) if models is not None else []
                    if not missing and not uncovered:
                        return body
                # A bounded poll interval that ends early when a child dies.
                sentinels = [p.sentinel for p in self._children() if self.exitcode(p) is None]
                multiprocessing.connection.wait(sentinels, timeout=min(0.1, max(left, 0)))
        parts = [f"workers not registered: {', '.join(missing)}"] if missing else []
        if uncovered:
            parts.append(f"models not covered: {few(uncovered)}")
        detail = "; ".join(parts) or "broker did not answer STATUS"
        loading = "".join(f"\n  {n}: {d}" for n, d in (describe or {}).items() if n in missing)
        raise LaunchError(
            f"not ready after {timeout:.0f} s ({detail}){loading}\nworkers load their stages from"
            " the zoo and verify block hashes first: raise --ready-timeout if that is slow"
        )

    def _raise_if_died(self, describe: dict[str, str] | None) -> None:
        for p in self._children():
            code = self.exitcode(p)
            if code is not None and id(p) not in self._expected:
                what = (describe or {}).get(p.name or "", "")
                raise LaunchError(
                    f"{Death(p.name or '?', p.pid, code)} while starting"
                    f"{f' ({what})' if what else ''}; see its log above"
                )

    def _children(self) -> list[BaseProcess]:
        return [*self._brokers, *self._workers, *self._planners, *self._https]

    # -- monitoring --------------------------------------------------------------------------
    def _start_monitor(self) -> None:
        if self._monitor is None:
            self._monitor = threading.Thread(
                target=self._watch, name="launcher-monitor", daemon=True
            )
            self._monitor.start()

    def _watch(self) -> None:
        """Monitor thread: wait on the sentinels; report every unexpected exit once."""
        reported: set[int] = set()
        while not self._stopping.is_set():
            pending = [p for p in self._children() if id(p) not in reported]
            live = []
            for p in pending:
                code = self.exitcode(p)
                if code is None:
                    live.append(p.sentinel)
                    continue
                reported.add(id(p))
                if self._stopping.is_set() or id(p) in self._expected:
                    continue
                death = Death(p.name or "?", p.pid, code)
                self.deaths.append(death)
                logger.error("[dead] %s", death)
                if self.on_death is not None:
                    self.on_death(death)
            # timeout: children started meanwhile join the watch within a second
            ready = multiprocessing.connection.wait([*live, self._wake.fd], timeout=1.0)
            for p in pending:
                if p.sentinel in ready:
                    self.wait_exit(p, 5.0)

    def exitcode(self, p: BaseProcess) -> int | None:
        """`p.exitcode`, serialised with the monitor thread (see `_lock`)."""
        with self._lock:
            return p.exitcode

    def wait_exit(self, p: BaseProcess | str, timeout: float) -> int | None:
        """Wait up to `timeout` s for a child (or worker name) to exit; its exit code or None."""
        proc = self.workers[p] if isinstance(p, str) else p
        if not multiprocessing.connection.wait([proc.sentinel], timeout):
            return None
        # The sentinel fires when the child's files close, a moment before it can be reaped:
        # join() then waits for that moment (a non-blocking poll could still see None).
        with self._lock:
            proc.join(timeout)
            return proc.exitcode

    # -- stopping ----------------------------------------------------------------------------
    def stop(self, timeout: float | None = None) -> None:
        """Stop everything: workers first (they drain and send DEAD), then the broker."""
        self._stopping.set()
        self._wake.wake()
        if self._monitor is not None:  # before stop_processes(): it polls the children itself
            self._monitor.join(timeout=5.0)
        t = self.stop_timeout if timeout is None else timeout
        logger.info("[shutdown] stopping %d workers and the broker", len(self._workers))
        stop_processes(self._https, t)  # first: no new requests
        stop_processes(self._planners, t)  # it must not react to the workers leaving
        stop_processes(self._workers, t)
        stop_processes(self._brokers, t)
        self._finalizer.detach()
        self._wake.close()

    def stop_planner(self, timeout: float | None = None) -> list[int | None]:
        """Stop the planner processes alone (SIGTERM -> join -> kill; the workers it spawned
        go with it), an expected exit; their exit codes."""
        self._expected.update(id(p) for p in self._planners)
        stop_processes(self._planners, self.stop_timeout if timeout is None else timeout)
        return [self.exitcode(p) for p in self._planners]

    def kill_planner(self, sig: int) -> None:
        """Send `sig` to the planner process(es), whose exit is then expected."""
        for p in self._planners:
            self._expected.add(id(p))
            if p.pid is not None and self.exitcode(p) is None:
                os.kill(p.pid, sig)

    def kill_worker(self, name: str, sig: int) -> None:
        """Send `sig` to one worker whose exit is then expected (not reported as a death)."""
        p = self.workers[name]
        self._expected.add(id(p))
        assert p.pid is not None
        os.kill(p.pid, sig)
