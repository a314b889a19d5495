"""A broker upgrade under a long request (19.4): SIGTERM with a drain shorter than the request,
then a new broker on the same address. The stopping broker ends the request with SHUTTING_DOWN;
the client resumes it on the new broker from the tokens it has (workers reconnect by
themselves), and the whole output equals HF's, as after a broker SIGKILL."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from blockllm.broker.config import BrokerConfig
from blockllm.client.launcher.local import FAST_BEAT_S
from tests.integration.cluster import cluster, hf_greedy

PROMPT = [11, 23, 5, 77, 140, 9]
LONG = 120


@pytest.mark.timeout(240)
def test_sigterm_and_restart_under_a_long_request_loses_nothing(zoo: Path, llama: Path):
    want = hf_greedy(llama, PROMPT, LONG)
    drain = {"drain_timeout_s": 0.2}
    kw = {"w0": {"fault_step_delay_s": 0.02}}  # the request surely outlives the drain
    with cluster(zoo, {"w0": ["m:0-6"]}, ["m"], broker=drain, worker_kw=kw) as c:
        old = c.launcher.broker
        assert old is not None and old.pid is not None
        with c.client(timeout=180, connect_timeout=180) as client:
            tokens, after = [], 0
            for ev in client.stream("m", input_ids=PROMPT, max_new_tokens=LONG):
                tokens.append(ev.token_id)
                if len(tokens) == 3:
                    os.kill(old.pid, signal.SIGTERM)  # the upgrade: drain, then exit 0
                    assert c.launcher.wait_exit(old, 60) == 0
                    cfg = BrokerConfig(bind=c.endpoint, zoo_dir=str(zoo), heartbeat_s=FAST_BEAT_S)
                    assert c.launcher.start_broker(replace(cfg, **drain), 60) == c.endpoint
                elif len(tokens) > 3:
                    after += 1
            assert tokens == want
            assert after > 0
            assert client.status()["counters"]["requests"] >= 1  # the new broker served it
