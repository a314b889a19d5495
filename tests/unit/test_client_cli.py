"""`blockllm generate` and `blockllm status` against the stand-in broker
(tests/unit/client_standin.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from blockllm.broker.protocol import (
    Generate,
    plain,
)
from blockllm.client.cli.common import CliError
from tests.unit.client_standin import PIECES, StandIn
from tests.unit.typed_bodies import status

pytestmark = pytest.mark.timeout(20)

# ---- CLI -----------------------------------------------------------------------------------


def run_cli(*args: str, stdin: str | None = None) -> Any:
    from blockllm.client.cli import cli  # here: a broken sibling CLI module fails only these

    return CliRunner().invoke(cli, list(args), input=stdin)


def cli_error(result: Any) -> CliError:
    """The CliError the `blockllm` entry point prints as one `error: ...` line."""
    assert isinstance(result.exception, CliError), result.output
    return result.exception


def test_cli_generate_json(peer: StandIn) -> None:
    r = run_cli(
        "generate",
        "--broker",
        peer.addr,
        "--model",
        "base",
        "--max-tokens",
        "3",
        "--seed",
        "4",
        "--json",
        "Hello",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {
        "token_ids": [400, 401, 402],
        "text": "Hello,",
        "finish_reason": "length",
    }


def test_cli_generate_streams_text(peer: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKLLM_BROKER", peer.addr)
    r = run_cli("generate", "--model", "base", "--max-tokens", "6", "-", stdin="Hello\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == "".join(PIECES) + "\n"
    assert peer.next_message(Generate).prompt == "Hello"


def test_cli_generate_input_ids_and_sampling(peer: StandIn) -> None:
    r = run_cli(
        "generate",
        "--broker",
        peer.addr,
        "--model",
        "base",
        "--input-ids",
        "5,6,7",
        "--temperature",
        "0.7",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--json",
    )
    assert r.exit_code == 0, r.output
    g = peer.next_message(Generate)
    assert (g.input_ids, g.temperature, g.top_k, g.top_p) == ((5, 6, 7), 0.7, 40, 0.9)


@pytest.mark.parametrize(
    ("model", "exit_code"), [("nope", 3), ("err-BAD_REQUEST", 5), ("err-NO_ROUTE", 1)]
)
def test_cli_generate_error_exit_codes(peer: StandIn, model: str, exit_code: int) -> None:
    r = run_cli("generate", "--broker", peer.addr, "--model", model, "x")
    e = cli_error(r)
    assert e.exit_code == exit_code
    assert "\n" not in str(e)


def test_cli_generate_timeout(peer: StandIn) -> None:
    r = run_cli("generate", "--broker", peer.addr, "--model", "silent", "--timeout", "0.3", "x")
    e = cli_error(r)
    assert e.exit_code == 4 and peer.addr in str(e)


def test_cli_generate_usage_errors(peer: StandIn) -> None:
    r = run_cli("generate", "--broker", peer.addr, "--model", "base", "--input-ids", "1,x")
    assert r.exit_code == 2
    r = run_cli("generate", "--broker", peer.addr, "--model", "base", "--input-ids", "1", "hi")
    assert r.exit_code == 2


def test_cli_status_json_and_table(peer: StandIn) -> None:
    # the shape of broker/status.py
    peer.status_body = {
        "workers": [
            {
                "name": "w0",
                "pid": 42,
                "host": "node1",
                "device": "cpu",
                "stages": [{"key": "k", "model": "base", "start": 0, "end": 3, "nbytes": 10}],
                "queue_depths": {"k": 2},
                "kv_total_bytes": 4 << 20,
                "kv_free_bytes": 1 << 20,
                "rss_bytes": 300 << 20,
                "step_ms_p50": 12.5,
            },
        ],
        "models": {
            "base": {
                "layers": 2,
                "covered": True,
                "route": [["w0", [[0, 3]]]],
                "running": 1,
                "waiting": 0,
            }
        },
        "requests": {"running": 1, "waiting": 0},
        "counters": {"requests": 7, "failed": 0},
    }
    r = run_cli("status", "--broker", peer.addr, "--json")
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert shown == plain(status(peer.status_body))  # every field, as broker/status.py fills it
    assert shown["models"]["base"]["route"] == [["w0", [[0, 3]]]]
    assert shown["workers"][0]["stages"] == [
        {"key": "k", "model": "base", "start": 0, "end": 3, "nbytes": 10, "dtype": ""}
    ]
    assert shown["workers"][0]["speculation"] == {"speculated": 0, "accepted": 0, "rejected": 0}
    assert shown["requests"] == {"running": 1, "waiting": 0} and "page" not in shown
    r = run_cli("status", "--broker", peer.addr)
    assert r.exit_code == 0, r.output
    for text in ("w0", "node1", "base[0,3)", "3M/4M", "300M", "12.5", "w0[0,3)", "requests=7"):
        assert text in r.stdout, text


def test_cli_status_not_covered_is_unhealthy(peer: StandIn) -> None:
    peer.status_body = {"workers": [], "models": {"base": {"covered": False}}}
    r = run_cli("status", "--broker", peer.addr, "--json")
    assert json.loads(r.stdout)["models"]["base"]["covered"] is False
    e = cli_error(r)
    assert e.exit_code == 1 and "base" in str(e)


def test_cli_status_unreachable() -> None:
    dead = StandIn()
    dead.close()
    r = run_cli("status", "--broker", dead.addr, "--timeout", "0.3")
    e = cli_error(r)
    assert e.exit_code == 4 and dead.addr in str(e)


def test_blockllm_keys_env_names_the_keys_folder(tmp_path) -> None:
    """19.7: BLOCKLLM_KEYS spares --keys on generate/status/reload."""
    from click.testing import CliRunner

    from blockllm.client.cli import cli

    missing = tmp_path / "no-keys-here"
    out = CliRunner().invoke(
        cli,
        ["status", "--broker", "tcp://127.0.0.1:9", "--timeout", "1"],
        env={"BLOCKLLM_KEYS": str(missing)},
    )
    assert out.exit_code != 0
    assert str(missing) in out.output + str(out.exception)  # the folder it was given to read
