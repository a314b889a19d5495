"""CurveZMQ at the process level: a broker with --keys serves admitted peers only.

An admitted worker serves an admitted client; a keyless client gets a clear error within its
timeout (no hang); a keyless worker never registers (status, asked with the keys, lacks it).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from blockllm.broker.config import BrokerConfig
from blockllm.broker.security import generate_keys
from blockllm.client import Client
from blockllm.client.errors import BlockLLMError
from blockllm.client.launcher import Launcher
from blockllm.zoo import Zoo
from tests.integration.cluster import FAST_BEAT, hf_greedy, make_zoo, worker_config


def test_keys_admit_worker_and_client_refuse_keyless_ones(tiny_checkpoint, tmp_path: Path):
    ckpt = tiny_checkpoint("llama")
    zoo_dir = make_zoo(tmp_path / "zoo", {"llama": ckpt})
    keys = tmp_path / "keys"
    generate_keys(keys)
    n = len(Zoo(zoo_dir).manifest("llama").chain)
    with Launcher(log_level="WARNING", stop_timeout=15.0) as launcher:
        cfg = BrokerConfig(
            bind="tcp://127.0.0.1:0",
            zoo_dir=str(zoo_dir),
            heartbeat_s=FAST_BEAT,
            keys_dir=str(keys),
        )
        endpoint = launcher.start_broker(cfg, 60.0)
        admitted = worker_config(endpoint, zoo_dir, "w0", [f"llama:0-{n}"], keys_dir=str(keys))
        launcher.start_worker("w0", admitted)
        launcher.wait_ready(["llama"], 90.0, keys_dir=str(keys))
        # a keyless worker knocks while the checks below run (seconds): it must never register
        launcher.start_worker("intruder", worker_config(endpoint, zoo_dir, "intruder", []))

        with Client(endpoint, keys_dir=str(keys), timeout=60) as client:
            ids = [5, 17, 42]
            got = client.generate("llama", input_ids=ids, max_new_tokens=5).token_ids
            assert got == hf_greedy(ckpt, ids, 5)

        t0 = time.monotonic()
        with (
            pytest.raises(BlockLLMError, match=r"(?i)handshake|keys|broker") as err,
            Client(endpoint, timeout=3) as keyless,
        ):
            keyless.generate("llama", input_ids=[1, 2], max_new_tokens=2)
        assert time.monotonic() - t0 < 10, "a keyless client must fail within its timeout"
        assert str(err.value)
        with Client(endpoint, keys_dir=str(keys), timeout=30) as client:
            names = {w["name"] for w in client.status()["workers"]}
        assert names == {"w0"}, names  # the keyless worker is not registered
        assert launcher.workers["intruder"].is_alive()  # still knocking, never admitted


def test_a_planner_with_a_refused_key_exits_clearly(tmp_path: Path):
    """19.3: a planner whose key the broker refuses logs why and exits 78 (it used to block in
    a send forever, deaf to SIGTERM); `blockllm reload` with that key fails within --timeout."""
    import subprocess
    import sys

    keys, node = tmp_path / "keys", tmp_path / "node"
    generate_keys(keys)
    generate_keys(node, broker_key=keys / "broker.key")  # a key the broker never admitted
    with Launcher(log_level="WARNING", stop_timeout=15.0) as launcher:
        cfg = BrokerConfig(bind="tcp://127.0.0.1:0", heartbeat_s=FAST_BEAT, keys_dir=str(keys))
        endpoint = launcher.start_broker(cfg, 60.0)
        cli = [sys.executable, "-m", "blockllm.client.cli"]
        t0 = time.monotonic()
        out = subprocess.run(
            [*cli, "planner", "--broker", endpoint, "--keys", str(node)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 78, out.stderr
        assert "refused this planner's key (HANDSHAKE_FAILED" in out.stderr
        assert time.monotonic() - t0 < 45
        out = subprocess.run(
            [*cli, "reload", "--broker", endpoint, "--keys", str(node), "--timeout", "3"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1 and "broker" in out.stderr, out.stderr


def test_a_planner_waiting_for_its_broker_stops_when_asked():
    """19.3: SIGTERM's handler only calls request_shutdown(): the wait for the broker ends."""
    import threading

    from blockllm.broker.planner.config import PlannerConfig
    from blockllm.broker.planner.proc import PlannerProc, Stopped

    # an endpoint nobody binds: the planner waits for its broker (as for a host that is down)
    proc = PlannerProc(PlannerConfig(broker="inproc://no-broker-here", ready_timeout_s=120))
    try:
        threading.Timer(0.5, proc.request_shutdown).start()
        t0 = time.monotonic()
        with pytest.raises(Stopped):
            proc.connect_stats()
        assert time.monotonic() - t0 < 10
    finally:
        proc.close()
