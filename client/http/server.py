"""`run_http_process(cfg)`: the `blockllm http` process (uvicorn serving `create_app(cfg)`).

Lifecycle (STYLE 7.8, docs/internals.md): uvicorn owns SIGINT/SIGTERM (stop accepting, finish
the open responses for a few seconds, run the lifespan's teardown: the broker client is closed,
its in-flight requests cancelled); once it listens, the bound "host:port" goes to
`cfg.ready_conn` (the launcher of `blockllm serve --http`) and READY=1 to systemd; WATCHDOG=1
from the event loop. Exit codes: 0 after a signal, 1 on a failure (e.g. the port is taken),
78 for a bad --api-keys file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from blockllm.broker.cluster_config import EXIT_CONFIG
from blockllm.broker.sdnotify import Watchdog, notify
from blockllm.client.http.apikeys import ApiKeysError
from blockllm.client.http.config import LOOPBACK_HOSTS, HttpConfig

logger = logging.getLogger(__name__)

GRACEFUL_S = 5  # open streams get this long after SIGTERM before they are cut


def bound_port(server: Any) -> int:
    for s in server.servers:
        for sock in s.sockets:
            return int(sock.getsockname()[1])
    raise RuntimeError("uvicorn started without a listening socket")


async def _announce(server: Any, cfg: HttpConfig, on_ready: Callable[[str], None] | None) -> None:
    """Once uvicorn listens: report the port, READY=1, then kick the watchdog."""
    while not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.01)  # uvicorn exposes no start event: poll its flag
    port = bound_port(server)
    url = cfg.base_url(port)
    logger.info("[ready] OpenAI-compatible API at %s (broker %s)", url, cfg.broker)
    if on_ready is not None:
        on_ready(url)
    if cfg.ready_conn is not None:
        with contextlib.suppress(OSError):
            cfg.ready_conn.send_bytes(f"{cfg.host}:{port}".encode())
            cfg.ready_conn.close()
    notify("READY=1", f"STATUS=serving {url}")
    dog = Watchdog()
    while not server.should_exit:
        dog.kick()
        await asyncio.sleep(max(0.5, min(dog.interval_s or 5.0, 5.0)))
    notify("STOPPING=1")


async def _serve(server: Any, cfg: HttpConfig, on_ready: Callable[[str], None] | None) -> None:
    announce = asyncio.create_task(_announce(server, cfg, on_ready))
    try:
        await server.serve()
    finally:
        announce.cancel()


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
    server = uvicorn.Server(config)
    try:
        asyncio.run(_serve(server, cfg, on_ready))
    except KeyboardInterrupt:
        return 0
    except Exception:
        logger.exception("[dead] the HTTP server failed")
        return 1
    if not server.started:  # uvicorn logs why (e.g. the address is in use) and returns
        logger.error("[dead] the HTTP server did not start on %s:%d", cfg.host, cfg.port)
        return 1
    return 0
