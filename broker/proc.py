"""BrokerProc: the broker's IO (one ROUTER, one thread, a zmq.Poller loop) around the pure
Broker, and `run_broker_process(cfg)`, the process entry point.

The loop only moves bytes: it reads `[identity, kind, header, tensor frames...]` with
`recv_multipart(copy=False)`, decodes the kind and header (`frames.decode_header`; tensor frames
are never decoded, only their byte sizes checked against the header), hands the message to the
Broker, and sends what the Broker returns, passing received tensor frames on as they are.
Sends never block: a full peer queue (EAGAIN) or a vanished peer (EHOSTUNREACH, from
ROUTER_MANDATORY) goes back to the Broker as `send_failed` / `peer_lost`.

Shutdown: SIGTERM/SIGINT (or `request_shutdown()` from any thread) sets a flag and writes to a
self-pipe the poller watches; the loop then refuses new work, lets running requests finish for
`drain_timeout_s`, fails the rest, and returns. A fatal error is logged and exits non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from blockllm.broker import frames
from blockllm.broker.broker import Broker, Out
from blockllm.broker.config import BrokerConfig
from blockllm.broker.fetch import catalog_document, serve_fetch
from blockllm.broker.gc_policy import GcPolicy
from blockllm.broker.lifecycle import (
    WakePipe,
    Watchdog,
    begin_drain,
    notify,
    on_stop_signals,
    start_process,
)
from blockllm.broker.models import ZooCatalog
from blockllm.broker.protocol import (
    MAX_TENSOR_BYTES,
    ROLE_KINDS,
    TENSOR_KINDS,
    Dead,
    Error,
    ErrorCode,
    Kind,
    Message,
    ProtocolError,
)
from blockllm.broker.ratelog import RateLimitedLog
from blockllm.broker.sockets import bound_endpoint, make_socket
from blockllm.broker.stats_send import StatsSender
from blockllm.broker.timings import clock

logger = logging.getLogger(__name__)

RECV_BATCH = 256  # messages read per poll wake-up before timers get a turn
# FETCH chunks served, their bytes, and the chunks asked for by registered workers
FETCH_COUNTERS = ("fetches", "fetch_bytes", "fetches_by_workers", "forbidden")
CLOSE_LINGER_MS = 1000  # the last errors to clients get this long to leave
STATS_HWM = 4  # a slow subscriber loses old snapshots, never slows the broker
# A refused peer retries its handshake every ~100 ms: log one failure per interval, count the rest.
HANDSHAKE_LOG_INTERVAL_S = 10.0


def stats_endpoint_for(cfg: BrokerConfig) -> str:
    """Where the STATS PUB binds: `cfg.stats_bind`, or the host of `cfg.bind` on port 0."""
    if cfg.stats_bind is not None:
        return cfg.stats_bind
    if not cfg.bind.startswith("tcp://"):
        return ""
    host = cfg.bind.removeprefix("tcp://").rsplit(":", 1)[0]
    return f"tcp://{host}:0"


def check_tensor_frames(msg: Message, body: Sequence[Any]) -> None:
    """ProtocolError unless every tensor frame has the byte size its header meta says."""
    if msg.KIND not in TENSOR_KINDS:
        return
    for meta, frame in zip(msg.tensors, body[2:], strict=True):
        want = frames.tensor_nbytes(meta)
        if want > MAX_TENSOR_BYTES:
            raise ProtocolError(f"tensor of {want} bytes exceeds the limit")
        got = len(frame.buffer) if hasattr(frame, "buffer") else len(frame)
        if got != want:
            raise ProtocolError(f"tensor frame has {got} bytes, header says {want}")


def is_decode_result(msg: Any) -> bool:
    """A RESULT of a decode step (past the first: the prefill; one position: a hidden state
    [1, D], or a sampled token): what the broker's `timings` sum for `bench pipeline
    --breakdown` (a replay's prefill past step 1 counts too: rare)."""
    return msg.step > 1 and (not msg.tensors or tuple(msg.tensors[0].shape[:1]) == (1,))


class BrokerProc:
    """Owns the context, the ROUTER and the wake-up pipe; `run()` on the thread that built it.

    `request_shutdown()` is the only method another thread or a signal handler may call.
    """

    def __init__(self, cfg: BrokerConfig, broker: Broker | None = None) -> None:
        self.cfg = cfg
        catalog = ZooCatalog(cfg.zoo_dir, cfg.eos_token_id) if cfg.zoo_dir else dict
        self.broker = broker or Broker(cfg, catalog, now=time.monotonic())
        for name in FETCH_COUNTERS:
            self.broker.counters.setdefault(name, 0)
        self._errors = RateLimitedLog(logger)  # what a peer's message broke, rate-limited
        self._refusals = RateLimitedLog(logger)  # messages a key's role may not send
        self._worker_keys: dict[bytes, str | None] = {}  # worker identity -> its READY's key
        self.ctx = zmq.Context()
        self._auth: Any = None
        self._handshakes: zmq.Socket | None = None  # failed CurveZMQ handshakes (keyless peers)
        self._handshake_logged: dict[str, tuple[float, int]] = {}  # reason -> (when, unlogged)
        self.sock: zmq.Socket | None = None
        self.pub: zmq.Socket | None = None
        self.endpoint = ""
        self.stats: StatsSender | None = None  # with `pub` (bind)
        self._catalog: tuple[int, bytes] | None = None  # (catalog_gen, document)
        self._wake = WakePipe()
        self.shutdown_requested = False
        self.prom: Any = None  # BrokerMetrics when --metrics-port is given
        self._prom_server: Any = None
        self.metrics_port: int | None = None
        self.gc_policy = GcPolicy()  # started by run_broker_process (its own process)

    # -- lifecycle ---------------------------------------------------------------------------
    def bind(self) -> str:
        """Bind the ROUTER; returns the real endpoint (tcp://127.0.0.1:0 -> the chosen port)."""
        curve = None
        if self.cfg.keys_dir:
            from blockllm.broker.security import load_server_keys, start_authenticator

            # the authenticator must run before the bind, or every CURVE client gets in
            self._auth = start_authenticator(self.ctx, self.cfg.keys_dir)
            curve = load_server_keys(self.cfg.keys_dir)
        self.sock = make_socket(self.ctx, zmq.ROUTER, self.cfg.bind, bind=True, curve=curve)
        if curve is not None:
            from blockllm.broker.security import watch_handshakes

            # a peer without keys never reaches the ZAP handler: only the monitor sees it
            self._handshakes = watch_handshakes(self.sock)
        self.endpoint = bound_endpoint(self.sock)
        stats = stats_endpoint_for(self.cfg)
        if stats:
            self.pub = make_socket(self.ctx, zmq.PUB, stats, bind=True, hwm=STATS_HWM, curve=curve)
            self.stats = StatsSender(self.cfg, self.broker, self.pub)
            self.broker.stats_endpoint = bound_endpoint(self.pub)
            logger.info("[ready] broker stats on %s", self.broker.stats_endpoint)
        if self.cfg.metrics_port is not None:
            from blockllm.broker import prom

            self.prom = prom.BrokerMetrics()
            self.broker.metrics.observer = self.prom
            self._prom_server, self.metrics_port = prom.serve(
                self.prom.registry, self.cfg.metrics_host, self.cfg.metrics_port
            )
        return self.endpoint

    def request_shutdown(self) -> None:
        """Ask the loop to drain and stop; async-signal-safe (a flag and a pipe write)."""
        self.shutdown_requested = True
        self._wake.wake()

    def close(self) -> None:
        """Close the socket before terminating the context (term blocks on open sockets)."""
        if self._handshakes is not None and self.sock is not None:
            from blockllm.broker.security import unwatch_handshakes

            unwatch_handshakes(self.sock, self._handshakes)
            self._handshakes = None
        if self.sock is not None:
            self.sock.close(linger=CLOSE_LINGER_MS)
            self.sock = None
        if self.pub is not None:
            self.pub.close(linger=0)
            self.pub = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._prom_server is not None:
            self._prom_server.shutdown()
            self._prom_server = None
        self.ctx.term()
        self._wake.close()

    def run(self) -> None:
        """The event loop; returns after a requested shutdown has drained."""
        if self.sock is None:
            self.bind()
        assert self.sock is not None
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake.fd, zmq.POLLIN)
        if self._handshakes is not None:
            poller.register(self._handshakes, zmq.POLLIN)
        next_tick = next_stats = 0.0
        drain_until: float | None = None
        watchdog = Watchdog()
        while True:
            watchdog.kick()
            timeout_ms = max(0.0, min(next_tick, next_stats) - time.monotonic()) * 1000
            if self.stats is not None and self.stats.busy:
                timeout_ms = 0  # a snapshot being encoded: a turn of it after the messages
            events = dict(poller.poll(timeout_ms))
            if self._wake.fd in events:
                self._wake.drain()
            if self.sock in events:
                self._recv_batch()
            if self._handshakes is not None and self._handshakes in events:
                self._on_handshake_failure()
            now = time.monotonic()
            if now >= next_tick:
                self._send(self.broker.tick(now))
                self.gc_policy.tick(now)
                next_tick = now + self.cfg.tick_s
                if self.prom is not None:
                    self.prom.update(self.broker)
            if self.stats is not None and self.stats.busy:
                self.stats.turn()  # (broker/stats_send.py: the snapshot over several turns)
            elif now >= next_stats:
                if self.stats is not None:
                    self.stats.build(now)
                next_stats = now + self.cfg.stats_interval_s
            if self.shutdown_requested:
                if drain_until is None:
                    drain_until = self._begin_shutdown(now)
                if self.broker.idle or now >= drain_until:
                    self._send(self.broker.abort_all(now, "broker shut down"))
                    logger.info("[shutdown] broker stopped (%s)", self._summary())
                    return

    def _on_handshake_failure(self) -> None:
        """A peer failed the CurveZMQ handshake (no keys, a wrong broker key): log it, at most
        once per reason and interval (the few reasons bound the table)."""
        from zmq.utils.monitor import recv_monitor_message

        from blockllm.broker.security import handshake_failure_reason

        assert self._handshakes is not None
        event = recv_monitor_message(self._handshakes)
        reason = handshake_failure_reason(event)
        if event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:  # we have keys, it not
            reason = "a peer without CurveZMQ keys (give it --keys DIR or BLOCKLLM_KEYS)"
        now = time.monotonic()
        last, unlogged = self._handshake_logged.get(reason, (-HANDSHAKE_LOG_INTERVAL_S, 0))
        if now - last < HANDSHAKE_LOG_INTERVAL_S:
            self._handshake_logged[reason] = (last, unlogged + 1)
            return
        more = f" (and {unlogged} more since {now - last:.0f} s ago)" if unlogged else ""
        logger.warning("[auth] refused a peer on %s: %s%s", self.endpoint, reason, more)
        self._handshake_logged[reason] = (now, 0)

    def _begin_shutdown(self, now: float) -> float:
        running, timeout = len(self.broker.requests), self.cfg.drain_timeout_s
        logger.info("[shutdown] draining %d requests (up to %.1fs)", running, timeout)
        deadline = begin_drain(running, timeout)
        self._send(self.broker.begin_shutdown(now))
        return deadline

    def _summary(self) -> str:
        c = self.broker.counters
        return ", ".join(f"{k}={c[k]}" for k in ("requests", "completed", "failed", "replays"))

    # -- messages ------------------------------------------------------------------------------
    def _recv_batch(self) -> None:
        assert self.sock is not None
        for _ in range(RECV_BATCH):
            try:
                parts = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(parts)

    def _on_message(self, parts: list[zmq.Frame]) -> None:
        """One message from a peer; never raises: whatever escapes is counted
        (`internal_errors`), logged rate-limited, and the message dropped."""
        try:
            self._handle_parts(parts)
        except Exception as e:
            self.broker.counters["internal_errors"] += 1
            peer = parts[0].bytes if parts else b""
            self._errors.log(
                type(e).__name__, "dropped a message from %r: %s: %s", peer, type(e).__name__, e
            )

    def _handle_parts(self, parts: list[zmq.Frame]) -> None:
        """Decode the envelope of one message and let the Broker handle it."""
        t0 = clock()
        peer = parts[0].bytes
        body = parts[1:]
        now = time.monotonic()
        try:
            msg = frames.decode_header(body)
            check_tensor_frames(msg, body)
            t1 = clock()
        except ProtocolError as e:
            self._send(self.broker.bad_message(peer, str(e), now))
            return
        if self._auth is not None and not self._allowed(peer, body[0], msg):
            return
        if msg.KIND is Kind.FETCH:
            self._serve_fetch(peer, msg, now)
            return
        try:
            outs = self.broker.handle(peer, msg, tuple(body[2:]), now)
        except Exception as e:  # a bug must cost one message, not the broker
            self._errors.log(
                f"{msg.KIND.name}:{type(e).__name__}",
                "internal error handling %s from %r: %s: %s",
                msg.KIND.name,
                peer,
                type(e).__name__,
                e,
            )
            self.broker.counters["internal_errors"] += 1
            rid = getattr(msg, "request_id", "")
            outs = [Out(peer, Error(rid, ErrorCode.INTERNAL.value, "internal broker error"))]
        t2 = clock()
        self._send(outs)
        if msg.KIND is Kind.RESULT and is_decode_result(msg):
            timings = self.broker.state.timings
            timings.add("decode", t1 - t0)
            timings.add("handle", t2 - t1)
            timings.add("send", clock() - t2)

    def _allowed(self, peer: bytes, first: Any, msg: Any) -> bool:
        """Whether the role of the sender's key (its connection's User-Id, set by our ZAP
        handler) may send `msg` (protocol.ROLE_KINDS); if not: ERROR(FORBIDDEN), a counter,
        and a rate-limited log line naming the key."""
        from blockllm.broker.security import ANY_ROLE, peer_role

        try:
            user_id = first.get("User-Id")
        except (zmq.ZMQError, AttributeError):  # no metadata: not a CurveZMQ connection
            user_id = None
        role, name = peer_role(user_id)
        if not self._same_key(peer, user_id, msg):
            return False
        if role == ANY_ROLE:
            if msg.KIND is Kind.READY:
                self._worker_keys[peer] = user_id
            return True
        allowed = msg.KIND in ROLE_KINDS[role]
        if allowed and msg.KIND is Kind.FETCH and role == "client":
            allowed = msg.what != "block"  # weights only to workers and the planner
        if allowed:
            if msg.KIND is Kind.READY:
                self._worker_keys[peer] = user_id
            return True
        self.broker.counters["forbidden"] += 1
        what = msg.KIND.name + (f" {msg.what}" if msg.KIND is Kind.FETCH else "")
        self._refusals.log(
            f"{name}:{what}", "[auth] refused %s from key %s (role %s)", what, name, role
        )
        rid = getattr(msg, "request_id", "") or getattr(msg, "command_id", "")
        text = f"key {name} (role {role}) may not send {what}"
        self._send([Out(peer, Error(rid, ErrorCode.FORBIDDEN.value, text))])
        return False

    def _same_key(self, peer: bytes, user_id: str | None, msg: Any) -> bool:
        """A registered worker's routing identity stays bound to the key it registered with.
        The ROUTER hands an identity over to a new connection (a restarted worker reclaims its
        name), so a message under a worker's identity from another key means someone took it:
        the worker is dropped (its requests replay; the real one re-registers) and the
        message refused."""
        if peer not in self.broker.workers:
            self._worker_keys.pop(peer, None)
            return True
        if msg.KIND is Kind.READY:  # (re-)registration: bound once its role is checked
            return True
        bound = self._worker_keys.get(peer, user_id)
        if bound == user_id:
            return True
        self.broker.counters["forbidden"] += 1
        self._refusals.log(
            f"{user_id}:identity",
            "[auth] key %s sent %s under worker identity %r registered by key %s: worker dropped",
            user_id,
            msg.KIND.name,
            peer[:64],
            bound,
        )
        del self._worker_keys[peer]
        now = time.monotonic()
        self._send(self.broker.handle(peer, Dead("identity taken by another key"), (), now))
        text = "this routing identity belongs to another key"
        self._send([Out(peer, Error("", ErrorCode.FORBIDDEN.value, text))])
        return False

    def _serve_fetch(self, peer: bytes, msg: Any, now: float) -> None:
        """A zoo read (broker/fetch.py): file IO, no routing state, one chunk per FETCH.

        Any peer that passed CurveZMQ may ask: a starting worker fetches over its own
        connection before its READY (it is not a worker here until then, so it is neither
        pinged nor routed to). From a registered worker it also proves the worker alive."""
        worker = self.broker.workers.get(peer)
        if worker is not None:
            worker.touch(now, self.cfg.expiry_s)
            self.broker.counters["fetches_by_workers"] += 1
        answer, data = serve_fetch(self.cfg.zoo_dir, msg, self._catalog_document)
        self.broker.counters["fetches"] += 1
        self.broker.counters["fetch_bytes"] += len(data or b"")
        self._send([Out(peer, answer, () if data is None else (data,))])

    def _catalog_document(self) -> bytes:
        """The planner's catalog (broker/fetch.py), built once per reload of the models."""
        state = self.broker.state
        if self._catalog is None or self._catalog[0] != state.catalog_gen:
            self._catalog = (state.catalog_gen, catalog_document(state.models, self.cfg.zoo_dir))
        return self._catalog[1]

    def _send(self, outs: list[Out]) -> None:
        """Send without blocking; failures go back to the Broker, whose answers are sent too."""
        assert self.sock is not None
        queue = deque(outs)
        while queue:
            out = queue.popleft()
            try:
                wire = frames.encode_passthrough(out.msg, out.frames)
            except (ValueError, TypeError, OverflowError):  # a broker bug: drop the message
                logger.exception("cannot encode %s for %r", out.msg.KIND.name, out.peer)
                self.broker.counters["internal_errors"] += 1
                continue
            try:
                self.sock.send_multipart([out.peer, *wire], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                logger.debug("send to %r would block: %s dropped", out.peer, out.msg.KIND.name)
                queue.extend(self.broker.send_failed(out.peer, out.msg, time.monotonic()))
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                logger.info("[dead] peer %r unreachable", out.peer)
                queue.extend(self.broker.peer_lost(out.peer, time.monotonic()))


# -- the process -------------------------------------------------------------------------------


def _report_ready(cfg: BrokerConfig, endpoint: str) -> None:
    """Tell the launcher the bound endpoint (see BrokerConfig)."""
    logger.info("[ready] broker listening on %s", endpoint)
    notify("READY=1", f"STATUS=broker listening on {endpoint}")  # systemd Type=notify
    if cfg.ready_file:
        path = Path(cfg.ready_file)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(endpoint + "\n")
        os.replace(tmp, path)  # a reader sees the whole line or no file
    if cfg.ready_conn is not None:
        cfg.ready_conn.send_bytes(endpoint.encode())
        cfg.ready_conn.close()


def run_broker_process(cfg: BrokerConfig) -> None:
    """Entry point (a spawned child or the `blockllm broker` command): serve until SIGTERM.

    Returns normally (exit code 0) after a clean shutdown; on a fatal error logs it and exits
    with code 1. The launcher learns the endpoint through `cfg.ready_file` / `cfg.ready_conn`;
    if the broker fails before binding, `ready_conn` is closed without a message.
    """
    start_process(cfg.parent_pid, cfg.log_level)
    proc: BrokerProc | None = None
    try:
        proc = BrokerProc(cfg)
        # the models' tokenizers are loaded (and transformers with them): frozen; then the
        # collector's policy for the broker's own state (broker/gc_policy.py)
        proc.gc_policy.start()
        on_stop_signals(lambda _signum: proc.request_shutdown())
        endpoint = proc.bind()
        _report_ready(cfg, endpoint)
        proc.run()
    except Exception:
        logger.exception("[shutdown] broker failed")
        raise SystemExit(1) from None
    finally:
        if cfg.ready_conn is not None:
            with contextlib.suppress(OSError):
                cfg.ready_conn.close()
        if proc is not None:
            proc.close()
