"""Every supported family served at once through real processes, greedy output equal to HF.

The zoo is built with `blockllm zoo import` (the CLI), then broker + 2 workers are placed as
`blockllm serve` would place them and serve all ten families together (one KV geometry:
every tiny config has 2 KV heads of 16 dims). Each family gets a prompt longer than its
sliding window (decoding past it) and a short one, all twenty requests in flight at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from blockllm.client.cli import cli
from blockllm.client.launcher import ServeConfig, plan_workers
from blockllm.zoo.tiny import FAMILIES, TINY_WINDOW
from tests.integration.cluster import Cluster, cluster, hf_greedy


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint) -> dict[str, Path]:
    return {family.replace("_", "-"): tiny_checkpoint(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def zoo(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    for name, path in checkpoints.items():
        res = CliRunner().invoke(
            cli, ["zoo", "import", str(path), "--name", name, "--zoo", str(root)]
        )
        assert res.exit_code == 0, res.output
    return root


@pytest.fixture(scope="module")
def served(zoo: Path, checkpoints: dict[str, Path]) -> Iterator[Cluster]:
    models = tuple(checkpoints)
    _models, plan = plan_workers(ServeConfig(str(zoo), None, None, workers=2, models=models))
    workers = {f"w{i}": [str(s) for s in stages] for i, stages in enumerate(plan) if stages}
    assert len(workers) == 2
    with cluster(zoo, workers, models, ready_timeout=150) as c:
        yield c


def test_all_families_served_at_once_match_hf(served: Cluster, checkpoints: dict[str, Path]):
    jobs = []
    for i, model in enumerate(checkpoints):
        long = [(11 * i + 7 * k) % 300 + 3 for k in range(2 * TINY_WINDOW + 8)]
        short = [(5 * i + 3 * k) % 300 + 3 for k in range(4)]
        jobs += [(model, long, 10), (model, short, 12)]
    want = [hf_greedy(checkpoints[m], ids, n) for m, ids, n in jobs]
    got: list[list[int] | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    with served.client(timeout=180) as client:
        start = threading.Barrier(len(jobs))

        def run(i: int) -> None:
            model, ids, n = jobs[i]
            try:
                start.wait(30)
                got[i] = client.generate(model, input_ids=ids, max_new_tokens=n).token_ids
            except BaseException as e:  # reported below, with the others
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
    for i, (model, ids, n) in enumerate(jobs):
        assert got[i] == want[i], f"request {i} ({model}, {len(ids)} prompt tokens, {n} new)"
