"""The processes of a cluster started one by one with the fewest flags the guide shows, as an
operator tries them first: no -v, no $BLOCKLLM_LOG_LEVEL, no config file, a zoo of two model
families, a worker with an empty zoo of its own and no stages, and a planner given only
`--broker`. Each process must say what it does on its own (its `[ready]` line, the planner's
placement, the worker's loads), the planner must place both families on the one worker, output
must equal HF generate for both, and SIGTERM must stop each with exit code 0.

Waits are on output lines and exits, each with a deadline; nothing sleeps."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

import pytest

from blockllm.client import Client
from tests.integration.acceptance_nodes import BLOCKLLM, Node
from tests.integration.cluster import hf_greedy, make_zoo

PROMPT = [5, 17, 42, 8, 99]
TOKENS = 12


@pytest.mark.timeout(240)
def test_broker_worker_planner_with_fewest_flags_say_what_they_do(
    tiny_checkpoint, tmp_path: Path
) -> None:
    ckpts = {"llama": tiny_checkpoint("llama"), "qwen3": tiny_checkpoint("qwen3")}
    zoo = make_zoo(tmp_path / "zoo", ckpts)
    (tmp_path / "worker-zoo").mkdir()
    nodes: dict[str, Node] = {}
    try:
        argv = [*BLOCKLLM, "broker", "--bind", "tcp://127.0.0.1:0", "--zoo", str(zoo)]
        nodes["broker"] = broker = Node("broker", argv, tmp_path)
        endpoint = broker.wait_line(r"\[ready\] broker listening on (tcp://\S+)", 60).group(1)
        argv = [*BLOCKLLM, "worker", "--broker", endpoint, "--zoo", str(tmp_path / "worker-zoo")]
        nodes["worker"] = worker = Node("worker", argv, tmp_path)
        nodes["planner"] = planner = Node(
            "planner", [*BLOCKLLM, "planner", "--broker", endpoint], tmp_path
        )
        planner.wait_line(r"\[ready\] planner", 60)
        broker.wait_line(r"\[ready\] worker \S+ pid \d+", 90)
        for model in ckpts:
            planner.wait_line(rf"\[planner\] load {model}:0-", 60)
            worker.wait_line(rf"\[stage\] loaded {model} ", 60)
        refs = {m: hf_greedy(ckpt, PROMPT, TOKENS) for m, ckpt in ckpts.items()}
        with Client(endpoint, timeout=60) as client:
            client.wait_ready(list(ckpts), timeout=60)
            for model, ref in refs.items():
                out = client.generate(model, input_ids=PROMPT, max_new_tokens=TOKENS)
                assert out.token_ids == ref, model
        for name in ("planner", "worker", "broker"):
            nodes[name].popen.send_signal(signal.SIGTERM)
            assert nodes[name].wait_exit(60) == 0, nodes[name].tail()
        for name, node in nodes.items():
            assert "Traceback" not in node.text(), f"{name}:\n{node.tail()}"
    finally:
        for node in nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.close()
