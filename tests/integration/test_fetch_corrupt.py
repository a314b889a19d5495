"""A corrupt block in the broker's zoo (issue 14, item 1): a worker that fetches it fails the
load within seconds with a typed error naming the block and the source, stores nothing bad,
keeps its loader (and the zoo's locks) free, and reports the block as one it cannot get; the
planner then places the model on a worker that holds a good copy.

Before the fix the fetch took the zoo's exclusive lock inside its own shared one and hung for
ever: no error, no READY, a zoo `gc` on that node blocked.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from blockllm.broker.protocol import LoadStage
from blockllm.zoo import Zoo
from blockllm.zoo.fsutil import is_temp
from tests.integration.cluster import cluster, hf_greedy, make_zoo, worker_config
from tests.integration.test_fetch_blocks import command
from tests.integration.test_planner import planner_cfg, wait_status


def corrupt(zoo_dir: Path, bid: str) -> None:
    """Flip the block file's last byte (tensor data): it still parses, its hash differs."""
    path = Zoo(zoo_dir).block_path(bid)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def worker_entry(body: dict, name: str) -> dict:
    return next((w for w in body["workers"] if w["name"] == name), {})


@pytest.mark.timeout(120)
def test_corrupt_source_block_fails_the_fetch_fast_and_stores_nothing(
    llama, tiny_checkpoint, tmp_path: Path
):
    other = tiny_checkpoint("llama", seed=1)  # no block in common with llama
    zoo_dir = make_zoo(tmp_path / "broker-zoo", {"llama": llama, "other": other})
    chain = Zoo(zoo_dir).manifest("llama").chain
    bad = chain[2]
    corrupt(zoo_dir, bad)
    empty = tmp_path / "node-b-zoo"
    empty.mkdir()
    with cluster(zoo_dir, {}, []) as c:
        c.launcher.start_worker("node-b", worker_config(c.endpoint, empty, "node-b", []))
        c.launcher.wait_ready([], 60.0)
        t0 = time.monotonic()
        ack = command(c.endpoint, LoadStage("llama", 0, len(chain), 0, "node-b", "c1"))
        assert ack.ok, ack
        body = wait_status(
            c,
            lambda b: worker_entry(b, "node-b").get("refused_blocks"),
            30.0,
            "the worker reports the corrupt block",
        )
        took = time.monotonic() - t0
        entry = worker_entry(body, "node-b")
        assert entry["refused_blocks"] == [bad]
        assert bad in entry["last_error"] and c.endpoint in entry["last_error"], entry
        assert "corrupt" in entry["last_error"]
        assert took < 15.0, f"the failure took {took:.1f} s"
        assert entry["stages"] == [] and not body["models"]["llama"]["covered"]
        # the loader and the zoo's locks are free: another model loads on the same worker
        ack = command(c.endpoint, LoadStage("other", 0, len(chain), 0, "node-b", "c2"))
        assert ack.ok, ack
        c.launcher.wait_ready(["other"], 60.0)
        with c.client(timeout=60) as client:
            got = client.generate("other", input_ids=[5, 17, 42], max_new_tokens=4).token_ids
        assert got == hf_greedy(other, [5, 17, 42], 4)
    local = Zoo(empty)
    assert not local.has_block(bad) and local.list_models() == ["other"]
    leftovers = [p for p in (empty / "blocks").rglob("*") if p.is_file() and is_temp(p)]
    assert leftovers == []
    report = local.gc()  # takes the collect lock exclusively: nothing holds it any more
    assert report is not None


@pytest.mark.timeout(180)
def test_planner_places_a_model_elsewhere_when_a_worker_cannot_get_a_block(llama, tmp_path):
    zoo_dir = make_zoo(tmp_path / "broker-zoo", {"llama": llama})
    chain = Zoo(zoo_dir).manifest("llama").chain
    bad = chain[1]
    good_copy = make_zoo(tmp_path / "node-b-zoo", {"llama": llama})  # b holds a good copy
    corrupt(zoo_dir, bad)
    empty = tmp_path / "node-a-zoo"
    empty.mkdir()
    with cluster(zoo_dir, {}, [], broker={"stats_interval_s": 0.2}) as c:
        # "a" sorts first: the planner's first placement puts the whole chain on it
        c.launcher.start_worker("a", worker_config(c.endpoint, empty, "a", []))
        c.launcher.start_worker("b", worker_config(c.endpoint, good_copy, "b", []))
        c.launcher.wait_ready([], 60.0)
        c.launcher.start_planner(planner_cfg(c))
        body = wait_status(
            c,
            lambda b: (
                b["models"]["llama"]["covered"] and worker_entry(b, "a").get("refused_blocks")
            ),
            90.0,
            "llama covered after worker a refused a block",
        )
        assert worker_entry(body, "a")["refused_blocks"] == [bad]
        ids = [5, 17, 42, 8, 99]
        with c.client(timeout=60) as client:
            got = client.generate("llama", input_ids=ids, max_new_tokens=6).token_ids
        assert got == hf_greedy(llama, ids, 6)
        a_spans = [(s["start"], s["end"]) for s in worker_entry(body, "a")["stages"]]
        assert all(not s <= 1 < e for s, e in a_spans), a_spans  # position 1 is not on a
    assert not Zoo(empty).has_block(bad)
