"""Broker-key rotation as deploy/README.md section 9 documents it (issue 19, item 2).

Copying the old `authorized/*.key` into a `keys gen` folder by hand overwrote the new folder's
own worker/planner/client keys, so after the switch the broker node's own processes were
refused. `blockllm keys rotate-broker OLD NEW` keeps every admitted key: a real broker
restarted on NEW admits this node's processes, the other nodes' and the operator's old keys
(once they hold NEW's broker.key), and refuses peers still holding the old broker key.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner

from blockllm.broker import frames
from blockllm.broker.config import BrokerConfig
from blockllm.broker.protocol import Blob, Error, Fetch
from blockllm.broker.security import (
    load_client_keys,
    read_handshake_failure,
    unwatch_handshakes,
    watch_handshakes,
)
from blockllm.client.cli import cli
from blockllm.client.launcher import Launcher
from tests.integration.cluster import FAST_BEAT


def blockllm(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def admitted(endpoint: str, keys: Path, role: str, timeout: float = 30.0) -> bool:
    """Whether the broker admits the `role` pair of `keys`: an answer to a FETCH (any role may
    send one) proves the handshake passed; a failed-handshake event says it did not."""
    ctx = zmq.Context()
    curve = load_client_keys(keys, role)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey, sock.curve_secretkey = curve.public, curve.secret
    sock.curve_serverkey = curve.server_public
    monitor = watch_handshakes(sock)  # before the connect: no event can be missed
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames.encode(Fetch("probe", "manifest", "none")))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(int(left * 1000)))
            if monitor in ready:
                read_handshake_failure(monitor)
                return False
            if sock in ready:
                reply, _ = frames.decode(sock.recv_multipart())
                if isinstance(reply, (Error, Blob)) and reply.request_id == "probe":
                    return True
        raise AssertionError(f"neither an answer nor a refusal for {keys} ({role})")
    finally:
        unwatch_handshakes(sock, monitor)
        sock.close(linger=0)
        ctx.term()


def start_broker(launcher: Launcher, keys: Path) -> str:
    cfg = BrokerConfig(bind="tcp://127.0.0.1:0", heartbeat_s=FAST_BEAT, keys_dir=str(keys))
    return launcher.start_broker(cfg, 60.0)


@pytest.mark.timeout(180)
def test_rotating_the_broker_key_keeps_every_admitted_key(tmp_path: Path):
    keys, node_b, laptop = tmp_path / "keys", tmp_path / "node-b", tmp_path / "laptop"
    # the cluster before: the broker node's folder, a worker node, an operator's client
    blockllm("keys", "gen", str(keys))
    blockllm("keys", "gen", str(node_b), "--broker-key", str(keys / "broker.key"))
    blockllm("keys", "add", str(keys), str(node_b / "worker.key"), "--name", "node-b")
    blockllm("keys", "gen", str(laptop), "--broker-key", str(keys / "broker.key"))
    blockllm("keys", "add", str(keys), str(laptop / "client.key"), "--name", "laptop")
    stale = tmp_path / "stale"  # a node that will not get the new broker.key
    shutil.copytree(laptop, stale)
    with Launcher(log_level="WARNING", stop_timeout=15.0) as launcher:
        endpoint = start_broker(launcher, keys)
        assert admitted(endpoint, node_b, "worker") and admitted(endpoint, laptop, "client")

    # section 9: rotate into keys.new, give its broker.key to every node, restart on it
    out = json.loads(
        blockllm("keys", "rotate-broker", str(keys), str(tmp_path / "keys.new"), "--json")
    )
    new = tmp_path / "keys.new"
    assert out["created"]
    assert set(out["kept"]) == {"worker", "planner", "client", "node-b", "laptop"}
    assert (new / "broker.key").read_bytes() != (keys / "broker.key").read_bytes()
    for node in (node_b, laptop):
        shutil.copyfile(new / "broker.key", node / "broker.key")
    with Launcher(log_level="WARNING", stop_timeout=15.0) as launcher:
        endpoint = start_broker(launcher, new)
        for role in ("worker", "planner", "client"):  # the broker node's own processes
            assert admitted(endpoint, new, role), role
        assert admitted(endpoint, node_b, "worker")
        assert admitted(endpoint, laptop, "client")
        assert not admitted(endpoint, stale, "client")  # the old broker key: refused
        # a second rotation into a folder made by `keys gen` keeps its own keys too
        newer = tmp_path / "keys.newer"
        blockllm("keys", "gen", str(newer))
        own = {f.name: f.read_bytes() for f in newer.rglob("*.key*")}
        out = json.loads(blockllm("keys", "rotate-broker", str(new), str(newer), "--json"))
        assert not out["created"]
        assert out["kept"] == {
            "worker": "worker-old",
            "planner": "planner-old",
            "client": "client-old",
            "node-b": "node-b",
            "laptop": "laptop",
        }
        assert {f.name: f.read_bytes() for f in newer.rglob("*.key*") if f.name in own} == own
    for node in (node_b, laptop, new):
        shutil.copyfile(newer / "broker.key", node / "broker.key")
    with Launcher(log_level="WARNING", stop_timeout=15.0) as launcher:
        endpoint = start_broker(launcher, newer)
        for role in ("worker", "planner", "client"):
            assert admitted(endpoint, newer, role), role
            assert admitted(endpoint, new, role), role  # the previous folder's own pairs
        assert admitted(endpoint, node_b, "worker") and admitted(endpoint, laptop, "client")


def test_rotate_broker_refuses_what_it_cannot_do(tmp_path: Path):
    blockllm("keys", "gen", str(tmp_path / "keys"))
    runner = CliRunner()
    same = runner.invoke(
        cli, ["keys", "rotate-broker", str(tmp_path / "keys"), str(tmp_path / "keys")]
    )
    assert same.exit_code != 0 and "must differ" in str(same.exception)
    node = tmp_path / "node"  # a node's folder: no broker pair to rotate
    blockllm("keys", "gen", str(node), "--broker-key", str(tmp_path / "keys" / "broker.key"))
    bad = runner.invoke(cli, ["keys", "rotate-broker", str(node), str(tmp_path / "x")])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()
