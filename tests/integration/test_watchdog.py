"""systemd's watchdog over real processes: `blockllm broker` (started as systemd would, with
NOTIFY_SOCKET and WATCHDOG_USEC) says READY=1 and then WATCHDOG=1 again and again from its
event loop. A datagram socket this test binds stands in for systemd; waits have deadlines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.timeout(60)
def test_broker_sends_ready_then_watchdog_kicks(tmp_path: Path) -> None:
    address = f"blockllm-watchdog-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + address)
        env = dict(os.environ, NOTIFY_SOCKET="@" + address, WATCHDOG_USEC="400000")
        env.pop("WATCHDOG_PID", None)
        cmd = [
            sys.executable,
            "-m",
            "blockllm.client.cli",
            "broker",
            "--bind",
            "tcp://127.0.0.1:0",
            "--zoo",
            str(tmp_path / "zoo"),
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            seen: list[str] = []
            deadline = time.monotonic() + 45
            while seen.count("WATCHDOG=1") < 3:
                left = deadline - time.monotonic()
                assert left > 0, f"not 3 watchdog kicks in time: {seen}"
                notify.settimeout(left)
                seen += notify.recv(4096).decode().split("\n")
            assert seen.index("READY=1") < seen.index("WATCHDOG=1")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()[-2000:]
