"""`blockllm planner` (the planner process) and `blockllm reload` (re-read the zoo): thin click.

Exit codes: 0 ok (planner: clean stop on SIGTERM/SIGINT); 1 failure (no answer, refused,
fatal error); 2 usage.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from blockllm.client.cli.common import (
    CliError,
    echo_json,
    json_option,
    metrics_fields,
    metrics_host_option,
    metrics_port_option,
    parse_model_values,
    zoo_option,
)
from blockllm.client.cli.generate import broker_option, keys_option


def parse_tolerances(values: Any) -> tuple[tuple[str, float], ...]:
    """("model=KL", ...) -> ((model, KL), ...); click.BadParameter naming a bad one."""
    return parse_model_values(values, "--tolerance", "KL")


def planner_options(f: Any) -> Any:
    """The policy flags `planner` and `serve` share."""
    options = [
        click.option(
            "--tolerance",
            "tolerances",
            multiple=True,
            metavar="MODEL=KL",
            help="Let MODEL be served through equivalent blocks (`blockllm zoo equiv`) "
            "whose summed KL stays within KL. Repeatable. Default: exact chains.",
        ),
        click.option(
            "--replicate/--no-replicate",
            default=True,
            show_default=True,
            help="Replicate hot models across workers in proportion to demand.",
        ),
        click.option(
            "--duplicates/--no-duplicates",
            default=True,
            show_default=True,
            help="Duplicate a straggler worker's stages on a healthy one.",
        ),
        click.option(
            "--replan-interval",
            type=click.FloatRange(min=0.1),
            default=5.0,
            show_default=True,
            help="Seconds between demand-driven re-placements.",
        ),
        click.option(
            "--dup-step-ms",
            type=click.FloatRange(min=0.0),
            default=1000.0,
            show_default=True,
            help="A worker whose recent step p50 exceeds this is a "
            "straggler (also: 3x slower than the others).",
        ),
        click.option(
            "--batch-target-ms",
            type=click.FloatRange(min=0.0),
            default=0.0,
            show_default=True,
            help="Tune each stage's max batch size to keep workers' step p95 near this (0: off).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def spawn_options(default_max: int) -> Any:
    """The flags for spawning workers (broker/planner/spawn.py) that `planner` and `serve` share;
    `default_max`: --max-spawn's default (0 = off)."""

    def decorate(f: Any) -> Any:
        options = [
            click.option(
                "--max-spawn",
                "max_spawn",
                type=click.IntRange(min=0),
                default=default_max,
                show_default=True,
                help="Start up to N more "
                "worker processes on this node when the workers cannot hold a lost "
                "worker's stages or a straggler's duplicate (0: never).",
            ),
            click.option(
                "--spawn-command",
                "spawn_command",
                default="",
                metavar="TEMPLATE",
                help="Start a spawned worker with this command instead of a child "
                "process ({n}, {name}: its slot and name, e.g. "
                "'systemctl start --no-block blockllm-worker@spare{n}').",
            ),
            click.option(
                "--stop-command",
                "stop_command",
                default="",
                metavar="TEMPLATE",
                help="Stop one started by --spawn-command "
                "('systemctl stop --no-block blockllm-worker@spare{n}').",
            ),
            click.option(
                "--spawn-hold",
                "spawn_hold_s",
                type=click.FloatRange(min=0.0),
                default=30.0,
                show_default=True,
                help="Seconds a spawned worker stays unneeded before it is retired.",
            ),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


SPAWN_FIELDS = ("max_spawn", "spawn_command", "stop_command", "spawn_hold_s")


def planner_config(values: dict[str, Any], **overrides: Any) -> Any:
    """A PlannerConfig from parsed flags (`planner_options` and friends)."""
    from blockllm.broker.planner.config import PlannerConfig

    fields: dict[str, Any] = {
        "tolerance": parse_tolerances(values.get("tolerances")),
        "replicate": values.get("replicate", True),
        "duplicates": values.get("duplicates", True),
        "replan_interval_s": values.get("replan_interval", 5.0),
        "dup_step_ms": values.get("dup_step_ms", 1000.0),
        "batch_target_ms": values.get("batch_target_ms", 0.0),
    }
    fields.update({k: values[k] for k in SPAWN_FIELDS if values.get(k) is not None})
    fields.update(overrides)
    try:
        return PlannerConfig(**fields)
    except ValueError as e:
        raise CliError(f"bad planner settings: {e}") from None


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Cluster config (TOML): [planner] interval_s, duplicates; the "
    "broker's address; [broker] zoo; [security] keys. Flags override it.",
)
@broker_option
@click.option("--stats", default="", help="The broker's STATS endpoint [default: ask the broker].")
@zoo_option
@click.option(
    "--worker-memory",
    "worker_memory",
    default="0",
    help="Weights + KV a worker may hold when it advertises no budget (bytes or "
    "2GiB; 0: unlimited).",
)
@planner_options
@spawn_options(default_max=0)
@click.option(
    "--spawn-args",
    "spawn_args",
    default="",
    metavar="ARGS",
    help="More `blockllm worker` flags for a spawned child worker (e.g. '--device "
    "cuda:1 --memory-budget 8GiB'); it gets --broker, --zoo, --keys and --name "
    "from the planner.",
)
@keys_option
@metrics_port_option
@metrics_host_option
def planner(**params: Any) -> None:
    """Run the planner process: subscribe to the broker's stats and place stages, set routes,
    duplicate stragglers and restore coverage after failures, by commands to the broker.

    The models (manifests, equivalence records) come from the broker: only --broker (and
    --keys) is needed; --zoo is the zoo of the workers it spawns (--max-spawn).

    SIGTERM/SIGINT stop it (exit 0); the cluster keeps serving with what is placed.
    """
    from blockllm.broker.cluster_config import parse_size
    from blockllm.broker.planner.proc import run_planner_process
    from blockllm.client.cli.common import default_zoo_dir

    params = _with_config_file(params)
    try:
        memory = parse_size(params["worker_memory"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--worker-memory") from None
    cfg = planner_config(
        params,
        broker=params["broker"],
        stats=params["stats"],
        zoo_dir=str(params["zoo_dir"] or default_zoo_dir()),
        keys_dir=str(params["keys_dir"]) if params["keys_dir"] else None,
        worker_memory_bytes=memory,
        spawn_worker_args=tuple(shlex.split(params.get("spawn_args") or "")),
        **metrics_fields(params),
    )
    sys.exit(run_planner_process(cfg))


def _with_config_file(params: dict[str, Any]) -> dict[str, Any]:
    """The planner's flags merged with --config (flags given on the command line win)."""
    from blockllm.broker.cluster_config import (
        EXIT_CONFIG,
        ConfigError,
        load_cluster_config,
        merge_click,
    )

    path = params.pop("config_file", None)
    if path is None:
        return params
    try:
        cluster = load_cluster_config(path)
        values = cluster.planner()
        zoo = cluster.broker().get("zoo")
    except ConfigError as e:
        raise CliError(str(e), EXIT_CONFIG) from None
    if zoo is not None:
        values.setdefault("zoo", zoo)
    rename = {
        "zoo": "zoo_dir",
        "interval_s": "replan_interval",
        "keys": "keys_dir",
        "tolerance": "tolerances",
    }
    merged = merge_click(click.get_current_context(), values, rename)
    merged.pop("config_file", None)
    for key in ("zoo_dir", "keys_dir"):
        if merged.get(key) is not None:
            merged[key] = Path(merged[key])
    return merged


@click.command()
@broker_option
@json_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the broker's answer.",
)
@keys_option
def reload(broker: str, as_json: bool, timeout: float, keys_dir: Path | None) -> None:
    """Make the broker re-read the zoo: models imported since are served once the planner has
    placed them; removed ones stop being accepted (running requests finish)."""
    from blockllm.broker.planner.proc import send_command
    from blockllm.broker.protocol import Reload
    from blockllm.client.request import new_request_id

    try:
        ack = send_command(broker, Reload(new_request_id()), timeout, str(keys_dir or "") or None)
    except TimeoutError as e:
        raise CliError(str(e)) from None
    if not ack.ok:
        raise CliError(f"reload refused: {ack.message}")
    models = [m for m in ack.message.split(",") if m]
    if as_json:
        echo_json({"models": models})
    else:
        click.echo(f"broker {broker}: {len(models)} models: {', '.join(models) or '-'}")


commands = [planner, reload]
