"""Blocks across nodes: a worker with an EMPTY zoo pulls its model from the broker's zoo.

Broker (zoo with a tiny llama) + one worker started on a fresh, empty zoo directory: the worker
FETCHes the manifest and every block over its broker connection, stores them through the zoo's
own put path (hash checked), serves greedy output equal to HF, and its zoo verifies afterwards.
A LOAD_STAGE of a model its zoo lacks is fetched the same way, over the connection the worker
registered with: the broker counts FETCHes by the identity they came from.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from blockllm.broker import frames
from blockllm.broker.fetch import serve_fetch
from blockllm.broker.protocol import Ack, Blob, Error, Fetch, LoadStage, Message
from blockllm.broker.sockets import make_socket
from blockllm.zoo import Zoo
from tests.integration.cluster import cluster, hf_greedy, make_zoo, worker_config


def command(endpoint: str, msg: Message, timeout: float = 30.0) -> Ack:
    """Send a planner command to the broker from a fresh DEALER; its ACK."""
    ctx = zmq.Context.instance()
    sock = make_socket(ctx, zmq.DEALER, endpoint, bind=False, linger_ms=0)
    try:
        sock.send_multipart(frames.encode(msg))
        while sock.poll(int(timeout * 1000)):
            reply, _ = frames.decode(sock.recv_multipart(copy=False))
            if isinstance(reply, Ack):
                return reply
        raise TimeoutError(f"no ACK for {msg} within {timeout} s")
    finally:
        sock.close(linger=0)


def test_serve_fetch_chunks_and_refusals(tiny_checkpoint, tmp_path: Path):
    zoo_dir = make_zoo(tmp_path / "zoo", {"llama": tiny_checkpoint("llama")})
    bid = Zoo(zoo_dir).manifest("llama").chain[1]
    whole = Zoo(zoo_dir).block_path(bid).read_bytes()
    got, offset = bytearray(), 0
    while offset < len(whole):
        blob, data = serve_fetch(zoo_dir, Fetch("r", "block", bid, offset, 1000))
        assert isinstance(blob, Blob) and blob.total == len(whole) and data
        assert blob.tensors[0].shape == (len(data),) and len(data) <= 1000
        got += data
        offset += len(data)
    assert bytes(got) == whole
    for bad in (
        Fetch("r", "block", "../../etc/passwd"),
        Fetch("r", "manifest", "nope"),
        Fetch("r", "tokenizer", "llama"),
        Fetch("r", "block", bid, len(whole) + 1),
    ):
        assert isinstance(serve_fetch(zoo_dir, bad)[0], Error), bad


def test_worker_with_empty_zoo_pulls_blocks_and_matches_hf(tiny_checkpoint, tmp_path: Path):
    ckpt = tiny_checkpoint("llama")
    zoo_dir = make_zoo(tmp_path / "broker-zoo", {"llama": ckpt})
    empty = tmp_path / "node-b-zoo"
    empty.mkdir()
    n_chain = len(Zoo(zoo_dir).manifest("llama").chain)
    with cluster(zoo_dir, {}, []) as c:
        c.launcher.start_worker(
            "node-b", worker_config(c.endpoint, empty, "node-b", [f"llama:0-{n_chain}"])
        )
        body = c.launcher.wait_ready(["llama"], 90.0)
        ids = [5, 17, 42, 8, 99]
        with c.client(timeout=60) as client:
            got = client.generate("llama", input_ids=ids, max_new_tokens=8).token_ids
        assert got == hf_greedy(ckpt, ids, 8)
    # It fetched before its READY, over the socket it then registered with: not yet a worker
    # of the broker while it fetched (no routes, no pings), and every chunk was served.
    blocks = set(Zoo(zoo_dir).manifest("llama").chain)
    counters = body["counters"]
    assert counters["fetches"] > len(blocks) and counters["fetches_by_workers"] == 0
    assert counters["fetch_bytes"] >= sum(Zoo(zoo_dir).block_nbytes(b) for b in blocks)
    local = Zoo(empty)
    assert local.list_models() == ["llama"]
    assert all(local.has_block(b) for b in local.manifest("llama").chain) and n_chain > 2
    report = local.verify()
    assert report.ok, report


def test_load_stage_fetches_over_the_registered_connection(tiny_checkpoint, tmp_path: Path):
    base, other = tiny_checkpoint("llama"), tiny_checkpoint("llama", seed=1)
    zoo_dir = make_zoo(tmp_path / "broker-zoo", {"llama": base, "other": other})
    node = make_zoo(tmp_path / "node-b-zoo", {"llama": base})  # lacks "other"
    n_chain = len(Zoo(zoo_dir).manifest("llama").chain)
    with cluster(zoo_dir, {}, []) as c:
        c.launcher.start_worker(
            "node-b", worker_config(c.endpoint, node, "node-b", [f"llama:0-{n_chain}"])
        )
        assert c.launcher.wait_ready(["llama"], 90.0)["counters"]["fetches"] == 0
        ack = command(c.endpoint, LoadStage("other", 0, n_chain, 0, "node-b", "c1"))
        assert ack.ok, ack
        body = c.launcher.wait_ready(["other"], 60.0)
        ids = [5, 17, 42, 8, 99]
        with c.client(timeout=60) as client:
            got = client.generate("other", input_ids=ids, max_new_tokens=8).token_ids
        assert got == hf_greedy(other, ids, 8)
    # Every FETCH came from the identity registered as worker node-b (a socket of its own
    # would have an identity the broker does not know).
    counters = body["counters"]
    assert counters["fetches"] > len(set(Zoo(zoo_dir).manifest("other").chain))
    assert counters["fetches_by_workers"] == counters["fetches"]
    local = Zoo(node)
    assert sorted(local.list_models()) == ["llama", "other"]
    assert local.verify().ok
