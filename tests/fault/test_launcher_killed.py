"""A launcher killed outright (SIGKILL: none of its cleanup runs) takes its workers along.

Workers fork from multiprocessing's fork server, so their PR_SET_PDEATHSIG names the server,
which exits once nothing holds its "alive" pipe; every forked child inherits a copy of that
pipe, so a worker that kept it held the server, and the server the worker, running for good
(found after a timed-out test run: a worker and its server alive 50 min later)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from blockllm.broker.protocol import Kind
from tests.integration.cluster import FakeBroker

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = """
import sys
from blockllm.client.launcher import Launcher
from tests.integration.cluster import SLOW_BEAT, worker_config


def main() -> None:
    launcher = Launcher()
    procs = [
        launcher.start_worker(
            name, worker_config(sys.argv[1], sys.argv[2], name, [], heartbeat_interval_s=SLOW_BEAT)
        )
        for name in ("w0", "w1")
    ]
    print(" ".join(str(p.pid) for p in procs), flush=True)
    sys.stdin.read()  # until killed


if __name__ == "__main__":
    main()
"""


@pytest.mark.timeout(180)
def test_workers_and_their_fork_server_exit_when_the_launcher_is_sigkilled(
    zoo: Path, tmp_path: Path
):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    broker = FakeBroker()
    launcher = subprocess.Popen(
        [sys.executable, str(script), broker.endpoint, str(zoo)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert launcher.stdout is not None
        pids = [int(p) for p in launcher.stdout.readline().split()]
        assert len(pids) == 2, pids
        for _ in pids:  # both are up and talking to the broker
            broker.recv_kind({Kind.READY}, timeout=90)
        workers = [psutil.Process(p) for p in pids]
        (server,) = {psutil.Process(w.ppid()) for w in workers}  # the fork server
        assert server.ppid() == launcher.pid
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(30)
        _, alive = psutil.wait_procs([*workers, server], timeout=60)
        assert not alive, f"left running after the launcher's SIGKILL: {alive}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(30)
        broker.close()
