"""`blockllm serve` as a real subprocess: announces its address, serves, stops cleanly.

The contract tested: the first stdout line ends with the broker address (its last word);
`blockllm generate --json` against it works; SIGINT stops everything with exit 0 and leaves no
process behind; a child that dies makes serve stop everything and exit non-zero.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
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
    assert sum("spawn_main" in n for n in names) >= 3  # broker + 2 workers (+ tracker)

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


def test_serve_json_announcement_and_sigterm(serve):
    proc = serve("--workers", "1", "--threads", "1", "--json", "--models", "m")
    doc = json.loads(read_line(proc, 120))
    assert doc["broker"].startswith("tcp://127.0.0.1:") and doc["models"] == ["m"]
    assert [w["stages"] for w in doc["workers"]] == [["m:0-6"]]
    assert all(psutil.pid_exists(w["pid"]) for w in doc["workers"])
    children = descendants(proc.pid)
    proc.terminate()
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_serve_exits_nonzero_when_a_worker_dies(serve):
    proc = serve("--workers", "2", "--threads", "1", "--json")
    doc = json.loads(read_line(proc, 120))
    children = descendants(proc.pid)
    os.kill(doc["workers"][1]["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "worker-1" in err and "exited unexpectedly" in err
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


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


def test_config_file_values_and_errors(serve, tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[worker]\nkv_budget_bytes = "lots"\n')
    out = subprocess.run(
        [*BLOCKLLM, "serve", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 78 and "kv_budget_bytes" in out.stderr

    good = tmp_path / "cluster.toml"
    good.write_text('[worker]\nkv_budget_bytes = "32MiB"\nthreads = 1\n')
    proc = serve("--workers", "1", "--json", "--config", str(good))
    doc = json.loads(read_line(proc, 120))
    from blockllm.client import Client

    with Client(doc["broker"]) as client:
        (worker,) = client.status()["workers"]
    assert worker["kv_total_bytes"] == 32 << 20  # from the file
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 0


@pytest.mark.parametrize("command", ["serve", "broker", "worker"])
def test_help(command: str):
    out = subprocess.run([*BLOCKLLM, command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout
