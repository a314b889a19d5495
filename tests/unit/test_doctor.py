"""`blockllm doctor --config F` (issue 19.1): a node's folder checked before its first start.

A good folder (keys, zoo with the staged model, free ports) passes with exit 0; a broken one
(a port taken, a missing model, a keys folder with a world-readable secret, a missing worker
pair) fails with exit 1 and names each problem with its fix.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from click.testing import CliRunner

from blockllm.broker.security import generate_keys
from blockllm.client.cli import cli
from tests.integration.cluster import make_zoo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(tmp: Path, zoo: Path, port: int, stats: int, metrics: int) -> Path:
    keys = tmp / "keys"
    if not keys.exists():
        generate_keys(keys)
    cfg = tmp / "cluster.toml"
    cfg.write_text(
        f"""
[broker]
bind = "tcp://127.0.0.1:{port}"
stats_bind = "tcp://127.0.0.1:{stats}"
zoo = "{zoo}"

[worker]
zoo = "worker-zoo"

[workers.cpu0]
stages = ["llama:0-3"]
metrics_port = {metrics}

[security]
keys = "keys"

[metrics]
host = "127.0.0.1"
broker_port = 0
"""
    )
    return cfg


def doctor(cfg: Path, *args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["doctor", "--config", str(cfg), "--json", *args])
    code = getattr(result.exception, "exit_code", result.exit_code)
    return code, json.loads(result.output)


def test_a_good_node_passes_and_a_broken_one_says_what_to_fix(tiny_checkpoint, tmp_path):
    zoo = make_zoo(tmp_path / "zoo", {"llama": tiny_checkpoint("llama")})
    good = node(tmp_path / "good", zoo, free_port(), free_port(), free_port())
    code, body = doctor(good)
    assert code == 0 and body["ok"], body
    checks = " | ".join(c["check"] for c in body["checks"])
    assert "bindable" in checks and "model llama in" in checks and "prometheus_client" in checks
    assert "worker key pair" in checks and "not in" in checks  # the worker pulls llama

    broken_dir = tmp_path / "broken"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cfg = node(broken_dir, tmp_path / "empty-zoo", taken.getsockname()[1], 0, 0)
        (broken_dir / "keys" / "worker.key_secret").unlink()
        (broken_dir / "keys" / "planner.key_secret").chmod(0o644)
        code, body = doctor(cfg, "--broker", "--planner", "--worker", "cpu0")
    finally:
        taken.close()
    assert code == 1 and not body["ok"]
    failed = {c["check"]: c["fix"] for c in body["checks"] if not c["ok"]}
    text = json.dumps(failed)
    assert "broker bind" in text and "ss -ltnp" in text  # the port in use
    assert "blockllm zoo import" in text  # the empty broker zoo
    assert "worker key pair" in text  # its secret is gone
    assert "chmod 600" in text  # planner.key_secret readable by others
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker]\nbind = 5\n")
    code, body = doctor(bad)
    assert code == 1 and "bind" in body["checks"][0]["fix"]
