"""Flags and `--config` values -> the configs of the processes `blockllm serve`, `broker` and
`worker` start, and the click options those commands share (thin: parsing and checks only).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from blockllm.broker.cluster_config import (
    EXIT_CONFIG,
    ClusterConfig,
    ConfigError,
    load_cluster_config,
)
from blockllm.client.cli.common import (
    SIZE,
    CliError,
    default_zoo_dir,
    metrics_fields,
    parse_model_values,
)
from blockllm.worker.config import MiB, StageSpec, WorkerProcConfig

DEFAULT_BIND = "tcp://127.0.0.1:5555"
DTYPES = ("float32", "bfloat16", "float16")


def engine_options(f: Any) -> Any:
    """The engine flags `worker` and `serve` share: --device, --dtype, --kv-budget (each
    worker's), --max-batch-size."""
    options = [
        click.option(
            "--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps."
        ),
        click.option(
            "--dtype",
            type=click.Choice(DTYPES),
            default=None,
            help="Serve the blocks in this dtype, cast once at load (the zoo keeps them as "
            "imported; the KV cache follows) [default: as imported].",
        ),
        click.option(
            "--kv-budget",
            "kv_budget_bytes",
            type=SIZE,
            default="256MiB",
            show_default=True,
            help="KV-cache memory of each worker (bytes or 512MiB, 2GiB).",
        ),
        click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


speculate_option = click.option(
    "--speculate",
    "speculate",
    multiple=True,
    metavar="MODEL=TOL",
    help="Speculative execution for MODEL (docs/internals.md): a hop also runs a decode step "
    "early on the previous hop's input, kept when the real input is within relative L2 "
    "distance TOL (0: only an identical one, exact). Repeatable [default: off].",
)


def speculate_pairs(values: Any) -> tuple[tuple[str, float], ...]:
    """("model=tol", ...) -> ((model, tol), ...); click.BadParameter naming a bad one."""
    return parse_model_values(values, "--speculate", "TOL")


def cluster_config(path: Path | None) -> ClusterConfig | None:
    if path is None:
        return None
    try:
        return load_cluster_config(path)
    except ConfigError as e:
        raise CliError(str(e), EXIT_CONFIG) from None


def log_level() -> str:
    """The level the root command configured (-v, BLOCKLLM_LOG_LEVEL), for the children."""
    return logging.getLevelName(logging.getLogger().getEffectiveLevel())


def stage_specs(values: Any) -> tuple[StageSpec, ...]:
    try:
        return tuple(StageSpec.parse(s) for s in values or ())
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--stage") from None


def worker_config(v: dict[str, Any], **overrides: Any) -> WorkerProcConfig:
    """A WorkerProcConfig from merged flag/file values (keys as in the [worker] section)."""
    fields = {
        "broker": v.get("broker") or DEFAULT_BIND,
        "zoo_dir": str(v.get("zoo_dir") or default_zoo_dir()),
        "stages": stage_specs(v.get("stages")),
        "device": v.get("device") or "cpu",
        "dtype": v.get("dtype") or None,
        "kv_budget_bytes": int(v.get("kv_budget_bytes") or 256 * MiB),
        "max_batch_size": int(v.get("max_batch_size") or 32),
        "max_batch_tokens": int(v.get("max_batch_tokens") or 4096),
        "threads": v.get("threads"),
        "name": v.get("name") or "",
        "keys_dir": str(v["keys"]) if v.get("keys") else None,
        "log_level": log_level(),
    }
    for key in (
        "heartbeat_interval_s",
        "liveness",
        "reconnect_max_s",
        "grace_s",
        "memory_budget_bytes",
    ):
        if v.get(key) is not None:
            fields[key] = v[key]
    if v.get("input_queue_size") is not None:
        fields["input_queue_size"] = v["input_queue_size"]
    fields.update(metrics_fields(v))
    fields.update(overrides)
    return WorkerProcConfig(**fields)


def check_keys(load: Any, keys_dir: Any) -> Any:
    """load(keys_dir), a bad keys folder turned into a one-line error (exit 78)."""
    from blockllm.broker.security import KeysError

    try:
        return load(keys_dir)
    except KeysError as e:
        raise CliError(str(e), EXIT_CONFIG) from None


def broker_config(v: dict[str, Any], **overrides: Any) -> Any:
    """A BrokerConfig from merged flag/file values (keys as in the [broker] section)."""
    from blockllm.broker.config import BrokerConfig
    from blockllm.broker.security import load_server_keys

    fields: dict[str, Any] = {
        "bind": v.get("bind") or DEFAULT_BIND,
        "zoo_dir": str(v.get("zoo_dir") or default_zoo_dir()),
        "log_level": log_level(),
    }
    for key in (
        "heartbeat_s",
        "liveness",
        "max_waiting",
        "max_prompt_tokens",
        "max_new_tokens_limit",
        "default_timeout_s",
        "max_replays",
        "drain_timeout_s",
    ):
        if v.get(key) is not None:
            fields[key] = v[key]
    if v.get("stats_bind") is not None:
        fields["stats_bind"] = v["stats_bind"]
    if v.get("speculate"):
        fields["speculate"] = speculate_pairs(v["speculate"])
    if v.get("keys"):
        check_keys(load_server_keys, v["keys"])  # a bad folder: one line, exit 78, now
        fields["keys_dir"] = str(v["keys"])
    fields.update(metrics_fields(v))
    fields.update(overrides)
    try:
        return BrokerConfig(**fields)
    except ValueError as e:
        raise CliError(f"bad broker settings: {e}", EXIT_CONFIG) from None
