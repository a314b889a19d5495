"""Any mix of tenants on any worker: three families of three KV geometries and a fine-tune of
each, served at once by one cluster, every greedy sequence equal to HF `generate` (fp32).

llama (2 KV heads), qwen2 (1 KV head; tied embeddings, biases) and mistral (4 KV heads, a
sliding window the longer prompts pass), each with a fine-tune (two layers perturbed), on 1, 2
and 3 workers as `blockllm serve` places them (every worker hosts stages of every family, so
its KV arena serves three geometries), and under the planner. Seeded sampling gives the same
tokens alone and in a crowd of other tenants' requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockllm.broker.planner.config import PlannerConfig
from blockllm.client.launcher import ServeConfig, plan_workers
from tests.integration.cluster import Cluster, cluster, hf_greedy, make_zoo, perturbed_copy

pytestmark = pytest.mark.timeout(300)

BASES = {"llama": 2, "qwen2": 1, "mistral": 4}  # family -> KV heads (head dim 16 each)
TENANTS = tuple(name for base in BASES for name in (base, f"{base}-ft"))
WINDOW = 8  # mistral's sliding window: the 13-token prompts plus 6 new tokens pass it
NEW = 6
FAST = {"stats_interval_s": 0.2}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from blockllm.zoo.tiny import build_tiny

    out = {
        "llama": tiny_checkpoint("llama"),
        "qwen2": tiny_checkpoint("qwen2", seed=3, kv_heads=1),
        "mistral": build_tiny(
            "mistral",
            tmp_path_factory.mktemp("mistral-w"),
            seed=5,
            kv_heads=4,
            overrides={"sliding_window": WINDOW},
        ),
    }
    for base in BASES:
        ft = tmp_path_factory.mktemp(f"{base}-ft")
        out[f"{base}-ft"] = perturbed_copy(out[base], ft, layers=[1, 2])
    return out


@pytest.fixture(scope="module")
def zoo(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("zoo"), checkpoints)


def jobs() -> list[tuple[str, list[int]]]:
    """Two requests per tenant, 12 in all: a short prompt and one longer than the window."""
    return [
        (t, [(11 * i + 5 * k + 7 * n) % 300 + 3 for k in range(n)])
        for i, t in enumerate(TENANTS)
        for n in (4, 13)
    ]


@pytest.fixture(scope="module")
def want(checkpoints: dict[str, Path]) -> list[list[int]]:
    ids = jobs()[1][1]  # each fine-tune really differs from its base, else it proves nothing
    for base in BASES:
        ft = checkpoints[f"{base}-ft"]
        assert hf_greedy(checkpoints[base], ids, 12) != hf_greedy(ft, ids, 12), base
    return [hf_greedy(checkpoints[t], ids, NEW) for t, ids in jobs()]


def placed(zoo: Path, n_workers: int) -> dict[str, list[str]]:
    """The workers `blockllm serve --workers N` would start: {name: ["model:start-end"]}."""
    _models, plan = plan_workers(ServeConfig(str(zoo), None, None, n_workers, TENANTS))
    return {f"w{i}": [str(s) for s in stages] for i, stages in enumerate(plan) if stages}


def run_all(c: Cluster, work: list[tuple[str, list[int]]], **params) -> list[list[int]]:
    """Every request at once (one thread each); their token ids in order."""
    got: list[list[int] | None] = [None] * len(work)
    errors: list[BaseException] = []
    start = threading.Barrier(len(work))
    with c.client(timeout=120) as client:

        def run(i: int) -> None:
            model, ids = work[i]
            try:
                start.wait(30)
                out = client.generate(model, input_ids=ids, max_new_tokens=NEW, **params)
                got[i] = out.token_ids
            except BaseException as e:  # reported below, with the others
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    return [g or [] for g in got]


def geometries(c: Cluster) -> dict[str, set[str]]:
    """Worker name -> the KV geometries its arena serves now (from STATUS)."""
    with c.client() as client:
        body = client.status(timeout=10)
    return {w["name"]: {g["label"] for g in w.get("kv_geometries", [])} for w in body["workers"]}


@pytest.fixture(scope="module")
def served2(zoo: Path) -> Iterator[Cluster]:
    with cluster(zoo, placed(zoo, 2), TENANTS) as c:
        yield c


LABELS = {"2x16/float32", "1x16/float32", "4x16/float32"}


def test_one_worker_serves_every_tenant_equal_to_hf(zoo: Path, want: list[list[int]]) -> None:
    with cluster(zoo, placed(zoo, 1), TENANTS) as c:
        assert geometries(c) == {"w0": LABELS}  # one arena, three geometries
        assert run_all(c, jobs()) == want


def test_two_workers_serve_every_tenant_equal_to_hf(served2: Cluster, want) -> None:
    assert geometries(served2) == {"w0": LABELS, "w1": LABELS}
    assert run_all(served2, jobs()) == want


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(served2: Cluster) -> None:
    sampled = {"temperature": 0.9, "top_k": 50, "seed": 1234}
    probe = ("mistral-ft", jobs()[9][1])
    alone = run_all(served2, [probe], **sampled)[0]
    crowd = run_all(served2, [probe, *jobs()], **sampled)[0]
    assert alone == crowd and len(alone) == NEW
    other = run_all(served2, [probe], **{**sampled, "seed": 99})[0]
    assert other != alone  # the seed matters (sampling really happened)


def test_three_workers_static_then_planner_equal_to_hf(zoo: Path, want: list[list[int]]) -> None:
    with cluster(zoo, placed(zoo, 3), TENANTS, broker=FAST) as c:
        assert all(g == LABELS for g in geometries(c).values())
        assert run_all(c, jobs()) == want  # the static layout `serve --workers 3` starts
        cfg = PlannerConfig(
            broker=c.endpoint,
            zoo_dir=str(zoo),
            replan_interval_s=0.5,
            demand_halflife_s=1.0,
            catalog_interval_s=0.2,
            load_timeout_s=30.0,
            drain_s=5.0,
            settle_s=0.0,
            unload_delay_s=0.0,
            log_level="WARNING",
        )
        c.launcher.start_planner(cfg)
        assert run_all(c, jobs()) == want  # while the planner places
        deadline = time.monotonic() + 60
        with c.client() as client:
            while True:  # until the planner routes every tenant
                body = client.status(timeout=10)
                if all(body["models"][t].get("planned_routes") for t in TENANTS):
                    break
                assert time.monotonic() < deadline, body["models"]
                threading.Event().wait(0.1)  # a polling interval, not a synchronisation
        assert run_all(c, jobs()) == want  # on the planner's layout
        assert body["counters"]["failed"] == 0


def test_a_stage_the_kv_budget_cannot_hold_is_refused_typed_and_serve_says_so(
    zoo: Path, checkpoints: dict[str, Path]
) -> None:
    import torch

    from blockllm.client.launcher.launcher import LaunchError
    from blockllm.worker.config import WorkerProcConfig
    from blockllm.worker.errors import CacheFull
    from blockllm.worker.items import WorkItem
    from blockllm.worker.worker import Worker, WorkerConfig
    from blockllm.zoo import Zoo

    page = 2 * 16 * 2 * 16 * 4  # K+V of 16 tokens of llama's 2 heads x 16 dims, fp32
    w = Worker(Zoo(zoo), WorkerConfig(kv_budget_bytes=6 * page))  # 6 pages
    key = w.load_stage("llama", 0, 6).key  # 4 layers: 4 pages of the minimum
    with pytest.raises(CacheFull, match="cannot hold"):
        w.load_stage("mistral", 0, 6)  # 4 more layers of another geometry: refused
    assert [s.model for s in w.stages()] == ["llama"]
    w.submit(WorkItem("r", 0, (key,), 0, tokens=torch.tensor(jobs()[0][1]), max_total_len=10))
    (res,) = w.step()  # the worker goes on serving what it holds
    assert res.error is None and res.token_id == hf_greedy(checkpoints["llama"], jobs()[0][1], 1)[0]
    # serve plans the workers' stages against their budget and refuses to start a layout a
    # worker would refuse, with the flag to change
    small = WorkerProcConfig(broker="", zoo_dir=str(zoo), kv_budget_bytes=6 * page)
    with pytest.raises(LaunchError, match="--kv-budget"):
        plan_workers(ServeConfig(str(zoo), None, small, 1, TENANTS))
    big = WorkerProcConfig(broker="", zoo_dir=str(zoo), kv_budget_bytes=64 << 20)
    assert plan_workers(ServeConfig(str(zoo), None, big, 2, TENANTS))[0] == TENANTS
