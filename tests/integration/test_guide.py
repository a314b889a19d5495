"""deploy/README.md, followed as written: its marked blocks run start to finish on 127.0.0.1 with
three node folders (tests/integration/guide.py lists every substitution).

    nodeA: broker, planner, worker cpu0 (smollm2:0-16 -> the tiny model's 0-3), HTTP API
    nodeB: worker gpu0 (smollm2:16-32 -> 3-6; its zoo starts empty: it pulls from the broker)
    nodeC: added later (section 8) as worker gpu1 with gpu0's stages; then node B is removed

Keys (broker node, then each node's own pair admitted on the broker), the config file copied
to every node, the models imported, API keys, doctor on each node, each unit's ExecStart= run
the way systemd would (ordered, READY=1 awaited), status, a generate through the CLI equal to
HF greedy, a model imported while running + `blockllm reload`, adding and removing a node, a
broker restart (section 10) under a long request (drained: its output equals HF's), the
broker's key rotated (section 9: every node switched, served again), and
`systemctl stop blockllm.target` on every node (each process exits 0). Waits are on notify
datagrams, STATUS answers and exits, each with a deadline.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")  # the example config turns metrics ports on

from blockllm.client import Client
from tests.integration.cluster import hf_greedy, hf_tokenize, perturbed_copy
from tests.integration.guide import BLOCKLLM, GUIDE_PORTS, Site

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not BLOCKLLM.exists(), reason="needs the `blockllm` console script"),
]
PROMPT = "The capital of France is"  # as in the guide's first request
MAX_TOKENS = 12
LONG_TOKENS = 48  # long enough that the broker's SIGTERM lands while it runs


def os_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def site(tiny_checkpoint, tmp_path: Path) -> Iterator[Site]:
    base = tiny_checkpoint("llama")
    finetune = perturbed_copy(base, tmp_path / "finetune", layers=[2])
    s = Site(
        root=tmp_path / "nodes",
        ports={p: os_port() for p in GUIDE_PORTS},
        checkpoints={"/path/to/checkpoint": base, "/path/to/finetune": finetune},
    )
    try:
        yield s
    finally:
        s.close()


def wait_health(url: str, timeout: float) -> dict:
    """GET /health until 200 (the HTTP API has a fresh status with every model covered)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read()
        assert time.monotonic() < deadline, f"/health still {body!r}"
        time.sleep(0.2)  # its status refreshes every second: polled with a deadline


class LongRequest:
    """A greedy stream of LONG_TOKENS on its own thread and client."""

    def __init__(self, endpoint: str, keys: Path, ids: list[int]) -> None:
        self.tokens: list[int] = []
        self.done = False
        self.error: BaseException | None = None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(endpoint, keys, ids))
        self.thread.start()

    def _run(self, endpoint: str, keys: Path, ids: list[int]) -> None:
        try:
            with Client(endpoint, keys_dir=str(keys), timeout=120) as client:
                for ev in client.stream("smollm2", input_ids=ids, max_new_tokens=LONG_TOKENS):
                    self.tokens.append(ev.token_id)
                    self.done = ev.finish_reason is not None
                    self.first.set()
        except BaseException as e:  # reported by the test's thread
            self.error = e
        finally:
            self.first.set()

    def running(self) -> bool:
        """Once it has its first token: whether it still runs."""
        assert self.first.wait(60), "no first token"
        return not self.done and self.error is None

    def result(self) -> list[int]:
        self.thread.join(120)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.tokens


def test_the_guide_start_to_finish(site: Site) -> None:
    endpoint = f"tcp://127.0.0.1:{site.ports[5555]}"
    base, finetune = site.checkpoints["/path/to/checkpoint"], site.checkpoints["/path/to/finetune"]
    expected = hf_greedy(base, hf_tokenize(base, PROMPT), MAX_TOKENS)

    # 1-3: folders, keys, the config file (the same on every node)
    for node in ("nodeA", "nodeB"):
        site.run("config-folder", node)
    site.run("keys-broker-node", "nodeA")
    site.run("keys-other-node", "nodeB")
    assert (site.home("nodeA") / "etc/blockllm/keys/authorized/nodeB.key").exists()
    site.run("config-broker-node", "nodeA")
    site.run("config-other-node", "nodeB")

    # 4: the models; 6: API keys, doctor on each node, the units in the guide's order
    site.run("import", "nodeA")
    (key,) = site.run("api-keys", "nodeA")
    assert key.strip().startswith("sk-blockllm-")
    site.run("doctor-broker-node", "nodeA")
    site.run("doctor-worker-node", "nodeB")
    site.run("start-broker-node", "nodeA")
    site.run("start-worker-node", "nodeB")
    assert [s.unit for s in site.services["nodeA"]] == [
        "blockllm-worker@cpu0.service",  # Before=blockllm-broker.service
        "blockllm-broker.service",
        "blockllm-planner.service",
        "blockllm-http.service",
    ]
    keys = site.home("nodeA") / "etc/blockllm/keys"
    with Client(endpoint, keys_dir=str(keys)) as client:
        client.wait_ready(["smollm2"], timeout=120)

        # 7: status (exit 0: healthy), the HTTP API's health, a first request == HF greedy
        (status,) = site.run("status", "nodeA")
        assert "cpu0" in status and "gpu0" in status, status
        wait_health(f"http://127.0.0.1:{site.ports[8000]}/health", 60)
        health, generated = site.run("first-request", "nodeA")
        assert json.loads(health)["status"] == "ok"
        assert json.loads(generated)["token_ids"] == expected, site.tails()

        # 4 again: a model imported while running, served after `blockllm reload`
        site.run("import-while-running", "nodeA")
        client.wait_ready(["smollm2-chat"], timeout=180)
        ids = hf_tokenize(finetune, PROMPT)
        got = client.generate("smollm2-chat", input_ids=ids, max_new_tokens=MAX_TOKENS)
        assert list(got.token_ids) == hf_greedy(finetune, ids, MAX_TOKENS)

        # 8: add node C (keys, its section in the file copied everywhere, its unit) ...
        site.run("config-folder", "nodeC")
        site.run("keys-other-node", "nodeC", rename={"nodeB": "nodeC"})
        site.append_config("add-worker-section", "nodeA")
        site.run("config-other-node", "nodeB")
        site.run("config-other-node", "nodeC", rename={"nodeB": "nodeC"})
        site.run("start-added-node", "nodeC")
        deadline = time.monotonic() + 60
        while "gpu1" not in {w["name"] for w in client.status()["workers"]}:
            assert time.monotonic() < deadline, site.tails()
            time.sleep(0.2)  # STATUS polled until the broker lists it, with a deadline

        # ... and remove node B: its worker drains (exit 0), its key is revoked
        site.run("remove-node", "nodeB")
        assert not (keys / "authorized/nodeB.key").exists()
        client.wait_ready(["smollm2"], timeout=120)
        assert {w["name"] for w in client.status()["workers"]} == {"cpu0", "gpu1"}
        _, generated = site.run("first-request", "nodeA")
        assert json.loads(generated)["token_ids"] == expected, site.tails()

        # 10: the broker upgraded under a long request: it drains it, the output is HF's
        old_broker = next(s for s in site.services["nodeA"] if s.unit == "blockllm-broker.service")
        ids = hf_tokenize(base, PROMPT)
        long_run = LongRequest(endpoint, keys, ids)
        running = long_run.running()
        site.run("upgrade-broker", "nodeA")
        assert running, "the request finished before the SIGTERM: nothing was in flight"
        assert long_run.result() == hf_greedy(base, ids, LONG_TOKENS), site.tails()
        drained = old_broker.node.wait_line(r"\[shutdown\] draining (\d+) requests", 1)
        assert int(drained.group(1)) >= 1
        client.wait_ready(["smollm2"], timeout=120)
        wait_health(f"http://127.0.0.1:{site.ports[8000]}/health", 60)
        _, generated = site.run("first-request", "nodeA")
        assert json.loads(generated)["token_ids"] == expected, site.tails()

    # 9: the broker's key rotated: the broker node switches folders, node C its broker.key
    site.run("rotate-broker-key", "nodeA")
    site.run("copy-new-broker-key", "nodeC")
    site.run("switch-broker-node", "nodeA")
    site.run("switch-other-node", "nodeC")
    old_keys = site.home("nodeA") / "etc/blockllm/keys.old"
    assert (keys / "broker.key").read_bytes() != (old_keys / "broker.key").read_bytes()
    with Client(endpoint, keys_dir=str(keys)) as client:  # the new broker.key
        client.wait_ready(["smollm2"], timeout=120)
    wait_health(f"http://127.0.0.1:{site.ports[8000]}/health", 60)
    _, generated = site.run("first-request", "nodeA")
    assert json.loads(generated)["token_ids"] == expected, site.tails()

    # the final stop: every process of every node exits 0 (stop asserts it), in unit order
    for node in ("nodeA", "nodeB", "nodeC"):
        site.run("stop", node)
    assert site.running() == []
