"""Blocks across nodes: a worker with an EMPTY zoo pulls its model from the broker's zoo.

Broker (zoo with a tiny llama) + one worker started on a fresh, empty zoo directory: the worker
FETCHes the manifest and every block over its broker connection, stores them through the zoo's
own put path (hash checked), serves greedy output equal to HF, and its zoo verifies afterwards.
"""

from __future__ import annotations

from pathlib import Path

from blockllm.broker.fetch import serve_fetch
from blockllm.broker.protocol import Blob, Error, Fetch
from blockllm.zoo import Zoo
from tests.integration.cluster import cluster, hf_greedy, make_zoo, worker_config


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
        c.launcher.wait_ready(["llama"], 90.0)
        ids = [5, 17, 42, 8, 99]
        with c.client(timeout=60) as client:
            got = client.generate("llama", input_ids=ids, max_new_tokens=8).token_ids
        assert got == hf_greedy(ckpt, ids, 8)
    local = Zoo(empty)
    assert local.list_models() == ["llama"]
    assert all(local.has_block(b) for b in local.manifest("llama").chain) and n_chain > 2
    report = local.verify()
    assert report.ok, report
