"""Issue 5's acceptance in one run: a cluster of separately launched `blockllm` processes.

    node A: blockllm broker   (zoo A: llama, variant)     node B: blockllm worker node-b
            blockllm planner  (zoo A)                             (zoo B, EMPTY at start: it
            blockllm worker node-a  (zoo A, llama:0-3)             pulls llama's blocks from
            worker "faulty" (zoo A, variant, fault hook)           the broker; llama:3-6)
    outsiders: blockllm worker "intruder" and a `blockllm generate` without keys, a
               `blockllm status` with a key pair the broker never admitted

All over TCP on 127.0.0.1 with ports the OS picks and CurveZMQ keys from `blockllm keys gen`.
Each process gets its own NOTIFY_SOCKET (a datagram socket this test binds, standing in for
systemd). The processes share one module-scoped cluster; the tests run in file order. The last
two stop it under running requests: node-b first (the broker replays its requests; the planner
restores coverage on node-a), then everything the way `systemctl stop blockllm.target` orders
it (planner and broker first, draining, then the workers).

Synchronisation is on output lines, notify datagrams, STATUS answers and exits, each with a
deadline; nothing sleeps. "faulty" is the one process not started by the `blockllm` command:
the fault hook (`WorkerProcConfig.fault_after_steps`, FaultMode.RAISE) has no flag, so a
`python -c` runs `run_worker_process` with it. Metrics ports are probed (bind :0, close),
because `--metrics-port 0` means "off" on the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq.auth

from blockllm.broker.security import generate_keys
from blockllm.client import Client
from blockllm.worker.config import EXIT_FATAL
from blockllm.zoo import Zoo
from tests.integration.cluster import hf_greedy, make_zoo

pytest.importorskip("prometheus_client")

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


@pytest.fixture(scope="module")
def acc(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Acceptance]:
    tmp = tmp_path_factory.mktemp("acceptance")
    keys, rogue = tmp / "keys", tmp / "rogue"
    gen = run_cli("keys", "gen", str(keys))
    assert gen.returncode == 0, gen.stderr
    # a node that knows the broker's key but was never admitted (`keys add` not run)
    generate_keys(rogue, broker_key=keys / "broker.key")
    llama, variant = tiny_checkpoint("llama"), tiny_checkpoint("llama", seed=1)
    zoo_a = make_zoo(tmp / "zoo-a", {"llama": llama, "variant": variant})
    zoo_b = tmp / "zoo-b"
    zoo_b.mkdir()
    n = len(Zoo(zoo_a).manifest("llama").chain)
    metrics = {name: free_port() for name in ("broker", "planner", "node-a", "node-b")}
    a = Acceptance("", keys, rogue, tmp, llama, zoo_a, zoo_b, n, {}, metrics)
    try:
        broker = a.start(
            "broker",
            [
                *BLOCKLLM,
                "-v",
                "broker",
                "--bind",
                "tcp://127.0.0.1:0",
                "--zoo",
                str(zoo_a),
                "--keys",
                str(keys),
                "--heartbeat",
                BEAT,
                "--drain-timeout",
                "60",
                "--metrics-port",
                str(metrics["broker"]),
            ],
        )
        a.endpoint = broker.wait_line(r"\[ready\] broker listening on (tcp://\S+)", 60).group(1)
        half = n // 2
        a.worker(
            "node-a",
            zoo_a,
            [f"llama:0-{half}"],
            "--keys",
            str(keys),
            "--metrics-port",
            str(metrics["node-a"]),
        )
        a.worker(
            "node-b",
            zoo_b,
            [f"llama:{half}-{n}"],
            "--keys",
            str(keys),
            "--metrics-port",
            str(metrics["node-b"]),
        )
        a.start(
            "faulty",
            [
                sys.executable,
                "-c",
                FAULTY_WORKER,
                a.endpoint,
                str(zoo_a),
                str(keys),
                f"variant:0-{n}",
            ],
        )
        # a worker without keys (and without stages) knocks while the cluster starts
        (tmp / "zoo-intruder").mkdir()
        a.worker("intruder", tmp / "zoo-intruder", [])
        # the HF references are computed while the workers start
        a.refs = {tuple(p): hf_greedy(llama, p, DRAIN_TOKENS) for p in PROMPTS}
        with a.client(timeout=30) as client:
            try:
                client.wait_ready(["llama", "variant"], timeout=120)
            except Exception as e:
                raise AssertionError(f"{e}\n{a.tails()}") from e
        # The planner joins a covered cluster, so it keeps the static placement (no churn).
        a.start(
            "planner",
            [
                *BLOCKLLM,
                "-v",
                "planner",
                "--broker",
                a.endpoint,
                "--zoo",
                str(zoo_a),
                "--keys",
                str(keys),
                "--no-replicate",
                "--no-duplicates",
                "--metrics-port",
                str(metrics["planner"]),
            ],
        )
        a.nodes["planner"].wait_notify("READY=1", 60)
        yield a
    finally:
        for node in reversed(a.nodes.values()):
            if node.popen.poll() is None:
                node.popen.terminate()
        for node in a.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.popen.wait(30)
            node.close()


def _names(acc: Acceptance) -> set[str]:
    with acc.client(timeout=30) as client:
        return {w["name"] for w in client.status()["workers"]}


@pytest.mark.timeout(200)  # the first test also starts the cluster (a shared box: slow)
def test_every_process_reports_ready_to_systemd(acc: Acceptance):
    ready = acc.nodes["broker"].wait_notify("READY=1", 10)
    assert f"STATUS=broker listening on {acc.endpoint}" in ready.split("\n")
    assert "STATUS=planning" in acc.nodes["planner"].wait_notify("READY=1", 10)
    for name in ("node-a", "node-b"):  # node-b: once it has pulled and loaded its blocks
        acc.nodes[name].wait_notify("READY=1", 10)


@pytest.mark.timeout(90)
def test_greedy_output_over_two_nodes_with_keys_equals_hf(acc: Acceptance):
    n = 12
    ids = PROMPTS[0]
    # the command-line client over the same keys, and the health check, alongside
    cli_generate = start_cli(
        "generate",
        "--broker",
        acc.endpoint,
        "--keys",
        str(acc.keys),
        "--model",
        "llama",
        "--json",
        "--input-ids",
        ",".join(map(str, ids)),
        "--max-tokens",
        str(n),
        "--timeout",
        "60",
    )
    cli_status = start_cli("status", "--broker", acc.endpoint, "--keys", str(acc.keys), "--json")
    results: dict[tuple[int, ...], list[int]] = {}
    with acc.client(timeout=60) as client:

        def one(p: tuple[int, ...]) -> None:
            results[p] = client.generate("llama", input_ids=p, max_new_tokens=n).token_ids

        threads = [threading.Thread(target=one, args=(tuple(p),)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(70)
    for p in PROMPTS:
        assert results.get(tuple(p)) == acc.refs[tuple(p)][:n], p
    # both nodes computed (the chain is split over them; the planner has seen no demand yet)
    for name in ("node-a", "node-b"):
        steps = re.search(
            rf'blockllm_batch_size_count{{worker="{name}"}} (\S+)', scrape(acc.metrics[name])
        )
        assert steps and float(steps.group(1)) > 0, name
    rc, out, err = finish(cli_generate, 90)
    assert rc == 0, err
    assert json.loads(out)["token_ids"] == acc.refs[tuple(ids)][:n]
    rc, out, err = finish(cli_status)  # covered cluster: the health check passes
    assert rc == 0, out + err
    assert {"node-a", "node-b", "faulty"} <= {w["name"] for w in json.loads(out)["workers"]}
    # node B started from an empty zoo: it pulled (and verified) what its stage needs
    zoo_b = Zoo(acc.zoo_b)
    manifest = zoo_b.manifest("llama")
    needed = set(manifest.chain[acc.chain_len // 2 :])
    if manifest.tie_word_embeddings:
        needed.add(manifest.chain[0])
    assert all(zoo_b.has_block(b) for b in needed)
    assert zoo_b.verify().ok


@pytest.mark.timeout(90)
def test_keyless_and_unadmitted_peers_are_refused(acc: Acceptance):
    broker, intruder = acc.nodes["broker"], acc.nodes["intruder"]
    # the worker without keys: the broker logged its failed handshake, never registered it
    # (nothing else without keys has talked to the broker yet)
    intruder.wait_line(r"\[ready\] worker intruder", 60)
    broker.wait_line(r"\[auth\] refused a peer .*without CurveZMQ keys", 60)
    intruder.wait_line(r"\[auth\] broker .* refused this worker's handshake: security mismatch", 30)
    assert "intruder" not in _names(acc)

    # a client without keys, and a peer whose key the broker does not admit (both at once)
    rogue_key = zmq.auth.load_certificate(acc.rogue / "client.key")[0].decode()
    mark = broker.mark()
    t0 = time.monotonic()
    keyless = start_cli(
        "generate",
        "--broker",
        acc.endpoint,
        "--model",
        "llama",
        "--input-ids",
        "1,2",
        "--max-tokens",
        "2",
        "--timeout",
        "2",
    )
    rogue = start_cli(
        "status", "--broker", acc.endpoint, "--keys", str(acc.rogue), "--timeout", "2"
    )
    rc, _, err = finish(keyless)
    # a clear error within its --timeout (plus the command's start-up), not a hang
    assert time.monotonic() - t0 < 2 + 15, "the keyless client outlived its timeout"
    assert rc != 0 and re.search(r"(?i)handshake|keys|curve", err), (rc, err)
    rc, out, err = finish(rogue)
    assert rc != 0, out + err
    # ZAP refused the unadmitted key and the broker logged it by its public key
    broker.wait_line(rf"\[auth\] refused CurveZMQ key {re.escape(rogue_key)}", 30, since=mark)

    intruder.popen.send_signal(signal.SIGTERM)
    assert intruder.wait_exit(30) == 0, intruder.text()
    assert "intruder" not in _names(acc)


@pytest.mark.timeout(60)
def test_metrics_endpoints_answer_with_the_named_series(acc: Acceptance):
    with acc.client(timeout=60) as client:
        client.generate("llama", input_ids=[3, 4, 5], max_new_tokens=4)
    text = scrape(acc.metrics["broker"])
    for series in (
        'blockllm_requests_running{model="llama"}',
        'blockllm_requests_waiting{model="llama"}',
        'blockllm_time_to_first_token_seconds_count{model="llama"}',
        'blockllm_time_per_output_token_seconds_count{model="llama"}',
    ):
        assert series in text, series
    for name in ("node-a", "node-b"):
        text = scrape(acc.metrics[name])
        for series in (
            'blockllm_stage_queue_depth{model="llama",stage=',
            f'blockllm_batch_size_count{{worker="{name}"}}',
            f'blockllm_step_latency_seconds_bucket{{le="0.005",worker="{name}"}}',
            f'blockllm_kv_used_bytes{{worker="{name}"}}',
            f'blockllm_kv_total_bytes{{worker="{name}"}}',
        ):
            assert series in text, (name, series)
    text = scrape(acc.metrics["planner"])
    for series in (
        "blockllm_planner_snapshots_total",
        "blockllm_planner_workers",
        "blockllm_planner_commands_refused_total",
    ):
        assert series in text, series


@pytest.mark.timeout(60)
def test_injected_fatal_error_exits_nonzero(acc: Acceptance):
    faulty = acc.nodes["faulty"]
    broker = acc.nodes["broker"]
    mark = broker.mark()
    with acc.client(timeout=30) as client:
        # only "faulty" serves the variant: its first step trips the fault hook
        tokens = client.stream("variant", input_ids=[1, 2, 3], max_new_tokens=4)
        assert faulty.wait_exit(30) == EXIT_FATAL, faulty.text()
        tokens.close()  # its outcome depends on the planner; the exit code is the point
    assert "InjectedFault" in faulty.text()
    # its DEAD, or its vanished connection if the broker wrote to it first: lost either way
    broker.wait_line(r"\[dead\] worker faulty pid", 30, since=mark)


class Streams:
    """The PROMPTS streamed at once (greedy, DRAIN_TOKENS each) on threads sharing `client`."""

    def __init__(self, client: Client) -> None:
        self.lock = threading.Lock()
        self.got: dict[tuple[int, ...], list[int]] = {}
        self.done: dict[tuple[int, ...], bool] = {}
        self.errors: list[BaseException] = []
        self.started = [threading.Event() for _ in PROMPTS]
        self.threads = [
            threading.Thread(target=self._one, args=(i, tuple(p), client))
            for i, p in enumerate(PROMPTS)
        ]
        for t in self.threads:
            t.start()

    def _one(self, i: int, p: tuple[int, ...], client: Client) -> None:
        try:
            for ev in client.stream("llama", input_ids=p, max_new_tokens=DRAIN_TOKENS):
                with self.lock:
                    self.got.setdefault(p, []).append(ev.token_id)
                    self.done[p] = ev.finish_reason is not None
                self.started[i].set()
        except BaseException as e:  # reported by the test's thread
            self.errors.append(e)
            self.started[i].set()

    def running(self, timeout: float = 60) -> int:
        """Once every request has its first token (accepted, running): how many still run."""
        for ev in self.started:
            assert ev.wait(timeout), "a request got no first token"
        with self.lock:
            return sum(not self.done.get(tuple(p)) for p in PROMPTS)

    def check(self, refs: dict[tuple[int, ...], list[int]], timeout: float = 90) -> None:
        """Every request completed with HF's tokens: nothing lost, nothing repeated."""
        for t in self.threads:
            t.join(timeout)
        assert not self.errors, self.errors
        for p in PROMPTS:
            assert self.got.get(tuple(p)) == refs[tuple(p)], p


@pytest.mark.timeout(120)
def test_sigterm_on_a_worker_mid_request_loses_nothing(acc: Acceptance):
    """node-b leaves (drain, DEAD, exit 0) under running requests; the broker replays them on
    what covers the chain then (the planner restores coverage on node-a if needed)."""
    node_b = acc.nodes["node-b"]
    with acc.client(timeout=90) as client:
        streams = Streams(client)
        assert streams.running(), "every request finished before the SIGTERM"
        node_b.popen.send_signal(signal.SIGTERM)
        assert node_b.wait_exit(60) == 0, node_b.text()[-5000:]
        node_b.wait_notify("STOPPING=1", 1)
        streams.check(acc.refs)


@pytest.mark.timeout(120)
def test_sigterm_drains_accepted_requests_and_every_process_exits_zero(acc: Acceptance):
    broker, planner, node_a = acc.nodes["broker"], acc.nodes["planner"], acc.nodes["node-a"]
    with acc.client(timeout=90) as client:
        streams = Streams(client)
        running = streams.running()
        # systemd's order (blockllm-worker@ is Before= the broker, the planner After= it): the
        # planner and the broker stop first, the workers once the broker has drained
        planner.popen.send_signal(signal.SIGTERM)
        broker.popen.send_signal(signal.SIGTERM)
        assert running, "every request finished before the SIGTERM: nothing was in flight"
        assert "STOPPING=1" in broker.wait_notify("STOPPING=1", 30)
        assert broker.wait_exit(90) == 0, broker.text()[-5000:]
        assert planner.wait_exit(30) == 0, planner.text()[-5000:]
        planner.wait_notify("STOPPING=1", 1)
        streams.check(acc.refs)
    drained = broker.wait_line(r"\[shutdown\] draining (\d+) requests", 1)
    assert int(drained.group(1)) >= 1
    node_a.popen.send_signal(signal.SIGTERM)
    assert node_a.wait_exit(60) == 0, node_a.text()[-5000:]
    node_a.wait_notify("STOPPING=1", 1)
    for name in ("broker", "planner", "node-a", "node-b"):
        assert "Traceback" not in acc.nodes[name].text(), acc.nodes[name].text()[-5000:]
