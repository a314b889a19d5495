"""HttpConfig: the settings of one `blockllm http` process (a frozen value, passed down)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def parse_host_port(text: str, default_port: int = DEFAULT_HTTP_PORT) -> tuple[str, int]:
    """ "HOST:PORT", ":PORT", "HOST" or "[::1]:PORT" -> (host, port); ValueError if malformed."""
    text = text.strip().removeprefix("http://")
    if text.startswith("["):  # IPv6 literal
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected HOST:PORT, got {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    host = host or DEFAULT_HTTP_HOST
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"expected HOST:PORT with a numeric port, got {text!r}") from None
    if not 0 <= port <= 65535 or not host:
        raise ValueError(f"expected HOST:PORT with a port in 0..65535, got {text!r}")
    return host, port


def url_host(host: str) -> str:
    """The host as it goes into a URL (IPv6 in brackets; a wildcard as the loopback)."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """One HTTP front end: where the broker is, where to listen, who may use which model."""

    broker: str
    host: str = DEFAULT_HTTP_HOST
    port: int = DEFAULT_HTTP_PORT  # 0: a port the OS picks (reported through ready_conn)
    keys_dir: str | None = None  # CurveZMQ keys towards the broker
    api_keys_file: str | None = None  # None: the endpoint is open (no Authorization needed)
    log_level: str = "WARNING"
    status_interval_s: float = 1.0  # how often the broker's STATUS is refreshed
    request_timeout_s: float | None = None  # per request (None: the broker's default)
    default_max_tokens: int = 256  # chat requests without max_tokens (KV is reserved for it)
    connect_timeout_s: float = 10.0  # broker unreachable this long -> 503
    ready_timeout_s: float = 60.0  # no STATUS from the broker this long at start -> exit 1
    # set by the launcher (`blockllm serve --http`): a pipe to report "host:port" once serving
    ready_conn: Any = None
    parent_pid: int | None = None

    @property
    def open(self) -> bool:
        return self.api_keys_file is None

    def base_url(self, port: int | None = None) -> str:
        return f"http://{url_host(self.host)}:{self.port if port is None else port}/v1"


def answers(bound: str, deadline: float) -> bool:
    """GET /health on "host:port" until it answers at all (any status) or `deadline`
    (monotonic): the launcher's check that the HTTP API it started is really up."""
    import http.client
    import time

    host, _, port = bound.rpartition(":")
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(url_host(host).strip("[]"), int(port), timeout=5)
        try:
            conn.request("GET", "/health")
            conn.getresponse().read()
            return True
        except OSError:
            time.sleep(0.05)  # it reported listening: a refused connect is retried, bounded
        finally:
            conn.close()
    return False
