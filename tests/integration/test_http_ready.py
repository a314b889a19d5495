"""`blockllm http` is ready (listens, prints its URL, READY=1) only once the broker answered
its first STATUS: a request right after the ready line is served, never refused "broker
unreachable"; a broker that never answers is a clear exit 1 within --ready-timeout."""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.cluster import make_zoo
from tests.integration.test_serve_cli import BLOCKLLM, read_line

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_stderr_until(proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """stderr lines of `proc` up to the first one containing `text` (TimeoutError if none)."""
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while not (lines and text in lines[-1]):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"no {text!r} on stderr within {timeout} s: {lines}")
            line = proc.stderr.readline()
            if not line:
                raise AssertionError(f"stderr closed before {text!r}: {lines}")
            lines.append(line)
    return lines


def health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_ready_only_once_the_broker_answered(tiny_checkpoint, tmp_path: Path) -> None:
    zoo = make_zoo(tmp_path / "zoo", {"m": tiny_checkpoint("llama")})
    port = free_port()  # the broker comes later, on this port
    http = subprocess.Popen(
        [*BLOCKLLM, "http", "--broker", f"tcp://127.0.0.1:{port}", "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    broker = None
    try:
        # no broker yet: it says it waits, and prints no ready line (before: ready at once)
        lines = read_stderr_until(http, "[wait] no answer from the broker", 90)
        assert f"tcp://127.0.0.1:{port}" in lines[-1]
        with selectors.DefaultSelector() as sel:
            assert http.stdout is not None
            sel.register(http.stdout, selectors.EVENT_READ)
            assert not sel.select(0), "ready before the broker answered"
        broker = subprocess.Popen(
            [*BLOCKLLM, "broker", "--bind", f"tcp://127.0.0.1:{port}", "--zoo", str(zoo)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path,
        )
        line = read_line(http, 90)
        assert line.startswith("blockllm: OpenAI-compatible API at http://127.0.0.1:"), line
        url = line.split()[4]
        # at once, no retry: the broker's status is there (the model exists, no worker yet)
        code, body = health(url.removesuffix("/v1") + "/health")
        assert body["broker"] is True and body["models"] == 1 and "error" not in body, body
        assert code == 503 and body["uncovered"] == ["m"]
        with urllib.request.urlopen(url + "/models", timeout=10) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["m"]
        http.terminate()  # SIGTERM: the orderly stop, exit 0 (before: killed by it, 143)
        http.communicate(timeout=60)
        assert http.returncode == 0
    finally:
        for proc in (http, broker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate(timeout=30)


def test_a_broker_that_never_answers_is_a_clear_exit(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *BLOCKLLM,
            "http",
            "--broker",
            f"tcp://127.0.0.1:{free_port()}",
            "--bind",
            "127.0.0.1:0",
            "--ready-timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stdout == ""  # never ready
    assert "[dead] the broker at tcp://127.0.0.1:" in out.stderr
    assert "did not answer STATUS within 2 s" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr
