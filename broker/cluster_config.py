"""The cluster config file (TOML) that every process reads with `--config FILE`.

One file describes the whole cluster and is the same on every node; each process takes its part:

    cfg = load_cluster_config(path)          # raises ConfigError (unknown key, wrong type, ...)
    cfg.broker() / cfg.planner() / cfg.worker(name) / cfg.client()   -> plain dicts

Only keys present in the file appear in those dicts (no defaults here: the command line's
defaults stay the one source of defaults). Precedence, lowest first: the command's defaults,
the file, flags given explicitly on the command line (or through their environment variable):

    values = merge_click(click.get_current_context(), cfg.worker(name))

Relative paths in the file are relative to the file's folder. `SCHEMA` lists every key; the
annotated example is `deploy/cluster.example.toml`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport, if installed
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

# sysexits.h EX_CONFIG: a process that exits with it is not restarted by the systemd units
# (RestartPreventExitStatus), because a restart cannot fix its configuration.
EXIT_CONFIG = 78


class ConfigError(ValueError):
    """The config file is missing, not TOML, or has an unknown key or a value of a wrong type."""

    exit_code = EXIT_CONFIG


# ---------------------------------------------------------------------------------------------
# Value checkers: each returns the normalized value or raises ValueError("expected ...").

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_STAGE_RE = re.compile(r"^(\S+):(\d+)-(\d+)$")
_ENDPOINT_RE = re.compile(r"^(tcp://[^\s:]+:(\d+|\*)|ipc://\S+|inproc://\S+)$")
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
_DTYPE_RE = re.compile(r"^(float32|bfloat16|float16)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}$")
WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string with a unit: 4096, "512MiB", "8 GiB", "1.5GB". ValueError."""
    if isinstance(value, bool):
        raise ValueError('expected a size (bytes, or a string like "8GiB")')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("expected a size >= 0")
        return value
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError('expected a size (bytes, or a string like "8GiB")')
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("expected an integer")
        if v < minimum or (maximum is not None and v > maximum):
            raise ValueError(f"expected an integer in [{minimum}, {maximum or '...'}]")
        return v

    return check


def _positive_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ValueError("expected a number > 0")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or not pattern.match(v):
            raise ValueError(f"expected {what}")
        return v

    return check


def _str_list(item: Callable[[Any], Any]) -> Callable[[Any], list[Any]]:
    def check(v: Any) -> list[Any]:
        if not isinstance(v, list):
            raise ValueError("expected a list")
        return [item(x) for x in v]

    return check


def _stage(v: Any) -> str:
    # The same rule as the worker's StageSpec.parse (which turns the strings into stages).
    m = _STAGE_RE.match(v) if isinstance(v, str) else None
    if m is None or int(m.group(2)) >= int(m.group(3)):
        raise ValueError(f'expected stages "MODEL:START-END" with START < END, got {v!r}')
    return v


def _model_value(v: Any) -> str:
    # "MODEL=VALUE", VALUE >= 0: the form of --speculate and --tolerance (parsed by the CLI).
    name, sep, value = v.partition("=") if isinstance(v, str) else ("", "", "")
    try:
        ok = bool(sep and name.strip()) and float(value) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f'expected "MODEL=VALUE" with VALUE >= 0, got {v!r}')
    return v


_PATH = "path"  # marker: a str made absolute against the file's folder ("" -> None: unset)
_endpoint = _matching(_ENDPOINT_RE, 'an endpoint like "tcp://10.0.0.1:5555"')
_port = _int(0, 65535)

# section -> key -> checker. Add a key here and in deploy/cluster.example.toml together.
# Key names follow the fields of the process configs (BrokerConfig, WorkerProcConfig), so a
# file value lands on the field of the same name.
_WORKER_KEYS: dict[str, Any] = {
    "zoo": _PATH,
    "device": _matching(_DEVICE_RE, 'a device: "cpu", "cuda", "cuda:N" or "mps"'),
    "dtype": _matching(_DTYPE_RE, 'a dtype: "float32", "bfloat16" or "float16"'),
    "kv_budget_bytes": parse_size,
    "memory_budget_bytes": parse_size,
    "threads": _int(1),
    "max_batch_size": _int(1),
    "max_batch_tokens": _int(1),
    "stages": _str_list(_stage),
    "heartbeat_interval_s": _positive_float,
    "liveness": _int(1),
    "reconnect_max_s": _positive_float,
    "grace_s": _positive_float,
    "input_queue_size": _int(1),
    "metrics_port": _port,
}
SCHEMA: dict[str, dict[str, Any]] = {
    "broker": {
        "bind": _endpoint,
        "public": _endpoint,
        "stats_bind": _endpoint,  # the STATS PUB socket (--stats-bind); default: an OS port
        "zoo": _PATH,
        "heartbeat_s": _positive_float,
        "liveness": _int(1),
        "max_waiting": _int(0),
        "max_prompt_tokens": _int(1),
        "max_new_tokens_limit": _int(1),
        "default_timeout_s": _positive_float,
        "max_replays": _int(0),
        "drain_timeout_s": _positive_float,
        "speculate": _str_list(_model_value),
    },
    "planner": {
        "interval_s": _positive_float,
        "duplicates": _bool,
        "tolerance": _str_list(_model_value),
        # spawning workers on the planner's node (broker/planner/spawn.py)
        "max_spawn": _int(0),
        "spawn_command": _str,
        "stop_command": _str,
        "spawn_hold_s": _positive_float,
    },
    "worker": _WORKER_KEYS,
    "workers": {},  # [workers.<name>] tables, each with the keys of [worker]
    "security": {"keys": _PATH},
    # the OpenAI-compatible HTTP API (`blockllm http`, `blockllm serve --http`)
    "http": {
        "bind": _matching(_HOST_PORT_RE, 'HOST:PORT like "127.0.0.1:8000"'),
        "api_keys": _PATH,
        "default_max_tokens": _int(1),
        "request_timeout_s": _positive_float,
    },
    "metrics": {"host": _str, "broker_port": _port, "planner_port": _port},
}


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class ClusterConfig:
    """A validated cluster file. Accessors return fresh plain dicts (safe to mutate)."""

    path: Path
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _section(self, name: str) -> dict[str, Any]:
        return dict(self.sections.get(name, {}))

    def _common(self, metrics_port_key: str | None = None, *, metrics: bool = False) -> dict:
        out: dict[str, Any] = {}
        if "keys" in self.sections.get("security", {}):
            out["keys"] = self.sections["security"]["keys"]
        if metrics and "host" in self.sections.get("metrics", {}):
            out["metrics_host"] = self.sections["metrics"]["host"]
        if metrics_port_key in self.sections.get("metrics", {}):
            out["metrics_port"] = self.sections["metrics"][metrics_port_key]
        return out

    def broker_address(self) -> str | None:
        """Where peers connect: [broker] public, else a bind that is not a wildcard, else None.

        Raises ConfigError when only a wildcard bind is given (peers cannot connect to it).
        """
        broker = self.sections.get("broker", {})
        if "public" in broker:
            return broker["public"]
        bind = broker.get("bind")
        if bind is None:
            return None
        host = bind.split("://", 1)[-1].rsplit(":", 1)[0]
        if host in WILDCARD_HOSTS or bind.endswith(":*"):
            raise ConfigError(
                f"{self.path}: [broker] public is needed: bind {bind!r} is not an address other "
                'processes can connect to (set public = "tcp://HOST:PORT")'
            )
        return bind

    def _with_address(self, out: dict[str, Any]) -> dict[str, Any]:
        address = self.broker_address()
        if address is not None:
            out["broker"] = address
        return out

    def broker(self) -> dict[str, Any]:
        """Values for `blockllm broker`: [broker] + keys + metrics_host/metrics_port."""
        return {**self._section("broker"), **self._common("broker_port", metrics=True)}

    def planner(self) -> dict[str, Any]:
        """Values for `blockllm planner`: [planner] + broker (address) + keys + metrics."""
        planner = {**self._section("planner"), **self._common("planner_port", metrics=True)}
        return self._with_address(planner)

    def worker(self, name: str) -> dict[str, Any]:
        """Values for `blockllm worker --name NAME`: [worker] overlaid by [workers.NAME].

        A name without a section gets the [worker] defaults (e.g. `blockllm-worker@0` when
        only [worker] is written).
        """
        out = {**self._common(metrics=True), **self._section("worker")}
        out.update(self.sections.get("workers", {}).get(name, {}))
        out["name"] = name
        return self._with_address(out)

    def worker_names(self) -> list[str]:
        """The names of the [workers.<name>] sections, in file order."""
        return list(self.sections.get("workers", {}))

    def http(self) -> dict[str, Any]:
        """Values for `blockllm http`: [http] + broker (address) + keys."""
        return self._with_address({**self._section("http"), **self._common()})

    def client(self) -> dict[str, Any]:
        """Values for `blockllm generate|status`: broker (address) + keys."""
        return self._with_address(self._common())


def _describe(value: Any) -> str:
    """A value as it was written in TOML, and its type: `"4" (a string)`, `true (a boolean)`."""
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"))
    kinds += ((list, "a list"), (dict, "a table"))
    kind = next((name for t, name in kinds if isinstance(value, t)), type(value).__name__)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = '"' + value.replace('"', '\\"') + '"'
    elif isinstance(value, (list, dict)):
        text = "[...]" if isinstance(value, list) else "{...}"
    else:
        text = repr(value)
    return f"{text} ({kind})"


def _unknown(path: Path, where: str, key: str, known: Collection[str]) -> ConfigError:
    hint = difflib.get_close_matches(key, list(known), n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(
        f"{path}: unknown key {key!r} in {where}{did_you_mean} (known: {', '.join(known)})"
    )


def _check_table(path: Path, where: str, table: Any, schema: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {where} must be a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in schema:
            raise _unknown(path, where, key, schema)
        checker = schema[key]
        try:
            if checker is _PATH:
                value = _str(value) if value != "" else None
                out[key] = None if value is None else str(path.parent / Path(value).expanduser())
            else:
                out[key] = checker(value)
        except ValueError as e:
            got = "" if "got" in str(e) else f", got {_describe(value)}"
            raise ConfigError(f"{path}: {where} {key}: {e}{got}") from None
    return out


def _check_workers(path: Path, table: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [workers] must hold [workers.<name>] tables")
    out: dict[str, dict[str, Any]] = {}
    for name, section in table.items():
        if not _NAME_RE.match(name):
            raise ConfigError(f"{path}: bad worker name [workers.{name}]: letters, digits, _.:-")
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: workers.{name} must be a table [workers.{name}]")
        out[name] = _check_table(path, f"[workers.{name}]", section, _WORKER_KEYS)
    return out


def parse_cluster_config(text: str, path: Path | str = "<string>") -> ClusterConfig:
    """Validate TOML text as a cluster config (`path` names it in errors). Raises ConfigError."""
    path = Path(path)
    if tomllib is None:
        raise ConfigError(f"{path}: reading TOML needs Python >= 3.11 or `pip install tomli`")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    sections: dict[str, dict[str, Any]] = {}
    for name, table in data.items():
        if name not in SCHEMA:
            raise _unknown(path, "the file (top level)", name, SCHEMA)
        if name == "workers":
            sections[name] = _check_workers(path, table)
        else:
            sections[name] = _check_table(path, f"[{name}]", table, SCHEMA[name])
    return ClusterConfig(path=path, sections=sections)


def load_cluster_config(path: Path | str) -> ClusterConfig:
    """Read and validate a cluster config file. Raises ConfigError (missing file included)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    return parse_cluster_config(text, path.resolve())


# ---------------------------------------------------------------------------------------------
# Merging with the command line


def merge(
    cli_values: Mapping[str, Any],
    file_values: Mapping[str, Any],
    explicit: Collection[str] = (),
    rename: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """CLI values (defaults), overridden by the file, overridden by the `explicit` CLI names.

    `rename` maps a file key to the CLI parameter's name where they differ (e.g. the shared
    `--zoo` option stores `zoo_dir`). File keys with no CLI parameter are kept as they are.
    """
    rename = rename or {}
    out = dict(cli_values)
    for key, value in file_values.items():
        name = rename.get(key, key)
        if name not in explicit:
            out[name] = value
    return out


# The shared options of client/cli/common.py whose parameter names differ from the file's keys.
CLI_RENAME: dict[str, str] = {"zoo": "zoo_dir"}


def explicit_params(ctx: Any) -> set[str]:
    """Names of the click parameters the user set (command line, environment or prompt)."""
    from click.core import ParameterSource

    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
    return {name for name in ctx.params if ctx.get_parameter_source(name) in given}


def merge_click(
    ctx: Any, file_values: Mapping[str, Any], rename: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`merge(ctx.params, file_values, explicit_params(ctx), rename)`; default rename CLI_RENAME."""
    rename = CLI_RENAME if rename is None else rename
    return merge(ctx.params, file_values, explicit_params(ctx), rename)
