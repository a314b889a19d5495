"""The harness of test_cluster_acceptance.py: each `blockllm` process as a `Node` (its output
lines read by a thread, its own NOTIFY_SOCKET standing in for systemd), the CLI run alongside
the test, and the `Acceptance` record the module-scoped cluster fixture fills in. Waits are on
output lines, notify datagrams and exits, each with a deadline; nothing sleeps."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blockllm.client import Client

_SCRIPT = Path(sys.executable).with_name("blockllm")
BLOCKLLM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "blockllm.client.cli"]
BEAT = "0.25"  # fast liveness: a lost peer is noticed in about a second
PROMPTS = ([5, 17, 42, 8, 99], [3, 4, 5], [200, 7, 7, 31, 64, 2], [11, 12])
DRAIN_TOKENS = 48  # long enough that SIGTERM lands while every request still runs

FAULTY_WORKER = """
import logging, sys
from blockllm.worker.config import FaultMode, StageSpec, WorkerProcConfig
from blockllm.worker.proc import run_worker_process
logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
broker, zoo, keys, stage = sys.argv[1:5]
sys.exit(run_worker_process(WorkerProcConfig(
    broker=broker, zoo_dir=zoo, stages=(StageSpec.parse(stage),), name="faulty", threads=1,
    kv_budget_bytes=32 << 20, heartbeat_interval_s=0.25, keys_dir=keys,
    fault_after_steps=1, fault_mode=FaultMode.RAISE,
)))
"""


class Node:
    """One process of the cluster: its output lines (read by a thread) and its notify socket."""

    def __init__(
        self, name: str, argv: Sequence[str], cwd: Path, extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.log = cwd / f"{name}.log"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        address = f"blockllm-acceptance-{uuid.uuid4().hex}"
        self.notify.bind("\0" + address)  # abstract: no path length limit, nothing to clean
        self.states: list[str] = []
        env = dict(os.environ, NOTIFY_SOCKET="@" + address)
        for var in ("BLOCKLLM_BROKER", "BLOCKLLM_ZOO", "BLOCKLLM_LOG_LEVEL"):
            env.pop(var, None)
        env.update(extra_env or {})  # e.g. a unit's EnvironmentFile= (tests/integration/guide.py)
        self.popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            env=env,
        )
        self.lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def mark(self) -> int:
        """The number of lines so far: pass it as `since` to wait only for later lines."""
        with self._cond:
            return len(self.lines)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        """The first output line from index `since` matching `pattern`, waiting until then."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = since
        with self._cond:
            while True:
                for line in self.lines[i:]:
                    if m := rx.search(line):
                        return m
                i = len(self.lines)
                if self._eof:
                    raise AssertionError(f"{self.name} ended without /{pattern}/:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self.name}: no /{pattern}/ in {timeout} s:\n{self.tail()}"
                    )
                self._cond.wait(left)

    def wait_notify(self, state: str, timeout: float) -> str:
        """The first notify datagram carrying `state` (e.g. READY=1); returns the datagram."""
        deadline = time.monotonic() + timeout
        for seen in self.states:
            if state in seen.split("\n"):
                return seen
        while (left := deadline - time.monotonic()) > 0:
            self.notify.settimeout(left)
            try:
                seen = self.notify.recv(4096).decode()
            except TimeoutError:
                break
            self.states.append(seen)
            if state in seen.split("\n"):
                return seen
        raise TimeoutError(f"{self.name}: no {state} notification in {timeout} s: {self.states}")

    def wait_exit(self, timeout: float) -> int:
        rc = self.popen.wait(timeout)
        self._reader.join(timeout=10)
        return rc

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._reader.join(timeout=10)
        self.notify.close()
        with contextlib.suppress(OSError):  # kept with the test's tmp folder, for a post-mortem
            self.log.write_text(self.text() + "\n")


def start_cli(*args: str) -> subprocess.Popen[str]:
    """A `blockllm` command running alongside the test; `finish` collects it."""
    return subprocess.Popen(
        [*BLOCKLLM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a `start_cli` command, killed past `timeout`."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise
    return proc.returncode, out, err


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BLOCKLLM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


@dataclass
class Acceptance:
    endpoint: str
    keys: Path
    rogue: Path
    tmp: Path
    llama: Path
    zoo_a: Path
    zoo_b: Path
    chain_len: int
    nodes: dict[str, Node]
    metrics: dict[str, int]
    refs: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    def tails(self, n: int = 30) -> str:
        """The last lines of every process, for a failure message."""
        return "\n".join(f"--- {name}:\n{node.tail(n)}" for name, node in self.nodes.items())

    def client(self, **kw) -> Client:
        return Client(self.endpoint, keys_dir=str(self.keys), **kw)

    def start(self, name: str, argv: Sequence[str]) -> Node:
        node = Node(name, argv, self.tmp)
        self.nodes[name] = node
        return node

    def worker(self, name: str, zoo: Path, stages: Sequence[str], *extra: str) -> Node:
        argv = [
            *BLOCKLLM,
            "-v",
            "worker",
            "--broker",
            self.endpoint,
            "--zoo",
            str(zoo),
            "--name",
            name,
            "--threads",
            "1",
            "--kv-budget",
            "64MiB",
            "--heartbeat-interval",
            BEAT,
            "--grace",
            "30",
            *extra,
        ]
        for s in stages:
            argv += ["--stage", s]
        return self.start(name, argv)
