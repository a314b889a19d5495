"""PlannerProc: the planner's IO (a SUB to the broker's stats, a DEALER for commands) around
the pure `Planner`, `run_planner_process(cfg)`, and `send_command` for one-shot tools.

    broker PUB ──STATS──► SUB ┐
                              ├ PlannerProc loop (one thread, zmq.Poller) ─► Planner.on_stats
    broker ROUTER ◄─DEALER────┘   commands out, ACKs in (logged)

The stats endpoint is `cfg.stats`, or what the broker's STATUS reports (`stats_endpoint`),
asked for at start with a deadline. A stats message is handled when it arrives; commands go
out without blocking (a broker that stopped reading loses them, and the next snapshot, which
still shows the old state, makes the planner send them again once their time is up).
Shutdown: SIGTERM/SIGINT set a flag and wake the loop; it closes its sockets and returns 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from blockllm.broker import frames
from blockllm.broker.lifecycle import (
    WakePipe,
    Watchdog,
    freeze_heap,
    notify,
    on_stop_signals,
    start_process,
)
from blockllm.broker.planner.catalog import BrokerCatalog
from blockllm.broker.planner.config import PlannerConfig
from blockllm.broker.planner.notes import uncovered_notes
from blockllm.broker.planner.planner import Planner
from blockllm.broker.planner.spawn import Spawner
from blockllm.broker.protocol import (
    Ack,
    Error,
    ErrorCode,
    Kind,
    Message,
    PlannerReport,
    ProtocolError,
    Stats,
    StatsBody,
    StatsDelta,
    Status,
    StatusRequest,
)
from blockllm.broker.sockets import make_socket
from blockllm.broker.stats_delta import StatsView

logger = logging.getLogger(__name__)

HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
EXIT_REFUSED = 78  # the key is refused: a configuration error (systemd does not restart it)
STATS_HWM = 4  # old snapshots are worth nothing: keep only a few
STATS_SILENCE_S = 10.0  # no snapshot for this long: ask the broker where its stats are again
REPORT_EVERY_S = 3.0  # PLANNER_REPORT at least this often (broker: PLANNER_STALE_S)


WILDCARDS = ("0.0.0.0", "*", "::", "[::]")


def reachable(advertised: str, broker: str) -> str:
    """The STATS endpoint to dial: a wildcard host (a broker bound to every interface
    advertises tcp://0.0.0.0:PORT) becomes the host we reach the broker by."""
    if not advertised.startswith("tcp://") or not broker.startswith("tcp://"):
        return advertised
    host, _, port = advertised.removeprefix("tcp://").rpartition(":")
    if host not in WILDCARDS:
        return advertised
    broker_host = broker.removeprefix("tcp://").rpartition(":")[0]
    return f"tcp://{broker_host}:{port}"


def _curve(keys_dir: str | None) -> Any:
    if not keys_dir:
        return None
    from blockllm.broker.security import load_client_keys

    return load_client_keys(keys_dir, role="planner")


def send_command(
    broker: str, msg: Message, timeout: float = 10.0, keys_dir: str | None = None
) -> Ack:
    """Send one command to the broker and return its ACK (TimeoutError when none comes)."""
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER, broker, bind=False, curve=_curve(keys_dir))
    try:
        deadline = time.monotonic() + timeout
        # bounded: with no connection (a refused key) a blocking send would wait forever
        if not sock.poll(int(timeout * 1000) + 1, zmq.POLLOUT):
            raise TimeoutError(f"no connection to the broker at {broker} within {timeout:.0f} s")
        try:
            sock.send_multipart(frames.encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise TimeoutError(f"no connection to the broker at {broker}") from None
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            reply, _ = frames.decode(sock.recv_multipart())
            if isinstance(reply, Ack) and reply.command_id == getattr(msg, "command_id", ""):
                return reply
            if isinstance(reply, Error) and reply.code == ErrorCode.FORBIDDEN.value:
                return Ack(reply.request_id, False, reply.message)  # this key's role may not
        raise TimeoutError(f"no answer from the broker at {broker} within {timeout:.0f} s")
    finally:
        sock.close(linger=0)
        ctx.term()


class Refused(RuntimeError):
    """The broker refused the planner's CurveZMQ key (a failed handshake)."""


class Stopped(RuntimeError):
    """SIGTERM/SIGINT arrived while the planner was still connecting."""


class PlannerProc:
    """Owns the context and both sockets; `run()` on the thread that built it.

    `request_shutdown()` is the only method another thread or a signal handler may call.
    """

    def __init__(self, cfg: PlannerConfig, planner: Planner | None = None) -> None:
        self.cfg = cfg
        self.spawner = Spawner(cfg)  # the workers the planner's SpawnPolicy asks for
        self.ctx = zmq.Context()
        self._curve = _curve(cfg.keys_dir)
        # the models to place: the broker's (broker/planner/catalog.py); --zoo only names the
        # zoo of the workers it spawns
        self.catalog = BrokerCatalog(self.ctx, cfg.broker, self._curve)
        self.planner = planner or Planner(cfg, self.catalog)
        identity = f"planner-{os.getpid()}".encode()
        # the monitor is attached before the connect: a refused key is seen on the first try
        placeholder = f"inproc://blockllm-planner-{os.getpid()}"
        self.dealer = make_socket(
            self.ctx, zmq.DEALER, placeholder, bind=False, identity=identity, curve=self._curve
        )
        self.dealer.disconnect(placeholder)
        self.monitor = self.dealer.get_monitor_socket(HANDSHAKE_EVENTS)
        self.dealer.connect(cfg.broker)
        self.handshake_failure = ""  # why the broker refused our key ("": it did not)
        self.sub: zmq.Socket | None = None
        self._wake = WakePipe()
        self.shutdown_requested = False
        self.sent = 0
        self.refused = 0
        self._last_stats = time.monotonic()
        self.stats_view = StatsView()  # full STATS + STATS_DELTA -> bodies (stats_delta.py)
        self._notes: dict[str, str] | None = None  # the last PLANNER_REPORT sent, and when
        self._reported = -REPORT_EVERY_S
        self.prom: Any = None  # PlannerMetrics when metrics_port is set (start_metrics)
        self._prom_server: Any = None

    def start_metrics(self) -> int | None:
        """Serve the planner's metrics if configured; returns the bound port (or None)."""
        if self.cfg.metrics_port is None or self._prom_server is not None:
            return None
        from blockllm.broker import prom

        self.prom = prom.PlannerMetrics()
        self._prom_server, port = prom.serve(
            self.prom.registry, self.cfg.metrics_host, self.cfg.metrics_port
        )
        return port

    def request_shutdown(self) -> None:
        self.shutdown_requested = True
        self._wake.wake()

    def connect_stats(self) -> str:
        """Subscribe to the broker's STATS (asking its STATUS for the endpoint if not given)."""
        endpoint = self.cfg.stats or reachable(self._ask_stats_endpoint(), self.cfg.broker)
        self.sub = make_socket(
            self.ctx, zmq.SUB, endpoint, bind=False, hwm=STATS_HWM, curve=self._curve
        )
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._last_stats = time.monotonic()
        logger.info("[ready] planner: commands to %s, stats from %s", self.cfg.broker, endpoint)
        return endpoint

    def _ask_stats_endpoint(self) -> str:
        """The broker's STATS endpoint from its STATUS; every wait bounded and interruptible.

        Raises Refused (the broker refused our key), Stopped (SIGTERM meanwhile), TimeoutError
        or RuntimeError (a broker that publishes no stats)."""
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        ask = frames.encode(StatusRequest("planner"))
        sent = False
        while time.monotonic() < deadline:
            self._check_handshake()
            if self.shutdown_requested:
                raise Stopped("stop requested while waiting for the broker")
            if not sent:
                try:  # NOBLOCK: with no connection yet (or a refused key) a send would hang
                    self.dealer.send_multipart(ask, flags=zmq.NOBLOCK)
                    sent = True
                except zmq.Again:
                    pass
            ready = dict(self._poller().poll(1000))
            if self._wake.fd in ready:
                self._wake.drain()
            if self.dealer not in ready:
                sent = False  # ask again: the first question may have gone nowhere
                continue
            try:
                msg, _ = frames.decode(self.dealer.recv_multipart(zmq.NOBLOCK))
            except (zmq.Again, ProtocolError):
                continue
            if isinstance(msg, Status) and msg.body.stats_endpoint:
                return msg.body.stats_endpoint
            if msg.KIND is Kind.STATUS:
                raise RuntimeError(f"the broker at {self.cfg.broker} publishes no stats")
        self._check_handshake()
        raise TimeoutError(
            f"no STATUS from the broker at {self.cfg.broker} within {self.cfg.ready_timeout_s} s"
        )

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in (self.dealer, self.monitor):
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake.fd, zmq.POLLIN)
        return poller

    def _check_handshake(self) -> None:
        """Raise Refused once the monitor reports a failed handshake (a refused key)."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            ok = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            self.handshake_failure = "" if ok else zmq.Event(event).name
        if self.handshake_failure:
            raise Refused(
                f"the broker at {self.cfg.broker} refused this planner's key "
                f"({self.handshake_failure}): admit its client.key on the broker node "
                "(`blockllm keys add`), or pass the --keys folder the broker admits"
            )

    def close(self) -> None:
        self.spawner.close()  # first: no spawned worker outlives the planner
        if self._prom_server is not None:
            self._prom_server.shutdown()
            self._prom_server = None
        self.catalog.close()
        self.dealer.disable_monitor()
        for sock in (self.sub, self.dealer, self.monitor):
            if sock is not None:
                sock.close(linger=0)
        self.ctx.term()
        self._wake.close()

    def run(self) -> None:
        """The loop; returns after a requested shutdown."""
        if self.sub is None:
            self.connect_stats()
        assert self.sub is not None
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self._wake.fd, zmq.POLLIN)
        watchdog = Watchdog()
        while not self.shutdown_requested:
            watchdog.kick()
            events = dict(poller.poll(1000))
            if self._wake.fd in events:
                self._wake.drain()
            if self.dealer in events:
                self._drain_acks()
            if self.sub in events:
                self._on_stats()
            for name, code in self.spawner.reap():
                self.planner.spawns.exited(name, code, time.monotonic())
            if time.monotonic() - self._last_stats > STATS_SILENCE_S and not self.cfg.stats:
                poller.unregister(self.sub)
                self._resubscribe()
                poller.register(self.sub, zmq.POLLIN)
        notify("STOPPING=1")
        logger.info("[shutdown] planner stopped (%d commands sent)", self.sent)

    def _resubscribe(self) -> None:
        """The stats went silent (a restarted broker publishes elsewhere): subscribe anew."""
        logger.warning("[planner] no stats for %.0f s: asking the broker again", STATS_SILENCE_S)
        self._last_stats = time.monotonic()
        try:
            endpoint = reachable(self._ask_stats_endpoint(), self.cfg.broker)
        except (TimeoutError, RuntimeError) as e:  # keep the old subscription; ask again later
            if isinstance(e, Stopped):
                return
            logger.warning("[planner] %s", e)
            return
        assert self.sub is not None
        self.sub.close(linger=0)
        self.sub = make_socket(
            self.ctx, zmq.SUB, endpoint, bind=False, hwm=STATS_HWM, curve=self._curve
        )
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        logger.info("[ready] planner: stats from %s", endpoint)

    def _latest_stats(self) -> Stats | None:
        """The newest snapshot waiting, as a full body (older ones are skipped: they are out
        of date; a STATS_DELTA is applied to the last full STATS, or skipped until one came)."""
        assert self.sub is not None
        latest: Stats | StatsDelta | None = None
        while True:
            try:
                parts = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg, _ = frames.decode(parts)
            except ProtocolError as e:
                logger.warning("[planner] bad stats message: %s", e)
                continue
            if isinstance(msg, Stats):
                body = self.stats_view.full(msg)  # None until the last part of one in parts
                if body is not None:
                    latest = msg if msg.parts <= 1 else Stats(msg.seq, body)
            elif isinstance(msg, StatsDelta):
                latest = msg
        if isinstance(latest, StatsDelta):
            try:
                body = self.stats_view.apply(latest)
            except ProtocolError as e:
                logger.warning("[planner] bad stats delta: %s", e)
                return None
            return None if body is None else Stats(latest.seq, body)
        return latest

    def _on_stats(self) -> None:
        msg = self._latest_stats()
        if msg is None:
            return
        self._last_stats = time.monotonic()
        try:
            commands = self.planner.on_stats(msg.body, time.monotonic())
        except Exception:  # a policy bug costs one snapshot, not the planner
            logger.exception("[planner] failed on stats %d", msg.seq)
            return
        if self.prom is not None:
            self.prom.on_stats(msg.body, commands)
        for cmd in commands:
            with contextlib.suppress(zmq.Again):
                self.dealer.send_multipart(frames.encode(cmd), flags=zmq.NOBLOCK)
                self.sent += 1
        self._report(msg.body)
        self.spawner.apply(self.planner.spawns.take())

    def _report(self, body: StatsBody) -> None:
        """PLANNER_REPORT: why models are uncovered, when that changes and every few seconds
        (the broker also reads it as "a planner is connected")."""
        try:
            notes = uncovered_notes(self.planner, body)
        except Exception:  # a bug in the notes must not stop the planning
            logger.exception("[planner] notes failed")
            return
        now = time.monotonic()
        if notes == self._notes and now - self._reported < REPORT_EVERY_S:
            return
        with contextlib.suppress(zmq.Again):
            self.dealer.send_multipart(frames.encode(PlannerReport(notes)), flags=zmq.NOBLOCK)
            self._notes, self._reported = notes, now

    def _drain_acks(self) -> None:
        while True:
            try:
                parts = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg, _ = frames.decode(parts)
            except ProtocolError as e:
                logger.warning("[planner] bad message from the broker: %s", e)
                continue
            if isinstance(msg, Ack) and not msg.ok:
                self.refused += 1
                if self.prom is not None:
                    self.prom.refused.inc()
                logger.warning("[planner] command %s refused: %s", msg.command_id, msg.message)
            elif isinstance(msg, Ack):
                logger.debug("[planner] command %s: %s", msg.command_id, msg.message)


def run_planner_process(cfg: PlannerConfig) -> int:
    """Entry point (a spawned child or `blockllm planner`): plan until SIGTERM/SIGINT.

    Returns 0 after a clean stop, 1 after a fatal error (logged)."""
    start_process(cfg.parent_pid, cfg.log_level)
    proc: PlannerProc | None = None
    try:
        proc = PlannerProc(cfg)
        freeze_heap()
        on_stop_signals(lambda _signum: proc.request_shutdown())
        proc.start_metrics()
        stats = proc.connect_stats()
        notify("READY=1", f"STATUS=planning: commands to {cfg.broker}, stats from {stats}")
        proc.run()
        return 0
    except Stopped:
        logger.info("[shutdown] planner stopped before it reached the broker")
        return 0
    except Refused as e:
        logger.error("[shutdown] %s", e)
        return EXIT_REFUSED
    except TimeoutError as e:  # no broker there: one line, not a traceback
        logger.error(
            "[shutdown] planner: %s; is a broker running there? (`blockllm broker` logs "
            "'[ready] broker listening on ADDR'; give that ADDR as --broker)",
            e,
        )
        return 1
    except Exception:
        logger.exception("[shutdown] planner failed")
        return 1
    finally:
        if proc is not None:
            proc.close()
