"""The cluster TOML: every key of the example parses, errors name the key and the file, and
flags given on the command line override the file while defaults do not."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from blockllm.broker.cluster_config import (
    SCHEMA,
    ConfigError,
    load_cluster_config,
    merge,
    merge_click,
    parse_cluster_config,
    parse_size,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "cluster.example.toml"


def test_example_file_parses_and_covers_every_key() -> None:
    cfg = load_cluster_config(EXAMPLE)
    assert cfg.worker_names() == ["cpu0", "gpu0"]
    for section, keys in SCHEMA.items():
        shown = set(cfg.sections[section])
        if section == "worker":  # per-worker keys may be shown in the [workers.*] examples
            shown |= {k for w in cfg.sections["workers"].values() for k in w}
        # Every key of the schema is shown (and commented) in the example.
        assert shown == set(keys) or section == "workers", section
    assert cfg.broker()["bind"] == "tcp://0.0.0.0:5555"
    assert cfg.broker()["stats_bind"] == "tcp://0.0.0.0:5556"  # 19.6: a port a firewall names
    assert cfg.broker()["metrics_port"] == 9100
    assert cfg.planner()["broker"] == "tcp://10.0.0.1:5555"
    gpu = cfg.worker("gpu0")
    assert gpu["device"] == "cuda:0"  # the section overrides [worker]
    assert gpu["kv_budget_bytes"] == 16 * 2**30
    assert gpu["max_batch_size"] == 32  # inherited from [worker]
    assert gpu["name"] == "gpu0" and gpu["broker"] == "tcp://10.0.0.1:5555"
    assert gpu["keys"] == "/etc/blockllm/keys"
    # An instance without a section (blockllm-worker@3) runs with the [worker] defaults.
    assert cfg.worker("3")["device"] == "cpu" and "stages" not in cfg.worker("3")
    assert cfg.client() == {"broker": "tcp://10.0.0.1:5555", "keys": "/etc/blockllm/keys"}


def test_every_example_key_is_commented() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            key = line.split("=", 1)[0].strip()
            assert lines[i - 1].lstrip().startswith("#") or _in_commented_group(lines, i), key


def _in_commented_group(lines: list[str], i: int) -> bool:
    """Keys in a run of related keys under one comment (e.g. heartbeat_s and liveness)."""
    j = i - 1
    while j >= 0 and "=" in lines[j] and not lines[j].lstrip().startswith("#"):
        j -= 1
    return j >= 0 and lines[j].lstrip().startswith("#")


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_cluster_config(text, "/etc/blockllm/cluster.toml")
    return str(e.value)


def test_unknown_keys_are_named_with_the_file() -> None:
    msg = _error("[broker]\nheartbeat = 2\n")
    assert "/etc/blockllm/cluster.toml" in msg and "'heartbeat'" in msg and "[broker]" in msg
    assert "did you mean 'heartbeat_s'" in msg
    assert "'brokr'" in _error("[brokr]\nbind = 'tcp://a:1'\n")
    assert "[workers.w1]" in _error("[workers.w1]\ndevise = 'cpu'\n")
    assert "[workers.<name>]" in _error("workers = 3\n")


def test_wrong_types_are_clear_errors() -> None:
    assert 'threads: expected an integer, got "4" (a string)' in _error('[worker]\nthreads = "4"')
    assert "got true (a boolean)" in _error("[worker]\nliveness = true\n")
    assert "expected a number > 0" in _error("[broker]\nheartbeat_s = 0\n")
    assert "expected true or false" in _error("[planner]\nduplicates = 1\n")
    assert "[0, 65535]" in _error("[metrics]\nbroker_port = 70000\n")
    assert "tcp://10.0.0.1:5555" in _error('[broker]\nbind = "10.0.0.1:5555"\n')
    assert "START < END" in _error('[workers.a]\nstages = ["base:3-1"]\n')
    assert "expected a list" in _error('[worker]\nstages = "base:0-3"\n')
    assert 'device: "cpu"' in _error('[worker]\ndevice = "gpu"\n')
    assert "not valid TOML" in _error("[broker\n")
    assert "bad worker name" in _error('[workers."a b"]\ndevice = "cpu"\n')


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_cluster_config(tmp_path / "nope.toml")
    assert ConfigError("x").exit_code == 78  # EX_CONFIG: the units do not restart on it


def test_paths_are_relative_to_the_file() -> None:
    cfg = parse_cluster_config('[broker]\nzoo = "zoo"\n[security]\nkeys = ""\n', "/etc/b/c.toml")
    assert cfg.broker()["zoo"] == "/etc/b/zoo"
    assert cfg.broker()["keys"] is None  # "" = no CurveZMQ


def test_sizes() -> None:
    assert parse_size(4096) == 4096
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("8 GiB") == 8 * 2**30
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("100") == 100
    for bad in ("8 parsecs", "-1", True, -5, 1.5):
        with pytest.raises(ValueError):
            parse_size(bad)  # type: ignore[arg-type]


def test_broker_address() -> None:
    cfg = parse_cluster_config('[broker]\nbind = "tcp://10.1.2.3:5555"\n')
    assert cfg.client()["broker"] == "tcp://10.1.2.3:5555"  # a concrete bind is the address
    wildcard = parse_cluster_config('[broker]\nbind = "tcp://0.0.0.0:5555"\n', "c.toml")
    assert wildcard.broker()["bind"] == "tcp://0.0.0.0:5555"  # the broker itself is fine
    with pytest.raises(ConfigError, match="public is needed"):
        wildcard.worker("w")
    assert "broker" not in parse_cluster_config("").client()


def test_merge_precedence() -> None:
    cli = {"zoo_dir": "/default", "threads": None, "device": "cuda:1"}
    file = {"zoo": "/file", "threads": 4, "device": "cpu", "stages": ["m:0-3"]}
    out = merge(cli, file, explicit={"device"}, rename={"zoo": "zoo_dir"})
    assert out == {"zoo_dir": "/file", "threads": 4, "device": "cuda:1", "stages": ["m:0-3"]}


def _run(args: list[str], env: dict[str, str] | None = None) -> dict:
    file_values = {"zoo": "/file/zoo", "threads": 4, "device": "cpu"}
    seen: dict = {}

    @click.command()
    @click.option("--zoo", "zoo_dir", default="/default/zoo")
    @click.option("--threads", type=int, default=1)
    @click.option("--device", default="cpu", envvar="TEST_BLOCKLLM_DEVICE")
    def cmd(**_: object) -> None:
        seen.update(merge_click(click.get_current_context(), file_values))

    result = CliRunner().invoke(cmd, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen


def test_merge_click_uses_parameter_sources() -> None:
    # Defaults lose to the file; flags given explicitly win, even when equal to the default.
    assert _run([]) == {"zoo_dir": "/file/zoo", "threads": 4, "device": "cpu"}
    assert _run(["--threads", "1", "--zoo", "/cli"])["threads"] == 1
    assert _run(["--zoo", "/cli"])["zoo_dir"] == "/cli"
    # An environment variable counts as given.
    assert _run([], env={"TEST_BLOCKLLM_DEVICE": "cuda"})["device"] == "cuda"


def test_speculate_and_tolerance_lists_reach_the_commands(tmp_path: Path) -> None:
    from blockllm.client.cli.planner import _with_config_file, parse_tolerances
    from blockllm.client.cli.process_config import speculate_pairs as _speculate

    assert "MODEL=VALUE" in _error('[broker]\nspeculate = ["ft"]\n')
    assert "MODEL=VALUE" in _error('[planner]\ntolerance = ["ft=-1"]\n')
    assert "expected a list" in _error('[planner]\ntolerance = "ft=0.1"\n')
    path = tmp_path / "cluster.toml"
    path.write_text('[broker]\nspeculate = ["ft=0.05"]\n[planner]\ntolerance = ["ft=0.001"]\n')
    cfg = load_cluster_config(path)
    assert _speculate(cfg.broker()["speculate"]) == (("ft", 0.05),)

    @click.command()
    @click.option("--config", "config_file")
    @click.option("--tolerance", "tolerances", multiple=True)
    def planner(**params):
        merged = _with_config_file(dict(params))
        click.echo(repr(parse_tolerances(merged["tolerances"])))

    runner = CliRunner()
    assert runner.invoke(planner, ["--config", str(path)]).output.strip() == "(('ft', 0.001),)"
    flag = runner.invoke(planner, ["--config", str(path), "--tolerance", "ft=0.5"])
    assert flag.output.strip() == "(('ft', 0.5),)"  # the command line wins


@pytest.mark.parametrize("bad", ["ft", "=0.1", "ft=-1", "ft=x", "ft=nan"])
def test_model_value_flags_refuse_bad_pairs(bad: str) -> None:
    from blockllm.client.cli.planner import parse_tolerances

    with pytest.raises(click.BadParameter, match=r"MODEL=KL with KL >= 0") as e:
        parse_tolerances(["ok=0.1", bad])
    assert e.value.param_hint == "--tolerance"
    assert parse_tolerances(["ok=0.1", "ft=0"]) == (("ok", 0.1), ("ft", 0.0))


def test_a_wildcard_stats_endpoint_is_dialled_at_the_brokers_host() -> None:
    """19.6: a broker bound to every interface advertises tcp://0.0.0.0:PORT; a planner on
    another node dials the host it reached the broker by."""
    from blockllm.broker.planner.proc import reachable

    broker = "tcp://10.0.0.1:5555"
    assert reachable("tcp://0.0.0.0:5556", broker) == "tcp://10.0.0.1:5556"
    assert reachable("tcp://*:41234", broker) == "tcp://10.0.0.1:41234"
    assert reachable("tcp://10.0.0.2:5556", broker) == "tcp://10.0.0.2:5556"  # as given
    assert reachable("ipc:///run/stats", broker) == "ipc:///run/stats"
