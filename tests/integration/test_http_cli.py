"""`blockllm serve --http` and `blockllm http` as real subprocesses: the ready line appears only
once the HTTP API answers; an open endpoint off the loopback address warns; bad key files are
one-line errors; SIGINT stops everything."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.integration.cluster import make_zoo
from tests.integration.test_serve_cli import BLOCKLLM, read_line


@pytest.fixture(scope="module")
def zoo(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("zoo"), {"m": tiny_checkpoint("llama")})


def get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=10) as r:  # no retry: it must answer now
        return r.status, json.loads(r.read())


def test_serve_http_ready_line_only_once_http_answers(zoo: Path, tmp_path: Path) -> None:
    cmd = [
        *BLOCKLLM,
        "serve",
        "--zoo",
        str(zoo),
        "--bind",
        "tcp://127.0.0.1:0",
        "--workers",
        "1",
        "--threads",
        "1",
        "--kv-budget",
        "32MiB",
        "--http",
        "127.0.0.1:0",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        line = read_line(proc, 180)
        assert line.startswith("blockllm: OpenAI-compatible API at http://127.0.0.1:"), line
        url = line.split()[-1]
        status, body = get(url + "/models")
        assert status == 200 and [m["id"] for m in body["data"]] == ["m"]
        assert get(url.removesuffix("/v1") + "/health")[0] == 200
        assert proc.stdout is not None  # printed with the first line: already buffered here
        assert proc.stdout.readline().startswith("blockllm: serving m at tcp://127.0.0.1:")
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def test_bad_api_keys_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "keys.toml"
    bad.write_text('[keys.a]\nsha256 = "nothex"\nmodels = ["m"]\n')
    out = subprocess.run(
        [*BLOCKLLM, "http", "--api-keys", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 78 and out.stderr.startswith("error: ") and "sha256" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_keys_api_add_prints_once_and_stores_the_hash(tmp_path: Path) -> None:
    from blockllm.client.http.apikeys import key_hash, load_api_keys

    path = tmp_path / "k.toml"
    out = subprocess.run(
        [
            *BLOCKLLM,
            "keys",
            "api-add",
            "alice",
            "--models",
            "a,b",
            "--rpm",
            "5",
            "--file",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("sk-blockllm-") and key not in path.read_text()
    (entry,) = load_api_keys(path).values()
    assert entry.sha256 == key_hash(key) and entry.models == ("a", "b") and entry.rpm == 5
    again = subprocess.run(
        [*BLOCKLLM, "keys", "api-add", "alice", "--models", "a", "--file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "exists already" in again.stderr


def test_503_for_an_uncovered_model_and_an_unreachable_broker(
    tiny_checkpoint, tmp_path: Path
) -> None:
    """/health is 200 only when the broker answers and every model is covered; a request for
    a model no worker serves, or any request once the broker is gone, is a 503."""
    import os
    import time
    import urllib.error

    import openai

    from blockllm.client.http.config import HttpConfig
    from tests.integration.cluster import cluster

    zoo = make_zoo(
        tmp_path / "zoo", {"m": tiny_checkpoint("llama"), "other": tiny_checkpoint("llama", seed=1)}
    )
    with cluster(zoo, {"w": ["m:0-6"]}, ["m"]) as c:
        url = c.launcher.start_http(HttpConfig(broker=c.endpoint, port=0), 60)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=30)
        health = url.removesuffix("/v1") + "/health"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(health, timeout=10)
        assert e.value.code == 503 and json.loads(e.value.read())["uncovered"] == ["other"]
        assert client.completions.create(model="m", prompt=[5, 6], max_tokens=2).choices
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="other", prompt=[5, 6], max_tokens=2)
        assert err.value.status_code == 503
        assert c.launcher.broker is not None and c.launcher.broker.pid is not None
        os.kill(c.launcher.broker.pid, 9)
        deadline = time.monotonic() + 30
        while True:  # the status task notices within a few intervals
            try:
                urllib.request.urlopen(health, timeout=10)
            except urllib.error.HTTPError as gone:
                if json.loads(gone.read()).get("broker") is False:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.2)  # polling /health with a deadline
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="m", prompt=[5, 6], max_tokens=2)
        assert err.value.status_code == 503 and "unreachable" in err.value.message
