"""`blockllm serve`, `blockllm broker`, `blockllm worker`: start processes (thin click layer).

`serve` runs a whole single-machine cluster in the foreground (broker + N workers placed by
`broker.routing.static_placement` weighted by compute per token, then the planner, which
refines that placement live); `broker` and `worker` run one process each, as the systemd units
do. Every command takes `--config FILE`: the cluster TOML
(`deploy/cluster.example.toml`, read with tomllib); flags given on the command line override it.

Exit codes: 0 clean stop (SIGINT/SIGTERM); 1 a failure (serve: a death it cannot heal; a fatal
error); 2 usage; 3 injected test fault (worker); 78 bad --config or --keys; 130 interrupted while
starting.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from blockllm.broker.cluster_config import EXIT_CONFIG, ConfigError, merge_click
from blockllm.client.cli.common import (
    SIZE,
    CliError,
    config_option,
    crash_loop_options,
    metrics_host_option,
    metrics_port_option,
    zoo_option,
)
from blockllm.client.cli.common import process_keys_option as keys_option
from blockllm.client.cli.http_api import (
    HOST_PORT,
    api_keys_option,
    serve_file_values,
    serve_http_config,
)
from blockllm.client.cli.planner import (
    SPAWN_FIELDS,
    planner_config,
    planner_options,
    spawn_options,
)
from blockllm.client.cli.process_config import (
    DEFAULT_BIND,
    broker_config,
    check_keys,
    cluster_config,
    engine_options,
    log_level,
    speculate_option,
    worker_config,
)

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130


# -- blockllm worker ------------------------------------------------------------------------


@click.command()
@config_option
@click.option(
    "--broker",
    envvar="BLOCKLLM_BROKER",
    default=DEFAULT_BIND,
    show_default=True,
    help="Broker address to connect to.",
)
@zoo_option
@click.option(
    "--stage",
    "stages",
    multiple=True,
    metavar="MODEL:START-END",
    help="Stage to load at start: chain positions [START, END) of MODEL (0 = the "
    "embedding, 1..L = decoder layers, L+1 = the head). Repeatable.",
)
@click.option(
    "--name",
    default="",
    help="Worker name (its identity at the broker; selects "
    "[workers.NAME] of --config) [default: HOST-PID].",
)
@engine_options
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads [default: torch's, all cores].",
)
@click.option(
    "--heartbeat-interval",
    "heartbeat_interval_s",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds between liveness beats.",
)
@click.option(
    "--grace",
    "grace_s",
    type=click.FloatRange(min=0.0),
    default=10.0,
    show_default=True,
    help="On SIGTERM: seconds to finish in-flight work.",
)
@click.option(
    "--memory-budget",
    "memory_budget_bytes",
    type=SIZE,
    default=None,
    help="Weights + KV this worker may hold, told to the planner (bytes or 8GiB) "
    "[default: the planner's --worker-memory].",
)
@keys_option
@metrics_port_option
@metrics_host_option
def worker(**params: Any) -> None:
    """Run one block worker process: load stages from the zoo, serve the broker.

    SIGTERM/SIGINT: stop taking work, finish in-flight steps (up to --grace), tell the broker
    (DEAD), exit 0. A fatal error is logged, sent to the broker as DEAD, and exits 1.
    """
    from blockllm.worker.proc import run_worker_process

    ctx = click.get_current_context()
    cluster = cluster_config(params.pop("config_file"))
    values = dict(ctx.params)
    if cluster is not None:
        try:
            values = merge_click(ctx, cluster.worker(params["name"]))
        except ConfigError as e:
            raise CliError(str(e), EXIT_CONFIG) from None
    cfg = worker_config(values, pin_stages=True)  # an operator's stages: the planner keeps them
    if cfg.keys_dir:
        from blockllm.broker.security import load_client_keys

        # the pair the worker presents: worker.key (a worker node's folder has only that one)
        check_keys(lambda d: load_client_keys(d, role="worker"), cfg.keys_dir)
    sys.exit(run_worker_process(cfg))


# -- blockllm broker ------------------------------------------------------------------------


@click.command()
@config_option
@click.option(
    "--bind",
    default=DEFAULT_BIND,
    show_default=True,
    help="Endpoint the broker's ROUTER binds (tcp://0.0.0.0:5555 for other nodes).",
)
@zoo_option
@click.option(
    "--heartbeat",
    "heartbeat_s",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds of worker silence before a ping.",
)
@click.option(
    "--max-waiting",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Requests waiting for a route beyond this are refused (OVERLOADED).",
)
@click.option(
    "--drain-timeout",
    "drain_timeout_s",
    type=click.FloatRange(min=0.0),
    default=5.0,
    show_default=True,
    help="On SIGTERM: seconds running requests get to finish.",
)
@click.option(
    "--stats-bind",
    "stats_bind",
    default=None,
    help="Where the STATS PUB socket for the planner binds [default: the --bind host, "
    "a port the OS picks; `blockllm status --json` shows it]. '' = none.",
)
@speculate_option
@keys_option
@metrics_port_option
@metrics_host_option
def broker(**params: Any) -> None:
    """Run the broker process: the ROUTER that clients, workers and the planner connect to.

    It logs `[ready] broker listening on ADDR` once bound. SIGTERM/SIGINT: stop admitting,
    finish running requests (up to --drain-timeout), exit 0.
    """
    from blockllm.broker.proc import run_broker_process

    ctx = click.get_current_context()
    cluster = cluster_config(params["config_file"])
    values = dict(ctx.params)
    if cluster is not None:
        values = merge_click(ctx, cluster.broker())
    sys.exit(run_broker_process(broker_config(values)) or 0)


# -- blockllm serve -------------------------------------------------------------------------


def _models(value: str | None) -> tuple[str, ...]:
    return tuple(m.strip() for m in (value or "").split(",") if m.strip())


@click.command()
@config_option
@zoo_option
@click.option(
    "--bind",
    default=DEFAULT_BIND,
    show_default=True,
    help="Broker endpoint (tcp://127.0.0.1:0: a free port the OS picks).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker processes; the models' chains are split across them.",
)
@click.option(
    "--models",
    "models_text",
    default=None,
    metavar="A,B",
    help="Models to serve [default: every model in the zoo].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads per worker [default: the cores split across workers].",
)
@engine_options
@click.option(
    "--ready-timeout",
    type=click.FloatRange(min=1.0),
    default=120.0,
    show_default=True,
    help="Seconds to wait for the broker and every worker.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Announce as one JSON line: {"broker": ADDR, "models": [...], "workers": [...]}.',
)
@click.option(
    "--planner/--no-planner",
    "with_planner",
    default=True,
    show_default=True,
    help="Run the planner: it places stages by demand, moves them off failed or "
    "slow workers, and assembles chains within --tolerance.",
)
@planner_options
@spawn_options(default_max=1)
@speculate_option
@keys_option
@click.option(
    "--http",
    "http_bind",
    type=HOST_PORT,
    default=None,
    help="Also serve the OpenAI-compatible HTTP API on HOST:PORT (127.0.0.1:8000; "
    "see `blockllm http`) [default: off].",
)
@api_keys_option
@crash_loop_options
def serve(**params: Any) -> None:
    """Run a broker and N workers on this machine, in the foreground, until Ctrl-C.

    When every model is served, prints one line on stdout and flushes it:

    \b
        blockllm: serving MODEL[,MODEL...] at ADDR

    ADDR (the last word of that line; or the "broker" field with --json) is what
    `blockllm generate --broker ADDR` takes. With --http, the line
    `blockllm: OpenAI-compatible API at URL` comes first ("http" with --json), once the
    HTTP API answers. Logs go to stderr. Ctrl-C or SIGTERM stops the
    workers (they finish in-flight steps), then the broker, and exits 0. A process that dies
    (a crash, the OOM killer) is logged and restarted: a worker with the same stages while the
    broker replays its requests; the broker on the same address (workers register again,
    clients resume their requests); the planner; the HTTP API on the same port (its open
    streams fail; new requests are served). Serve stops everything and exits 1 when it cannot
    heal: a restart fails, or one of them crash-loops (--crash-loop-deaths within
    --crash-loop-window). The planner may start up to --max-spawn
    more workers; they are its children, retired when unneeded and stopped with it.
    """
    from blockllm.client.launcher import LaunchError, ServeConfig, run_serve

    ctx = click.get_current_context()
    cluster = cluster_config(params["config_file"])
    values = dict(ctx.params)
    if cluster is not None:
        planner = cluster.planner()
        spawn = {k: v for k, v in planner.items() if k in SPAWN_FIELDS}
        if "tolerance" in planner:
            spawn["tolerances"] = planner["tolerance"]
        file_values = {**cluster.worker(""), **cluster.broker(), **spawn}
        file_values.pop("name", None)
        file_values.pop("broker", None)
        file_values.pop("stages", None)  # serve places stages itself
        file_values.update(serve_file_values(cluster.http()))
        values = merge_click(ctx, file_values)
    broker_cfg = broker_config(values)
    worker_cfg = worker_config(values, stages=(), threads=None)
    cfg = ServeConfig(
        zoo_dir=broker_cfg.zoo_dir,
        broker=broker_cfg,
        worker=worker_cfg,
        workers=values["workers"],
        models=_models(values.get("models_text")),
        threads=values.get("threads"),
        ready_timeout_s=values["ready_timeout"],
        log_level=log_level(),
        planner=_planner_config(values, worker_cfg.keys_dir),
        http=serve_http_config(values, log_level()),
        crash_loop_deaths=values["crash_loop_deaths"],
        crash_loop_window_s=values["crash_loop_window_s"],
    )
    try:
        code = run_serve(cfg, lambda s: _announce(s, values["as_json"]))
    except LaunchError as e:
        raise CliError(str(e)) from None
    sys.exit(code)


def _planner_config(values: dict[str, Any], keys_dir: str | None) -> Any:
    """The planner `serve` starts (None with --no-planner); broker and zoo are filled in."""
    if not values.get("with_planner", True):
        return None
    return planner_config(values, keys_dir=keys_dir, log_level=log_level())


def _announce(s: Any, as_json: bool) -> None:
    if as_json:
        workers = [{"name": n, "pid": pid, "stages": list(st)} for n, pid, st in s.workers]
        doc = {"broker": s.endpoint, "models": list(s.models), "workers": workers}
        if s.http:
            doc["http"] = s.http
        click.echo(json.dumps(doc))
    else:
        if s.http:
            click.echo(f"blockllm: OpenAI-compatible API at {s.http}")
        click.echo(f"blockllm: serving {','.join(s.models)} at {s.endpoint}")
    sys.stdout.flush()


commands = [serve, broker, worker]
