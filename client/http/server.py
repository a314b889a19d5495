"""`run_http_process(cfg)`: the `blockllm http` process (uvicorn serving `create_app(cfg)`).

Lifecycle (STYLE 7.8, docs/internals.md): uvicorn owns SIGINT/SIGTERM (stop accepting, finish
the open responses for a few seconds, run the lifespan's teardown: the broker client is closed,
its in-flight requests cancelled) and its event loop (uvloop and httptools when installed);
once it listens, the bound "host:port" goes to `cfg.ready_conn` (the launcher of
`blockllm serve --http`) and READY=1 to systemd; WATCHDOG=1 from uvicorn's loop tick.
It listens (and is ready) only once the broker answered its first STATUS, waiting at most
`cfg.ready_timeout_s`. Exit codes: 0 after a signal, 1 on a failure (the port is taken, the
broker did not answer in time), 78 for a bad --api-keys file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from blockllm.broker.cluster_config import EXIT_CONFIG
from blockllm.broker.lifecycle import Watchdog, notify
from blockllm.client.http.apikeys import ApiKeysError
from blockllm.client.http.config import LOOPBACK_HOSTS, HttpConfig
from blockllm.client.http.tenants import BrokerNotAnswering

logger = logging.getLogger(__name__)

GRACEFUL_S = 5  # open streams get this long after SIGTERM before they are cut


def bound_port(server: Any) -> int:
    for s in server.servers:
        for sock in s.sockets:
            return int(sock.getsockname()[1])
    raise RuntimeError("uvicorn started without a listening socket")


class _QuietStartupFailure(logging.Filter):
    """Drops uvicorn's traceback of a start refused for a reason we log ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return BrokerNotAnswering.__name__ not in record.getMessage()


def _server_class() -> type:
    """uvicorn.Server that announces itself once listening and kicks systemd's watchdog."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: Any, cfg: HttpConfig, on_ready: Callable[[str], None] | None):
            super().__init__(config)
            self.cfg, self.on_ready = cfg, on_ready
            self.watchdog = Watchdog()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.should_exit or not self.servers:
                return
            port = bound_port(self)
            url = self.cfg.base_url(port)
            logger.info("[ready] OpenAI-compatible API at %s (broker %s)", url, self.cfg.broker)
            if self.cfg.ready_conn is not None:
                with contextlib.suppress(OSError):
                    self.cfg.ready_conn.send_bytes(f"{self.cfg.host}:{port}".encode())
                    self.cfg.ready_conn.close()
            notify("READY=1", f"STATUS=serving {url}")
            if self.on_ready is not None:
                self.on_ready(url)

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal once it stopped (the process then dies of
            # it, 143): a signal is the orderly stop here, exit 0
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

        async def on_tick(self, counter: int) -> bool:
            self.watchdog.kick()  # uvicorn's loop ticks every 0.1 s
            return await super().on_tick(counter)

        async def shutdown(self, sockets: Any = None) -> None:
            notify("STOPPING=1")
            await super().shutdown(sockets)

    return Server


def run_http_process(cfg: HttpConfig, on_ready: Callable[[str], None] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; the exit code (see the module docstring). `on_ready(url)`
    is called once it listens (the CLI prints the URL)."""
    import uvicorn

    from blockllm.client.http.app import create_app

    if cfg.open and cfg.host not in LOOPBACK_HOSTS:
        logger.warning(
            "[http] listening on %s without --api-keys: anyone who reaches this address can use "
            "every model; give --api-keys FILE (blockllm keys api-add) or bind 127.0.0.1",
            cfg.host,
        )
    try:
        app = create_app(cfg)
    except ApiKeysError as e:
        logger.error("[dead] %s", e)
        return EXIT_CONFIG
    config = uvicorn.Config(
        app,
        host=cfg.host.strip("[]"),
        port=cfg.port,
        log_level=cfg.log_level.lower(),
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_S,
    )
    server = _server_class()(config, cfg, on_ready)
    app.state.should_stop = lambda: server.should_exit  # a signal ends the wait for the broker
    quiet = _QuietStartupFailure()
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        server.run()  # uvicorn's loop (uvloop when installed), its signal handling
    except KeyboardInterrupt:
        return 0
    except SystemExit as e:  # uvicorn's own exit when it cannot start (it logged why)
        reason = getattr(app.state, "startup_error", None)
        if isinstance(reason, BrokerNotAnswering):
            logger.error("[dead] %s", reason)
            return 1
        logger.error("[dead] the HTTP server did not start on %s:%d", cfg.host, cfg.port)
        return int(e.code) if isinstance(e.code, int) and e.code else 1
    except Exception:
        logger.exception("[dead] the HTTP server failed")
        return 1
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
    if not server.started:  # uvicorn logs why (e.g. the address is in use) and returns
        logger.error("[dead] the HTTP server did not start on %s:%d", cfg.host, cfg.port)
        return 1
    return 0
