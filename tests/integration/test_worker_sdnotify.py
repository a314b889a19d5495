"""systemd readiness of a worker (Type=notify): READY=1 once its configured stages are served,
STOPPING=1 when a SIGTERM drain begins.

The test is the broker (a real ROUTER, `FakeBroker`) and systemd (an AF_UNIX datagram socket
named by NOTIFY_SOCKET, which the spawned worker inherits).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockllm.broker.protocol import Kind
from blockllm.client.launcher import Launcher
from blockllm.zoo import Zoo
from tests.integration.cluster import SLOW_BEAT, FakeBroker, make_zoo, worker_config


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's (a short path: AF_UNIX allows ~108 bytes)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        path = str(Path(d, "notify"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
            sock.settimeout(60)
            yield sock, path
        finally:
            sock.close()


@pytest.mark.timeout(120)
def test_worker_tells_systemd_ready_then_stopping(tiny_checkpoint, tmp_path: Path, monkeypatch):
    zoo = make_zoo(tmp_path / "zoo", {"m": tiny_checkpoint("llama")})
    n_chain = len(Zoo(zoo).manifest("m").chain)
    broker = FakeBroker()
    try:
        with notify_socket() as (systemd, path), Launcher(stop_timeout=10) as launcher:
            monkeypatch.setenv("NOTIFY_SOCKET", path)  # the spawned worker inherits it
            cfg = worker_config(
                broker.endpoint, zoo, "w0", [f"m:0-{n_chain}"], heartbeat_interval_s=SLOW_BEAT
            )
            proc = launcher.start_worker("w0", cfg)
            _, ready, _ = broker.recv_kind({Kind.READY}, timeout=60)
            assert [s.model for s in ready.stages] == ["m"]  # first READY: stages installed
            states = systemd.recv(4096).decode().split("\n")
            assert states[0] == "READY=1" and states[1].startswith("STATUS=serving m:0-")
            launcher.kill_worker("w0", signal.SIGTERM)
            assert systemd.recv(4096).decode().split("\n")[0] == "STOPPING=1"
            _, dead, _ = broker.recv_kind({Kind.DEAD})
            assert dead.reason == "shutdown"
            assert launcher.wait_exit(proc, 30) == 0
    finally:
        broker.close()
