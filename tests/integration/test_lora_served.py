"""LoRA tenants served by real processes: greedy output equals HF + PEFT token for token.

One broker and two workers placed as `blockllm serve` places them serve, at once, a llama base,
three PEFT adapters of it (different ranks, targets, rsLoRA), a full fine-tune of it and an
adapter on that fine-tune, plus a qwen2 base (biases, tied embeddings) and two adapters of it.
Their requests start together, so the base's stages run base, adapter and fine-tune requests
in the same batched steps. Also: an exported adapter loads in PEFT and gives the served output,
and seeded sampling of an adapter is the same alone as in a crowd.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from blockllm.client.launcher import ServeConfig, plan_workers
from blockllm.zoo import Zoo
from blockllm.zoo.lora import train_lora
from tests.integration.cluster import Cluster, cluster, perturbed_copy, worker_config

pytestmark = pytest.mark.timeout(600)

# name -> (base model, layers, rank, targets, rslora)
ADAPTERS = {
    "llama-a1": ("llama", (0, 3), 4, ("q_proj", "v_proj"), False),
    "llama-a2": ("llama", (1, 2), 8, ("o_proj", "gate_proj", "up_proj", "down_proj"), True),
    "llama-a3": ("llama", (3, 3), 2, ("k_proj",), False),
    "ft-a": ("llama-ft", (2, 3), 4, ("q_proj", "down_proj"), False),
    "qwen-a1": ("qwen", (0, 3), 4, ("q_proj", "k_proj", "v_proj"), False),
    "qwen-a2": ("qwen", (2, 3), 16, ("up_proj", "down_proj"), True),
}
FULL = ("llama", "llama-ft", "qwen")
MODELS = (*FULL, *ADAPTERS)


@pytest.fixture(scope="module")
def folders(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    llama = tiny_checkpoint("llama")
    out = {
        "llama": llama,
        "llama-ft": perturbed_copy(llama, tmp_path_factory.mktemp("llama-ft"), layers=[2, 3]),
        "qwen": tiny_checkpoint("qwen2", seed=3),
    }
    for i, (name, (base, layers, rank, targets, rs)) in enumerate(ADAPTERS.items()):
        out[name] = train_lora(
            out[base],
            tmp_path_factory.mktemp(name) / "adapter",
            layers,
            rank=rank,
            targets=targets,
            rslora=rs,
            steps=0,  # PEFT's random init: lora_B non-zero, so the adapter changes outputs
            seed=10 + i,
        )
    return out


@pytest.fixture(scope="module")
def zoo(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    z = Zoo(root)
    for name in FULL:
        z.import_checkpoint(folders[name], name)
    for name in ADAPTERS:
        z.import_adapter(folders[name], name)  # base found by content
    return root


@functools.lru_cache(maxsize=16)
def _hf(folders_key: tuple, name: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folders = dict(folders_key)
    base = ADAPTERS[name][0] if name in ADAPTERS else name
    model = AutoModelForCausalLM.from_pretrained(folders[base], dtype=torch.float32).eval()
    if name in ADAPTERS:
        model = PeftModel.from_pretrained(model, folders[name]).eval()
    return model


def hf_peft_greedy(folders: dict[str, Path], name: str, ids: list[int], n: int) -> list[int]:
    """`PeftModel.from_pretrained(base, adapter).generate` (fp32, greedy); plain HF for a full
    model."""
    model = _hf(tuple(sorted(folders.items())), name)
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def served(zoo: Path) -> Iterator[Cluster]:
    cfg = ServeConfig(str(zoo), None, None, workers=2, models=MODELS)
    _models, plan = plan_workers(cfg)
    workers = {f"w{i}": [str(s) for s in st] for i, st in enumerate(plan) if st}
    with cluster(zoo, workers, MODELS) as c:
        yield c


def _concurrently(c: Cluster, jobs: list[tuple[str, list[int], int, dict]]) -> list[list[int]]:
    got: list[list[int] | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    with c.client(timeout=180) as client:
        start = threading.Barrier(len(jobs))

        def run(i: int) -> None:
            model, ids, n, kw = jobs[i]
            try:
                start.wait(30)
                got[i] = client.generate(model, input_ids=ids, max_new_tokens=n, **kw).token_ids
            except BaseException as e:  # reported below, with the others
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    assert not errors, errors
    return got  # type: ignore[return-value]


def test_base_adapters_and_finetunes_in_the_same_steps_match_hf_peft(
    served: Cluster, folders: dict[str, Path]
):
    jobs = [
        (m, [(11 * i + 5 * k) % 250 + 3 for k in range(2 + 3 * i)], 8 + (i % 3) * 4, {})
        for i, m in enumerate(MODELS)
    ]
    want = [hf_peft_greedy(folders, m, ids, n) for m, ids, n, _ in jobs]
    # every adapter really changes its base's output (else parity would prove nothing)
    for m, ids, n, _ in jobs:
        if m in ADAPTERS:
            assert hf_peft_greedy(folders, m, ids, n) != hf_peft_greedy(
                folders, ADAPTERS[m][0], ids, n
            ), m
    got = _concurrently(served, jobs)
    for (m, ids, n, _), g, w in zip(jobs, got, want, strict=True):
        assert g == w, f"{m}: {len(ids)} prompt tokens, {n} new"
    with served.client(timeout=30) as client:
        status = client.status()
    resident = [n for w in status["workers"] for n in w.get("stage_adapters", {}).values()]
    assert sum(resident) > 0, status["workers"]
    # adapters ride their base's stages: no stage of their own was loaded for them
    assert status["counters"]["completed"] >= len(jobs)


def test_exported_adapter_loads_in_peft_and_gives_the_served_output(
    served: Cluster, zoo: Path, folders: dict[str, Path], tmp_path: Path
):
    out = Zoo(zoo).export("llama-a2", tmp_path / "exported")
    exported = {**folders, "llama-a2": out}
    ids = [3, 14, 15, 92, 65, 35]
    want = hf_peft_greedy(exported, "llama-a2", ids, 12)
    with served.client(timeout=60) as client:
        got = client.generate("llama-a2", input_ids=ids, max_new_tokens=12).token_ids
    assert got == want == hf_peft_greedy(folders, "llama-a2", ids, 12)


def test_seeded_sampling_of_an_adapter_is_the_same_alone_and_in_a_crowd(served: Cluster):
    ids = [5, 8, 13, 21, 34]
    sample = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
    with served.client(timeout=60) as client:
        alone = client.generate("qwen-a2", input_ids=ids, max_new_tokens=16, **sample).token_ids
    crowd = [("qwen-a2", ids, 16, sample)] + [
        (m, [7, 7, 7 + i], 16, {"temperature": 0.7, "seed": i}) for i, m in enumerate(MODELS)
    ]
    assert _concurrently(served, crowd)[0] == alone


def test_a_worker_that_pulls_its_blocks_fetches_adapter_blocks_too(
    zoo: Path, folders: dict[str, Path], tmp_path: Path
):
    """A worker on an empty zoo pulls the base's blocks to load its stage, and the adapter
    blocks a request names when it first comes (on its loader thread): no adapter manifest
    needed, output equal to HF + PEFT."""
    empty = tmp_path / "pulled-zoo"
    empty.mkdir()
    n = len(Zoo(zoo).manifest("llama").chain)
    jobs = [
        ("llama-a1", [9, 8, 7, 6], 6, {}),
        ("llama-a2", [4, 4, 2], 6, {}),
        ("llama", [9, 8, 7, 6], 6, {}),
    ]
    with cluster(zoo, {}, []) as c:
        c.launcher.start_worker(
            "pulled", worker_config(c.endpoint, empty, "pulled", [f"llama:0-{n}"])
        )
        c.launcher.wait_ready(["llama", "llama-a1", "llama-a2"], 120.0)
        got = _concurrently(c, jobs)
    assert got == [hf_peft_greedy(folders, m, ids, k) for m, ids, k, _ in jobs]
    pulled = Zoo(empty)
    for name in ("llama-a1", "llama-a2"):
        assert not pulled.has_model(name)
        assert all(pulled.has_block(b) for _, b in Zoo(zoo).manifest(name).adapter_blocks)
