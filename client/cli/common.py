"""Shared pieces of the CLI modules: the error type the entry point turns into one line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from blockllm.broker.cluster_config import parse_size


class CliError(Exception):
    """A user-facing failure: printed as one line `error: ...`, exit code `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def default_zoo_dir() -> Path:
    """$BLOCKLLM_ZOO, else ~/.cache/blockllm/zoo (environment read only in the CLI layer)."""
    env = os.environ.get("BLOCKLLM_ZOO")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "blockllm" / "zoo"


zoo_option = click.option(
    "--zoo",
    "zoo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Zoo directory [default: $BLOCKLLM_ZOO or ~/.cache/blockllm/zoo].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def echo_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def parse_model_values(values: Any, flag: str, what: str) -> tuple[tuple[str, float], ...]:
    """("MODEL=VALUE", ...) -> ((model, value), ...) for repeatable flags such as --tolerance
    (what = "KL") and --speculate ("TOL"); click.BadParameter naming a bad one."""
    out = []
    for text in values or ():
        name, sep, value = str(text).partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or not name or not number >= 0:
            raise click.BadParameter(
                f"{text!r}: expected MODEL={what} with {what} >= 0", param_hint=flag
            )
        out.append((name, number))
    return tuple(out)


def metrics_fields(params: dict[str, Any]) -> dict[str, Any]:
    """metrics_port/metrics_host config fields of a process (port 0 or absent: off); a clear
    one-line error (exit 78) when the `metrics` extra is not installed."""
    if not params.get("metrics_port"):
        return {}
    from blockllm.broker.cluster_config import EXIT_CONFIG
    from blockllm.broker.prom import MetricsUnavailable, require

    try:
        require()
    except MetricsUnavailable as e:
        raise CliError(str(e), EXIT_CONFIG) from None
    host = params.get("metrics_host") or "127.0.0.1"
    return {"metrics_port": int(params["metrics_port"]), "metrics_host": host}


class SizeType(click.ParamType):
    """Bytes, or a size with a unit: 268435456, 256MiB, 1GiB, 512MB."""

    name = "BYTES|SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(f"{value!r}: {e}", param, ctx)


SIZE = SizeType()

config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Cluster config (TOML, read with tomllib; see deploy/cluster.example.toml). "
    "Flags given on the command line override it.",
)

metrics_port_option = click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve Prometheus metrics on this port (needs blockllm[metrics]) [default: off; 0 = off].",
)
metrics_host_option = click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Interface the metrics endpoint listens on.",
)


def crash_loop_options(f: Any) -> Any:
    """`serve`'s healing limits: when a restarted worker slot counts as crash-looping."""
    f = click.option(
        "--crash-loop-window",
        "crash_loop_window_s",
        type=click.FloatRange(min=0.0, min_open=True),
        default=60.0,
        show_default=True,
        help="Seconds over which --crash-loop-deaths are counted.",
    )(f)
    return click.option(
        "--crash-loop-deaths",
        type=click.IntRange(min=1),
        default=3,
        show_default=True,
        help="A worker that dies is restarted in its slot; one that dies this often within "
        "--crash-loop-window is crash-looping and serve stops (exit 1). 1 = never restart.",
    )(f)


process_keys_option = click.option(
    "--keys",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="CurveZMQ keys folder (`blockllm keys gen`); default: plain TCP.",
)
