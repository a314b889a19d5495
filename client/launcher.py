"""Process supervision for `blockllm serve` (and the multi-process tests): one pattern for all.

STYLE 7.8, in order:
1. children start with `multiprocessing.get_context("spawn")` (torch is not fork-safe);
2. a child's first lines arm PR_SET_PDEATHSIG (SIGTERM: it drains and exits when the launcher
   dies, even by SIGKILL) and re-check `os.getppid()` against the pid read before spawning, name
   the process, configure logging, start their own process group (a terminal's Ctrl-C reaches
   only the launcher, which stops the children in order), then call `run_<name>_process(cfg)`;
3. handshake: the broker reports its bound endpoint through a one-way pipe (UTF-8 bytes, no
   pickle); workers are ready when the broker's STATUS lists them and covers every model;
   both waits are bounded and fail with an actionable message, and a child that dies while we
   wait is reported at once;
4. a monitor thread watches the children's sentinels and reports any that exits unexpectedly;
5. cleanup is the module-level `shutdown(procs, timeout)` (terminate -> join until the deadline
   -> kill the process tree with psutil), registered with `weakref.finalize` on the
   `Launcher`; teardown order is workers first, then the broker.
Steps 2 and 5 live in client/children.py (re-exported here).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from typing import Any

from blockllm.client.children import _child_main, _shutdown_groups, shutdown
from blockllm.client.children import arm_parent_death as arm_parent_death  # re-exported
from blockllm.client.children import kill_tree as kill_tree  # re-exported
from blockllm.client.children import set_process_name as set_process_name  # re-exported

logger = logging.getLogger(__name__)

SPAWN = multiprocessing.get_context("spawn")
BROKER_TARGET = "blockllm.broker.proc:run_broker_process"
WORKER_TARGET = "blockllm.worker.proc:run_worker_process"
PLANNER_TARGET = "blockllm.broker.planner_proc:run_planner_process"
HTTP_TARGET = "blockllm.client.http.server:run_http_process"


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
        self.http_url: str | None = None
        self._stopping = threading.Event()
        # multiprocessing's Process.exitcode reaps with waitpid and is not thread-safe: two
        # threads polling one child can make one of them see None for a dead child.
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._expected: set[int] = set()  # id() of children whose exit is not a failure
        self._monitor: threading.Thread | None = None
        # The planner, workers, then the broker: the lists are filled as children start.
        groups = [self._https, self._planners, self._workers, self._brokers]
        self._finalizer = weakref.finalize(
            self, _shutdown_groups, groups, stop_timeout, self._stopping
        )

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- starting ----------------------------------------------------------------------------
    def _spawn(self, name: str, target: str, cfg: Any) -> BaseProcess:
        proc = SPAWN.Process(
            target=_child_main,
            args=(target, cfg, os.getpid(), name, self.log_level),
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
        proc = self._spawn(name, WORKER_TARGET, cfg)
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
        proc = self._spawn("http", HTTP_TARGET, replace(cfg, ready_conn=send))
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
        from blockllm.client.core import require_covered
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
            parts.append(f"models not covered: {', '.join(uncovered)}")
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
            ready = multiprocessing.connection.wait([*live, self._wake_r], timeout=1.0)
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
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._monitor is not None:  # before shutdown(): it polls the children itself
            self._monitor.join(timeout=5.0)
        t = self.stop_timeout if timeout is None else timeout
        logger.info("[shutdown] stopping %d workers and the broker", len(self._workers))
        shutdown(self._https, t)  # first: no new requests
        shutdown(self._planners, t)  # it must not react to the workers leaving
        shutdown(self._workers, t)
        shutdown(self._brokers, t)
        self._finalizer.detach()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop_planner(self, timeout: float | None = None) -> list[int | None]:
        """Stop the planner processes alone (SIGTERM -> join -> kill; the workers it spawned
        go with it), an expected exit; their exit codes."""
        self._expected.update(id(p) for p in self._planners)
        shutdown(self._planners, self.stop_timeout if timeout is None else timeout)
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


# -- blockllm serve ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """One machine's cluster: a broker and `workers` workers over the zoo at `zoo_dir`.

    `broker` (a BrokerConfig) and `worker` (a WorkerProcConfig) are templates: the launcher
    fills in the endpoint, each worker's name, stages and thread count.
    """

    zoo_dir: str
    broker: Any
    worker: Any
    workers: int = 2
    models: tuple[str, ...] = ()  # () = every model in the zoo
    threads: int | None = None  # per worker; None = the usable cores split across workers
    ready_timeout_s: float = 120.0
    log_level: str = "WARNING"
    planner: Any = None  # a PlannerConfig: started once the cluster is ready; None = no planner
    http: Any = None  # an HttpConfig: the OpenAI-compatible API, started last; None = none


@dataclass(frozen=True, slots=True)
class Serving:
    """What `run_serve` announces once everything is ready."""

    endpoint: str
    models: tuple[str, ...]
    workers: tuple[tuple[str, int, tuple[str, ...]], ...]  # (name, pid, stages)
    http: str = ""  # the HTTP API's base URL ("": none)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while the cluster was still starting."""


def plan_workers(cfg: ServeConfig) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """(models served, stages of each worker) by static placement over the zoo's manifests."""
    from blockllm.broker.placement import static_placement
    from blockllm.worker.config import StageSpec
    from blockllm.zoo import Zoo

    zoo = Zoo(cfg.zoo_dir)
    known = zoo.list_models()
    models = cfg.models or tuple(known)
    unknown = [m for m in models if m not in known]
    if not models or unknown:
        have = ", ".join(known) or "none"
        what = f"unknown models {', '.join(unknown)}" if unknown else "no models"
        raise LaunchError(
            f"{what} in zoo {cfg.zoo_dir} (it has: {have}); import one with "
            "`blockllm zoo import PATH --name NAME`"
        )
    plan = static_placement([ComputeWeighted(zoo.manifest(m)) for m in models], cfg.workers)
    return tuple(models), [tuple(StageSpec(*s) for s in stages) for stages in plan]


class ComputeWeighted:
    """A manifest whose `block_bytes` estimate each position's compute per token, so that
    `static_placement` (which balances `block_bytes`) balances the pipeline's step times.

    Stored bytes mislead at both ends of a chain: the embedding is a lookup (a big block,
    almost no compute), while the head's lm_head matmul costs vocab x hidden multiply-adds
    per token even when it is tied (a tiny stored block). Decoder layers cost their weights.
    """

    def __init__(self, manifest: Any) -> None:
        self._m = manifest
        self.name = manifest.name
        self.chain = manifest.chain
        self.fingerprint = manifest.fingerprint

    @property
    def block_bytes(self) -> tuple[int, ...]:
        stored = tuple(self._m.block_bytes)
        if len(stored) != len(self.chain):
            return stored  # sizes unknown: placement balances by block count
        cfg = self._m.config
        itemsize = 2 if self._m.dtype in ("bfloat16", "float16") else 4
        lm_head = int(cfg.get("vocab_size", 0)) * int(cfg.get("hidden_size", 0)) * itemsize
        embed = max(1, int(cfg.get("hidden_size", 0)) * itemsize)  # one row read per token
        return (embed, *stored[1:-1], stored[-1] + (lm_head if self._m.tie_word_embeddings else 0))


def default_threads(workers: int) -> int:
    """torch threads per worker: the usable cores split evenly (at least one each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


def spare_worker_args(wcfg: Any, threads: int) -> tuple[str, ...]:
    """The `blockllm worker` flags of a worker the planner spawns (broker/spawn.py): those of
    serve's own workers (the planner adds --broker, --zoo, --keys and --name)."""
    args = ["--device", wcfg.device, "--kv-budget", str(wcfg.kv_budget_bytes)]
    args += ["--max-batch-size", str(wcfg.max_batch_size), "--threads", str(threads)]
    args += ["--max-batch-tokens", str(wcfg.max_batch_tokens)]
    args += ["--heartbeat-interval", str(wcfg.heartbeat_interval_s), "--grace", str(wcfg.grace_s)]
    if wcfg.memory_budget_bytes:
        args += ["--memory-budget", str(wcfg.memory_budget_bytes)]
    return tuple(args)


def run_serve(cfg: ServeConfig, announce: Callable[[Serving], None]) -> int:
    """Start the cluster, call `announce` once it is ready, run until SIGINT/SIGTERM (-> 0)
    or a child's unexpected death (-> 1). Raises LaunchError if it cannot start; returns
    130 when interrupted while starting. Main thread only (signal handlers)."""
    models, plan = plan_workers(cfg)
    wake_r, wake_w = os.pipe()
    state = {"serving": False, "stop": False}

    def on_signal(signum: int, _frame: Any) -> None:
        state["stop"] = True
        with contextlib.suppress(OSError):
            os.write(wake_w, b"s")
        if not state["serving"]:
            raise Interrupted(signal.Signals(signum).name)

    def on_death(_death: Death) -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, b"d")

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in sigs}
    launcher = Launcher(log_level=cfg.log_level, on_death=on_death)
    try:
        serving = _start_cluster(launcher, cfg, models, plan)
        state["serving"] = True
        if state["stop"]:
            return 0
        announce(serving)
        while not state["stop"] and not launcher.deaths:
            multiprocessing.connection.wait([wake_r])
            os.read(wake_r, 64)
        if launcher.deaths:
            logger.error("[shutdown] stopping: %s", "; ".join(map(str, launcher.deaths)))
            return 1
        logger.info("[shutdown] signal received; stopping")
        return 0
    except Interrupted as e:
        logger.warning("[shutdown] %s while starting; stopping", e)
        return 130
    finally:
        state["serving"] = True  # no Interrupted from here on: the teardown must finish
        launcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)


def _start_cluster(
    launcher: Launcher, cfg: ServeConfig, models: tuple[str, ...], plan: list[tuple[Any, ...]]
) -> Serving:
    endpoint = launcher.start_broker(cfg.broker, cfg.ready_timeout_s)
    threads = cfg.threads or default_threads(sum(1 for p in plan if p))
    describe: dict[str, str] = {}
    for i, stages in enumerate(plan):
        if not stages:
            continue  # more workers than chain positions
        name = f"worker-{i}"
        wcfg = replace(cfg.worker, broker=endpoint, name=name, stages=stages, threads=threads)
        launcher.start_worker(name, wcfg)
        describe[name] = "stages " + ", ".join(map(str, stages))
    launcher.wait_ready(list(models), cfg.ready_timeout_s, describe, cfg.worker.keys_dir)
    if cfg.planner is not None:  # it refines the static placement from the live stats
        spare = spare_worker_args(cfg.worker, threads)
        launcher.start_planner(
            replace(cfg.planner, broker=endpoint, zoo_dir=cfg.zoo_dir, spawn_worker_args=spare)
        )
    workers = tuple(
        (name, p.pid or 0, tuple(describe[name].removeprefix("stages ").split(", ")))
        for name, p in launcher.workers.items()
    )
    http = ""
    if cfg.http is not None:  # last: its ready line means every model answers over HTTP
        http = launcher.start_http(replace(cfg.http, broker=endpoint), cfg.ready_timeout_s)
    return Serving(endpoint, models, workers, http)
