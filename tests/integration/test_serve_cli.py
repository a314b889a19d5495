"""`blockllm serve` as a real subprocess: announces its address, serves, stops cleanly.

The contract tested: the first stdout line ends with the broker address (its last word);
`blockllm generate --json` against it works; SIGINT (and SIGTERM) stops everything with exit 0
and leaves no process behind; a config file's values reach the workers; a worker that dies is
restarted while its streams complete HF-equal; so are the broker (a stream resumes across it),
the planner and the HTTP API (same port); a slot that crash-loops makes serve stop everything
and exit non-zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.cluster import hf_greedy

BLOCKLLM = [sys.executable, "-m", "blockllm.client.cli"]
PROMPT_IDS = [5, 6, 7, 8]


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next stdout line of `proc`, waiting at most `timeout` s (and not past its exit)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"no line from serve within {timeout} s")
    return proc.stdout.readline()


@pytest.fixture
def serve(zoo: Path, tmp_path: Path) -> Iterator[callable]:
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        cmd = [*BLOCKLLM, "serve", "--zoo", str(zoo), "--bind", "tcp://127.0.0.1:0", *args]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_serve_announces_serves_and_stops_on_sigint(serve, llama: Path):
    proc = serve("--workers", "2", "--threads", "1", "--kv-budget", "64MiB")
    line = read_line(proc, 120)
    assert line.startswith("blockllm: serving m at tcp://127.0.0.1:")
    address = line.split()[-1]
    children = descendants(proc.pid)
    names = {" ".join(c.cmdline()) for c in children}
    assert sum("spawn_main" in n for n in names) >= 1  # the broker (+ tracker)
    forked = [c for c in children if "forkserver" in " ".join(c.cmdline())]
    assert len(forked) >= 3  # the workers' fork server and 2 workers it forked

    out = subprocess.run(
        [
            *BLOCKLLM,
            "generate",
            "--broker",
            address,
            "--model",
            "m",
            "--json",
            "--input-ids",
            ",".join(map(str, PROMPT_IDS)),
            "--max-tokens",
            "10",
            "--timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["token_ids"] == hf_greedy(llama, PROMPT_IDS, 10)
    assert doc["finish_reason"] in ("stop", "length")

    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"


LONG_PROMPT = [11, 23, 5, 77, 140, 9]
LONG = 64  # new tokens: the kill comes as each stream has its third, 61 still to come


def worker_pid(address: str, name: str, timeout: float, other_than: int = 0) -> int:
    """The pid of worker `name` once the broker lists it (with a pid other than `other_than`)."""
    from blockllm.client import Client

    deadline = time.monotonic() + timeout
    with Client(address) as client:
        while time.monotonic() < deadline:
            for w in client.status(timeout=5)["workers"]:
                if w["name"] == name and w["pid"] != other_than:
                    return w["pid"]
            # a bounded poll of the broker's view: there is no event to wait on from outside
            time.sleep(0.1)
    raise TimeoutError(f"{name} (pid != {other_than}) not registered within {timeout} s")


def test_serve_heals_a_sigkilled_worker_then_stops_when_it_crash_loops(serve, llama: Path):
    """14.5: a worker SIGKILLed under streams is restarted and every stream ends HF-equal;
    the slot's second death within the window is a crash loop: exit 1, nothing left running."""
    from blockllm.client import Client

    want = hf_greedy(llama, LONG_PROMPT, LONG)
    args = ("--workers", "2", "--threads", "1", "--json", "--kv-budget", "64MiB")
    proc = serve(*args, "--crash-loop-deaths", "2")
    doc = json.loads(read_line(proc, 120))
    victim = doc["workers"][1]["pid"]
    started = threading.Barrier(4, timeout=120)
    results: list[list[int] | BaseException] = []

    def stream() -> None:
        tokens: list[int] = []
        try:
            with Client(doc["broker"]) as client:
                for ev in client.stream(
                    "m", input_ids=LONG_PROMPT, max_new_tokens=LONG, timeout=120
                ):
                    tokens.append(ev.token_id)
                    if len(tokens) == 3:
                        started.wait()  # every stream is running before the kill
            results.append(tokens)
        except BaseException as e:  # reported by the main thread
            started.abort()
            results.append(e)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    started.wait()
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert [r == want for r in results] == [True] * 3, results
    assert proc.poll() is None, "serve stopped instead of healing"
    second = worker_pid(doc["broker"], "worker-1", 120, other_than=victim)
    with Client(doc["broker"]) as client:  # it keeps serving
        out = client.generate("m", input_ids=PROMPT_IDS, max_new_tokens=6, timeout=60)
    assert out.token_ids == hf_greedy(llama, PROMPT_IDS, 6)
    children = descendants(proc.pid)
    assert second in {c.pid for c in children}
    os.kill(second, signal.SIGKILL)  # death 2 of the slot within the window: crash-looping
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "[restart] worker-1" in err and "killed by signal 9" in err
    assert "worker slot worker-1 is crash-looping: 2 deaths within 60 s" in err
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"


def child(serve_pid: int, comm: str, timeout: float, other_than: int = 0) -> psutil.Process:
    """serve's child process named `comm` (pid other than `other_than`), once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in psutil.Process(serve_pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if c.name() == comm and c.pid != other_than and c.status() != "zombie":
                    return c
        time.sleep(0.1)  # a bounded poll: a restart has no event to wait on from outside
    raise TimeoutError(f"no {comm} (pid != {other_than}) under serve within {timeout} s")


def http_completion(base: str, prompt: list[int], tokens: int, timeout: float) -> str:
    """The greedy text of POST /v1/completions, retrying while the API is not answering yet
    (it is restarting), up to `timeout` s."""
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    req = urllib.request.Request(
        f"{base}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["choices"][0]["text"]
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # bounded retries, as an HTTP client's own


@pytest.mark.timeout(400)
def test_serve_heals_its_broker_planner_and_http_api_then_stops_when_the_broker_crash_loops(
    serve, llama: Path
):
    """The broker SIGKILLed under a stream is restarted on the same endpoint and the stream
    resumes HF-equal; the planner and the HTTP API (same port) are restarted too; the broker's
    second death within the window is a crash loop: exit 1, nothing left running."""
    from blockllm.client import Client

    want = hf_greedy(llama, LONG_PROMPT, LONG)
    args = ("--workers", "1", "--threads", "1", "--json", "--kv-budget", "64MiB")
    proc = serve(*args, "--http", "127.0.0.1:0", "--crash-loop-deaths", "2")
    doc = json.loads(read_line(proc, 120))
    broker = child(proc.pid, "blockllm-broker", 10)
    tokens: list[int] = []
    with Client(doc["broker"]) as client:
        for ev in client.stream("m", input_ids=LONG_PROMPT, max_new_tokens=LONG, timeout=120):
            tokens.append(ev.token_id)
            if len(tokens) == 3:
                broker.kill()
    assert tokens == want
    broker = child(proc.pid, "blockllm-broker", 60, other_than=broker.pid)
    planner = child(proc.pid, "blockllm-planne", 10)
    planner.kill()
    child(proc.pid, "blockllm-planne", 60, other_than=planner.pid)
    http = child(proc.pid, "blockllm-http", 10)
    text = http_completion(doc["http"], PROMPT_IDS, 6, 60)
    assert text
    http.kill()
    http.wait(10)
    new_http = child(proc.pid, "blockllm-http", 60, other_than=http.pid)
    assert http_completion(doc["http"], PROMPT_IDS, 6, 60) == text  # same port, same answer
    assert proc.poll() is None, "serve stopped instead of healing"
    children = [*descendants(proc.pid), new_http]
    broker.kill()  # its second death within the window: crash-looping
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 1, err
    for what in ("broker", "planner", "http"):
        assert f"[restart] {what} (pid" in err, err
    assert "broker is crash-looping: 2 deaths within 60 s" in err
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"


def test_serve_without_models_fails_with_one_line(tmp_path: Path):
    out = subprocess.run(
        [*BLOCKLLM, "serve", "--zoo", str(tmp_path / "empty"), "--bind", "tcp://127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error: no models in zoo")
    assert "blockllm zoo import" in out.stderr


def test_config_file_values_json_announcement_and_sigterm(serve, tmp_path: Path):
    """A bad config file is refused (exit 78); a good one's values reach the worker; --json
    announces the broker, models and workers; SIGTERM stops everything with exit 0."""
    from blockllm.client import Client

    bad = tmp_path / "bad.toml"
    bad.write_text('[worker]\nkv_budget_bytes = "lots"\n')
    out = subprocess.run(
        [*BLOCKLLM, "serve", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 78 and "kv_budget_bytes" in out.stderr

    good = tmp_path / "cluster.toml"
    good.write_text('[worker]\nkv_budget_bytes = "32MiB"\nthreads = 1\n')
    proc = serve("--workers", "1", "--json", "--models", "m", "--config", str(good))
    doc = json.loads(read_line(proc, 120))
    assert doc["broker"].startswith("tcp://127.0.0.1:") and doc["models"] == ["m"]
    assert [w["stages"] for w in doc["workers"]] == [["m:0-6"]]
    assert all(psutil.pid_exists(w["pid"]) for w in doc["workers"])
    with Client(doc["broker"]) as client:
        (worker,) = client.status()["workers"]
    assert worker["kv_total_bytes"] == 32 << 20  # from the file
    children = descendants(proc.pid)
    proc.terminate()
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


@pytest.mark.parametrize("command", ["serve", "broker", "worker"])
def test_help(command: str):
    out = subprocess.run([*BLOCKLLM, command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout
