"""Background stage loading: a worker keeps serving while a new stage loads.

One worker serving a tiny llama is told (LOAD_STAGE, as the planner would) to load a second
model; the test-only load gate (`fault_load_gate`, a FIFO) holds that load inside the loader
thread. The test learns the load is under way when its open of the FIFO returns, serves a whole
request on the loaded model meanwhile (greedy output equal to HF), sees that the stage being
loaded is not announced yet, releases the gate, and then serves the new model once it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockllm.broker.protocol import LoadStage
from blockllm.zoo import Zoo
from tests.integration.cluster import cluster, hf_greedy, make_zoo
from tests.integration.test_fetch_blocks import command


@pytest.mark.timeout(120)
def test_requests_keep_streaming_while_a_stage_loads(tiny_checkpoint, tmp_path: Path):
    base, other = tiny_checkpoint("llama"), tiny_checkpoint("llama", seed=1)
    zoo = make_zoo(tmp_path / "zoo", {"llama": base, "other": other})
    n_chain = len(Zoo(zoo).manifest("llama").chain)
    gate = tmp_path / "load-gate"
    os.mkfifo(gate)
    ids = [5, 17, 42, 8, 99]
    kw = {"w0": {"fault_load_gate": str(gate)}}
    with cluster(zoo, {"w0": [f"llama:0-{n_chain}"]}, ["llama"], worker_kw=kw) as c:
        ack = command(c.endpoint, LoadStage("other", 0, n_chain, 0, "w0", "c1"))
        assert ack.ok, ack
        fd = os.open(gate, os.O_WRONLY)  # returns once w0's loader is inside that load
        try:
            with c.client(timeout=30) as client:
                events = list(client.stream("llama", input_ids=ids, max_new_tokens=16))
                status = client.status()
        finally:
            os.write(fd, b"\0")  # let the load go on
            os.close(fd)
        assert [e.token_id for e in events] == hf_greedy(base, ids, 16)
        (w0,) = status["workers"]
        assert [s["model"] for s in w0["stages"]] == ["llama"]  # announced once installed
        assert not status["models"]["other"]["covered"]
        c.launcher.wait_ready(["other"], 60.0)
        with c.client(timeout=30) as client:
            got = client.generate("other", input_ids=ids, max_new_tokens=8).token_ids
        assert got == hf_greedy(other, ids, 8)
