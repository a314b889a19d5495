"""WorkerProc: the worker process around the engine — one IO thread, one compute loop.

    broker ROUTER ◄──DEALER── IOThread ──inbox (SimpleQueue)──► compute loop (main thread)
                              (socket owner)  ◄──outbox + wake pipe──  Worker.step() results

The IO thread (`proc_io.IOThread`) owns the DEALER socket: it validates messages, copies
tensors out of the zmq frames into a bounded inbox, sends what the compute loop queues
(zero-copy), answers the broker's pings with the latest load facts, and reconnects (capped
exponential backoff) when the broker is silent for `interval * liveness`, after which the
compute loop drops all KV and sends READY again (the broker replays those requests).

The main thread runs the engine (`Worker`) directly: it drains the inbox (blocking when idle),
submits FORWARDs, calls `step()`, and queues RESULT / ERROR messages. From a model's first
SPECULATE on, a `Speculation` (worker/speculate.py) wraps the engine. KV_EXPORT / KV_SHARD
(broker/migrate.py) export and import a request's KV of one stage between two steps
(worker/proc_kv.py builds the answers). systemd's watchdog is fed only while the IO and
loader threads are healthy too (`_healthy`).

Stages load in the background (`loader.StageLoader`): the loader thread fetches what the zoo
lacks over this worker's own connection (through the IO thread) and reads the weights; the
compute loop only installs them, between two steps, so requests on loaded stages keep going.
A stage is in READY only once installed (`proc_stages.StageTable`: the stages READY lists and
the commands that change them). At start the worker connects first (to fetch) and
sends its first READY once every configured stage is installed (then systemd hears READY=1).

Lifecycle (STYLE 7.8, broker/lifecycle.py): SIGTERM/SIGINT set a flag and wake the loop,
which tells systemd STOPPING=1, takes no new work, finishes in-flight items for up to
`grace_s`, sends DEAD("shutdown") and exits 0; a fatal error is logged, DEAD(reason) sent with
linger, exit 1. The test-only `fault_after_steps` hook exits 3 (crash) or raises.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import time
from collections.abc import Callable
from typing import Any

import torch

from blockllm.broker.lifecycle import (
    Watchdog,
    begin_drain,
    freeze_heap,
    on_stop_signals,
    restore_signals,
)
from blockllm.broker.protocol import (
    Dead,
    Error,
    ErrorCode,
    Forward,
    Kind,
    KvExport,
    KvShard,
    Release,
    Speculate,
)
from blockllm.broker.ratelog import RateLimitedLog
from blockllm.broker.timings import clock
from blockllm.worker.adapter_loads import AdapterLoads
from blockllm.worker.clock import StepClock
from blockllm.worker.config import EXIT_FATAL, EXIT_OK, WorkerProcConfig, maybe_fault
from blockllm.worker.errors import BrokerRejected, WorkerError
from blockllm.worker.facts import Facts
from blockllm.worker.groups import Groups
from blockllm.worker.loader import (
    AdapterJob,
    Loaded,
    LoadJob,
    StageLoader,
    build_engine,
    start_loader,
    unhealthy,
)
from blockllm.worker.messages import RETRYABLE, is_decode, result_message, work_item
from blockllm.worker.proc_io import Failed, Inbound, IOThread, IOThreadFailed, Reset, Wake
from blockllm.worker.proc_kv import export_kv, import_kv
from blockllm.worker.proc_stages import StageTable
from blockllm.worker.speculate import Speculation
from blockllm.worker.transfer import to_device

logger = logging.getLogger(__name__)


class WorkerProc:
    """The compute loop around one engine `Worker`; call from the process's main thread.

    `start()` connects and starts loading the configured stages (READY follows once they are
    installed); `run()` serves until a stop is requested (returns the exit code) and raises on
    a fatal error; `fail(reason)` and `close()` are the fatal path and the teardown.
    """

    def __init__(self, cfg: WorkerProcConfig, engine: Any = None) -> None:
        self.cfg = cfg
        self.name = cfg.name or f"{socket.gethostname()}-{os.getpid()}"
        self.engine = engine
        # what submits, steps and releases: the engine, or a Speculation around it once a
        # model speculates (`_handle_speculate`)
        self.runner: Any = engine
        self.inbox: queue.SimpleQueue[Inbound | Loaded] = queue.SimpleQueue()
        self.stop_requested = False
        self._known: set[str] = set()  # requests that may hold KV here (until RELEASE)
        self._last_step_s = 0.0
        self.facts = Facts(cfg.heartbeat_interval_s)
        self.prom: Any = None  # WorkerMetrics when --metrics-port is given
        self._prom_server: Any = None
        # the IO thread's view of the facts: the latest snapshot (one reference read)
        self.io = IOThread(cfg, self.name.encode(), self.inbox, lambda: self.facts.current)
        self.clock = StepClock(self.io.arrived)  # decode items' phases (worker/clock.py)
        self.groups = Groups(cfg.gather_fraction)  # pipelining groups (worker/groups.py)
        self.facts.timings = self.clock.timings
        self.loader: StageLoader | None = None
        self.adapter_loads = AdapterLoads.start(None, None)  # LoRA blocks off this thread
        # the stages READY lists, and LOAD_STAGE / UNLOAD_STAGE / SET_BATCH (proc_stages.py)
        self.stages = StageTable(self.name, cfg, self.io, lambda f: self._refresh_facts(force=f))
        self._unhealthy = ""  # why the watchdog is not fed now ("" = every loop is healthy)
        self.bad_messages = 0  # messages whose handling failed (dropped)
        self._bad_log = RateLimitedLog(logger)
        self._handlers: dict[Kind, Callable[[Any, list[torch.Tensor]], None]] = {
            Kind.FORWARD: self._handle_forward,
            Kind.RELEASE: self._handle_release,
            Kind.LOAD_STAGE: self.stages.handle_load_stage,
            Kind.UNLOAD_STAGE: self.stages.handle_unload_stage,
            Kind.SET_BATCH: self.stages.handle_set_batch,
            Kind.ERROR: self._handle_error,
            Kind.KV_EXPORT: self._handle_kv_export,
            Kind.KV_SHARD: self._handle_kv_shard,
            Kind.SPECULATE: self._handle_speculate,
        }

    # -- lifecycle ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Signal-handler safe: set the flag and wake the loop (SimpleQueue.put is reentrant)."""
        self.stop_requested = True
        self.inbox.put(Wake())

    def start(self) -> None:
        """Build the engine, connect, and queue the configured stages on the loader thread.

        The connection comes first (a new node fetches its blocks over it), READY only once
        every configured stage is installed (`_handle_loaded`): the broker neither routes to
        nor pings a worker that cannot serve yet. Raises on a bad setup (keys, metrics port).
        """
        if self.cfg.metrics_port is not None:
            from blockllm.broker import prom

            self.prom = prom.WorkerMetrics(self.name)
            self._prom_server, _port = prom.serve(
                self.prom.registry, self.cfg.metrics_host, self.cfg.metrics_port
            )
        if self.engine is None:
            self.engine = self.runner = build_engine(self.cfg)
        self.io.start()
        self.loader = start_loader(self.cfg, self.engine, self.io.fetch, self.inbox)
        self.adapter_loads = AdapterLoads.start(self.engine, self.loader)
        self.stages.engine, self.stages.loader = self.engine, self.loader
        for spec in self.cfg.stages:
            self.loader.submit(LoadJob(spec.model, spec.start, spec.end, startup=True))
        if not self.cfg.stages:
            self.stages.announce()

    def run(self) -> int:
        """Serve until a stop is requested; returns the exit code. Raises on a fatal error."""
        deadline: float | None = None
        watchdog = Watchdog()  # the compute loop wakes at least once a heartbeat interval
        while True:
            if self._healthy():
                watchdog.kick()
            if self.stop_requested and deadline is None:
                queued = self.engine.queued()
                logger.info("[shutdown] worker %s draining %d requests", self.name, queued)
                deadline = begin_drain(queued, self.cfg.grace_s)
            busy = self.engine.queued() > 0
            if deadline is not None and (not busy or time.monotonic() >= deadline):
                break
            if not busy:  # about to wait: make the facts a ping gets while idle exact
                self._refresh_facts(force=True)
            self._drain_inbox(block=not busy)
            if self.engine.queued():
                self._step()
            self._refresh_facts()
        if self.engine.queued():
            logger.warning(
                "[shutdown] worker %s: %d requests unfinished after %.1f s grace",
                self.name,
                self.engine.queued(),
                self.cfg.grace_s,
            )
        self.io.send(Dead("shutdown"))
        logger.info("[shutdown] worker %s stopped", self.name)
        return EXIT_OK

    def _healthy(self) -> bool:
        """Whether every loop of the process works: the IO thread runs and the loader thread
        has made progress within `loader_stall_s` (this loop is the caller). The watchdog is
        fed only then, so systemd restarts a worker whose loader hung; logged on change."""
        why = unhealthy(self.io, self.loader, self.cfg.loader_stall_s)
        if why != self._unhealthy:
            if why:
                logger.error("[watchdog] worker %s: %s; not feeding the watchdog", self.name, why)
            else:
                logger.warning("[watchdog] worker %s: healthy again", self.name)
            self._unhealthy = why
        return not why

    def fail(self, reason: str) -> None:
        """Fatal path: DEAD(reason) to the broker, with linger so it leaves before exit."""
        self.io.send_last(Dead(reason))

    def close(self) -> None:
        """Stop the loader and IO threads (flushing what is queued, and waiting until it left
        the process), drop the engine's memory.

        The loader is not joined: a load in progress ends with the process (daemon thread)."""
        if self.loader is not None:
            self.loader.stop()
        if self.io.is_alive():
            self.io.stop()
            self.io.join(timeout=self.cfg.dead_linger_ms / 1000 + 5)
        if not self.io.is_alive() and not self.io.deliver(self.cfg.dead_linger_ms / 1000 + 1):
            logger.warning("[shutdown] worker %s: messages to the broker may be lost", self.name)
        if self._prom_server is not None:
            self._prom_server.shutdown()
            self._prom_server = None
        self.engine = None

    # -- the loop ----------------------------------------------------------------------------
    def _drain_inbox(self, *, block: bool) -> None:
        """Handle every queued message; wait for the first one (up to a beat) when idle."""
        timeout = self.cfg.heartbeat_interval_s
        while True:
            try:
                item = self.inbox.get(timeout=timeout) if block else self.inbox.get_nowait()
            except queue.Empty:
                break
            block = False
            self._handle_item(item)
        self._gather()

    def _gather(self) -> None:
        """Wait briefly for a group to fill when the next step would run less than one.

        Requests of a pipeline come back from the other hops in bursts; a step that starts on
        the first arrivals leaves the rest for a step of their own, and the requests settle
        into many small batches (measured: ~4.7 of 16 per step over 2 workers). So while fewer
        than a group (worker/groups.py: the running requests over the route's hops) are
        queued, wait for more, at most a step's fixed cost as measured. Never at low load
        (one request: no wait).
        """
        target = self.groups.size(len(self._known))
        queued = self.engine.queued()
        if target is None or not 0 < queued < target or self.stop_requested:
            return
        if self._last_step_s <= 0:
            return
        deadline = time.monotonic() + self.groups.wait_s(self._last_step_s)
        while self.engine.queued() < target:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                item = self.inbox.get(timeout=left)
            except queue.Empty:
                return
            self._handle_item(item)

    def _handle_item(self, item: Inbound) -> None:
        if isinstance(item, Wake):
            return
        if isinstance(item, Reset):
            self._reset()
            return
        if isinstance(item, Failed):
            raise IOThreadFailed(f"IO thread failed: {item.error!r}") from item.error
        if isinstance(item, Loaded):
            self._handle_loaded(item)
            return
        msg, tensors = item
        handler = self._handlers.get(msg.KIND)
        if handler is None:
            self._bad_log.log(msg.KIND.name, "worker %s ignores %s messages", self.name, msg.KIND)
            return
        try:
            handler(msg, tensors)
        except BrokerRejected:
            raise
        except Exception as e:  # a peer's message must never take the worker down
            self.bad_messages += 1
            self._bad_log.log(
                f"{msg.KIND.name}:{type(e).__name__}",
                "worker %s dropped a %s (%d so far): %s: %s",
                self.name,
                msg.KIND.name,
                self.bad_messages,
                type(e).__name__,
                e,
            )

    def _step(self) -> None:
        t0, f0 = clock(), getattr(self.engine, "forward_s", 0.0)
        results = self.runner.step(self.groups.size(len(self._known)))
        if not results:
            return
        if self.cfg.fault_step_delay_s > 0:  # test-only straggler (STYLE 7.9)
            time.sleep(self.cfg.fault_step_delay_s)
        t1 = clock()
        self._last_step_s = t1 - t0
        self.groups.on_step(len(results), self._last_step_s)
        compute = getattr(self.engine, "forward_s", 0.0) - f0
        timed = self.clock.on_step(t0, t1, compute, results)
        self.facts.on_step(self._last_step_s, len(results))
        if self.prom is not None:
            self.prom.on_step(self._last_step_s, len(results))
        # Facts first: a ping answered after these results must not predate them.
        self._refresh_facts(force=not self.engine.queued())
        for r in results:
            self._answer(r, t1 if r.request_id in timed else 0.0)
        maybe_fault(self.cfg, self.facts.steps, self.name)

    def _answer(self, r: Any, step_end: float = 0.0) -> None:
        """Queue the message answering `r`; `step_end`: a timed decode item's step end."""
        self.io.send(*result_message(r), timed=bool(step_end))
        if step_end:
            self.clock.answered(step_end)

    # -- handlers (compute thread) -----------------------------------------------------------
    def _handle_forward(self, msg: Forward, tensors: list[torch.Tensor]) -> None:
        if self.stop_requested:  # draining: no new work; the broker reroutes it
            self._refuse(msg, ErrorCode.WORKER_LOST, "worker is shutting down", retryable=True)
            return
        if len(tensors) != 1:
            self._refuse(msg, ErrorCode.BAD_REQUEST, f"FORWARD needs 1 tensor, got {len(tensors)}")
            return
        if self.adapter_loads.waits(msg, tensors, self._refuse):
            return  # its LoRA blocks load on the loader thread (worker/adapter_loads.py)
        if not is_decode(msg, tensors[0]):
            self.io.arrived.pop(msg.request_id, None)
        try:
            self.runner.submit(work_item(msg, self._on_device(tensors[0])))
            self.clock.on_submit(msg.request_id)
            self.groups.on_forward(msg.request_id, msg.hops)
        except WorkerError as e:
            self._refuse(msg, ErrorCode(e.code.value), e.message, retryable=None)
            return
        except Exception as e:  # a peer's item must never take the worker down
            logger.exception("worker %s: submit of %s failed", self.name, msg.request_id)
            self._refuse(msg, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
            return
        self._known.add(msg.request_id)

    def _refuse(
        self, msg: Forward, code: ErrorCode, message: str, retryable: bool | None = False
    ) -> None:
        retry = code in RETRYABLE if retryable is None else retryable
        self.io.send(Error(msg.request_id, code.value, message, retryable=retry, step=msg.step))

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        return to_device(x, self.cfg.device)  # non-blocking from pinned memory (CUDA)

    def _handle_release(self, msg: Release, _tensors: list[torch.Tensor]) -> None:
        self.adapter_loads.drop(msg.request_id)
        self.runner.release(msg.request_id)
        self.clock.forget(msg.request_id)
        self.groups.forget(msg.request_id)
        self._known.discard(msg.request_id)

    def _handle_speculate(self, msg: Speculate, tensors: list[torch.Tensor]) -> None:
        """Start the hop on a predicted input (the previous hop's, frames as the broker got
        them) and keep the result for the real FORWARD. Never answered: one that cannot run
        is dropped, and the real FORWARD runs as without speculation."""
        if self.stop_requested or len(tensors) != 1 or not msg.tolerance >= 0:
            return
        if not isinstance(self.runner, Speculation):  # the first: wrap the engine from now on
            self.runner = Speculation(self.engine, tolerance=0.0, on_accept=self._answer)
            self.facts.spec = self.runner
        try:
            item = work_item(msg, self._on_device(tensors[0]))
            self.runner.speculate(item, tolerance=msg.tolerance)
        except WorkerError as e:  # best effort
            logger.debug("[speculate] %s step %d dropped: %s", msg.request_id, msg.step, e.message)
            return
        except Exception:
            logger.exception("[speculate] %s step %d failed", msg.request_id, msg.step)
            return
        self._known.add(msg.request_id)

    def _handle_kv_export(self, msg: KvExport, _tensors: list[torch.Tensor]) -> None:
        self.io.send(*export_kv(self.engine, msg))

    def _handle_kv_shard(self, msg: KvShard, tensors: list[torch.Tensor]) -> None:
        ack = import_kv(self.engine, msg, tensors, self.stop_requested)
        if ack.ok:  # it holds KV here now: released by RELEASE or a reset
            self._known.add(msg.request_id)
        self.io.send(ack)

    def _handle_error(self, msg: Error, _tensors: list[torch.Tensor]) -> None:
        if msg.code == ErrorCode.PROTOCOL_VERSION.value:
            raise BrokerRejected(f"broker rejected this worker: {msg.message}")
        if msg.code == ErrorCode.WORKER_LOST.value and not msg.request_id:
            # The broker does not know us (it restarted, or purged us): start over.
            logger.warning("worker %s: broker says %r; registering again", self.name, msg.message)
            self._reset()
            return
        logger.warning("worker %s: broker error %s: %s", self.name, msg.code, msg.message)

    # -- state shared with the broker --------------------------------------------------------
    def _handle_loaded(self, item: Loaded) -> None:
        """The loader read a stage (installed and announced by `stages`) or LoRA blocks."""
        if isinstance(item.job, AdapterJob):  # worker/adapter_loads.py
            self.adapter_loads.on_loaded(item, self._handle_forward, self._refuse)
            return
        self.stages.on_loaded(item)

    def _reset(self) -> None:
        """A new connection (each backoff attempt): drop all KV, announce again. The IO thread
        logs `[ready] reconnected` once the broker answers; the broker replays our requests."""
        for rid in self._known:
            self.runner.release(rid)
        if self._known:
            logger.info("[dead] worker %s dropped %d requests", self.name, len(self._known))
        self._known.clear()
        self.adapter_loads.clear()
        self.clock.clear()
        self.groups.clear()
        if self.stages.announced:  # else the first READY is still to come (stages loading)
            self.stages.send_ready()

    def _refresh_facts(self, *, force: bool = False) -> None:
        """Publish a load snapshot for the IO thread's heartbeats (while busy: twice a beat)."""
        if self.facts.refresh(self.engine, force=force) and self.prom is not None:
            models = {key: ref.model for key, ref in self.stages.refs.items()}
            self.prom.update(self.engine.stats(), models)
            self.prom.update_geometries(self.engine.kv.geometry_stats())


def run_worker_process(cfg: WorkerProcConfig) -> int:
    """Entry point of one worker process: serve until SIGTERM/SIGINT; returns the exit code
    (0 after a graceful stop, 1 after a fatal error, which also sends DEAD)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    freeze_heap()  # torch and transformers are imported; no block is loaded yet
    proc = WorkerProc(cfg)
    previous = on_stop_signals(lambda _signum: proc.request_stop())
    try:
        proc.start()
        return proc.run()
    except Exception as e:
        logger.exception("[dead] worker %s failed", proc.name)
        proc.fail(f"{type(e).__name__}: {e}")
        return EXIT_FATAL
    finally:
        proc.close()
        restore_signals(previous)
