"""`blockllm http`: the OpenAI-compatible HTTP API in front of a broker (thin click layer over
client/http/); its flag types and config building, shared with `blockllm serve --http`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from blockllm.client.cli.common import CliError
from blockllm.client.http.config import DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT, HttpConfig

DEFAULT_BROKER = "tcp://127.0.0.1:5555"


class HostPort(click.ParamType):
    """HOST:PORT (":PORT" and "HOST" too; port 0: one the OS picks)."""

    name = "HOST:PORT"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        from blockllm.client.http.config import parse_host_port

        try:
            return parse_host_port(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


HOST_PORT = HostPort()


def http_config(values: dict[str, Any], broker: str, log_level: str) -> HttpConfig:
    """An HttpConfig from merged flag/file values; a bad --api-keys file is a one-line error
    (exit 78) now rather than in the child."""
    from blockllm.broker.cluster_config import EXIT_CONFIG
    from blockllm.client.http.apikeys import ApiKeysError, load_api_keys

    host, port = HOST_PORT.convert(
        values.get("bind") or f"{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}", None, None
    )
    api_keys = values.get("api_keys_file")
    if api_keys:
        try:
            load_api_keys(api_keys)
        except ApiKeysError as e:
            raise CliError(str(e), EXIT_CONFIG) from None
    fields: dict[str, Any] = {
        "broker": broker,
        "host": host,
        "port": port,
        "keys_dir": str(values["keys"]) if values.get("keys") else None,
        "api_keys_file": str(api_keys) if api_keys else None,
        "log_level": log_level,
    }
    for key in ("default_max_tokens", "request_timeout_s", "ready_timeout_s"):
        if values.get(key) is not None:
            fields[key] = values[key]
    return HttpConfig(**fields)


def serve_file_values(section: dict[str, Any]) -> dict[str, Any]:
    """The cluster TOML's [http] section as `blockllm serve`'s parameters (--http, ...)."""
    names = {"bind": "http_bind", "api_keys": "api_keys_file"}
    keys = ("bind", "api_keys", "default_max_tokens", "request_timeout_s")
    return {names.get(k, k): section[k] for k in keys if k in section}


def serve_http_config(values: dict[str, Any], log_level: str) -> HttpConfig | None:
    """The HTTP API `serve --http` starts (None without --http); the broker is filled in."""
    if not values.get("http_bind"):
        return None
    return http_config({**values, "bind": values["http_bind"]}, broker="", log_level=log_level)


api_keys_option = click.option(
    "--api-keys",
    "api_keys_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="API keys file (TOML; `blockllm keys api-add`): each key's models and requests per "
    "minute. Without it the endpoint is open: keep it on 127.0.0.1.",
)


@click.command("http")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Cluster config (TOML): its [http] section, the broker's "
    "address and [security] keys. Flags override it.",
)
@click.option(
    "--broker",
    envvar="BLOCKLLM_BROKER",
    default=DEFAULT_BROKER,
    show_default=True,
    help="Broker address to connect to.",
)
@click.option(
    "--bind",
    type=HOST_PORT,
    default=f"{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}",
    show_default=True,
    help="Where the HTTP API listens (0.0.0.0:8000: every interface; then give --api-keys).",
)
@click.option(
    "--keys",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="CurveZMQ keys folder towards the broker (`blockllm keys gen`).",
)
@api_keys_option
@click.option(
    "--default-max-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="max_tokens of chat requests that give none (KV is reserved for all of it up front).",
)
@click.option(
    "--request-timeout",
    "request_timeout_s",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Seconds a request may take [default: the broker's].",
)
@click.option(
    "--ready-timeout",
    "ready_timeout_s",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds to wait at start for the broker's first answer: the API listens (and is "
    "ready) only with it; none in time: exit 1 saying so.",
)
def http(**params: Any) -> None:
    """Serve the OpenAI-compatible HTTP API of the cluster behind --broker.

    \b
    GET  /v1/models             every tenant (its `parent`: the model it shares most blocks with)
    POST /v1/completions        the `model` field selects the tenant
    POST /v1/chat/completions   the tenant's own chat template (from the zoo)
    GET  /health                200 when the broker answers and every model is served
    GET  /metrics               Prometheus metrics of the HTTP layer

    Prints `blockllm: OpenAI-compatible API at URL` once it listens, which is once the broker
    answered (--ready-timeout). SIGTERM/SIGINT: stop
    accepting, finish open responses for a few seconds, exit 0.
    """
    from blockllm.broker.cluster_config import EXIT_CONFIG, ConfigError, load_cluster_config
    from blockllm.broker.cluster_config import merge_click as merge
    from blockllm.client.http.server import run_http_process

    ctx = click.get_current_context()
    values = dict(ctx.params)
    if params.get("config_file") is not None:
        try:
            cluster = load_cluster_config(params["config_file"])
            values = merge(ctx, cluster.http(), rename={"api_keys": "api_keys_file"})
        except ConfigError as e:
            raise CliError(str(e), EXIT_CONFIG) from None
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    cfg = http_config(values, values.get("broker") or DEFAULT_BROKER, level)
    if cfg.keys_dir:
        from blockllm.broker.security import KeysError, load_client_keys

        try:
            load_client_keys(cfg.keys_dir)
        except KeysError as e:
            raise CliError(str(e), EXIT_CONFIG) from None

    def ready(url: str) -> None:
        click.echo(f"blockllm: OpenAI-compatible API at {url} (broker {cfg.broker})")
        sys.stdout.flush()

    sys.exit(run_http_process(cfg, ready))


commands = [http]
