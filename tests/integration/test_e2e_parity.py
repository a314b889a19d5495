"""End to end through real processes: greedy output equals HF `generate` token for token.

Broker + 2 workers with the stages `blockllm serve` would place (static placement), serving
two families at once (llama; qwen2 with tied embeddings and biases) and a fine-tuned pair that
shares its untouched blocks, under concurrent requests of different lengths.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockllm.broker.routing import static_placement
from blockllm.client.launcher import ServeConfig, plan_workers
from blockllm.zoo import Zoo
from tests.integration.cluster import (
    Cluster,
    cluster,
    hf_greedy,
    hf_tokenize,
    make_zoo,
    perturbed_copy,
)

MODELS = ("llama", "llama-ft", "qwen")


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    llama = tiny_checkpoint("llama")
    ft = perturbed_copy(llama, tmp_path_factory.mktemp("llama-ft"), layers=[2, 3])
    return {"llama": llama, "llama-ft": ft, "qwen": tiny_checkpoint("qwen2", seed=3)}


@pytest.fixture(scope="module")
def zoo(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("zoo"), checkpoints)


def placed(zoo: Path, models: tuple[str, ...], n_workers: int) -> dict[str, list[str]]:
    """The workers `blockllm serve` would start: {name: ["model:start-end", ...]}."""
    cfg = ServeConfig(str(zoo), None, None, workers=n_workers, models=models)
    _models, plan = plan_workers(cfg)
    return {f"w{i}": [str(s) for s in stages] for i, stages in enumerate(plan) if stages}


def test_finetuned_pair_shares_stages(zoo: Path):
    """Placed together, the pair loads its shared blocks once: only the fine-tune's own two
    layers (chain positions 3 and 4) are placed twice."""
    z = Zoo(zoo)
    plan = static_placement([z.manifest("llama"), z.manifest("llama-ft")], 2)
    positions = sorted(p for stages in plan for _m, a, b in stages for p in range(a, b))
    assert positions == [0, 1, 2, 3, 3, 4, 4, 5]


@pytest.fixture(scope="module")
def served(zoo: Path) -> Iterator[Cluster]:
    """All three models served at once by the 2 workers `blockllm serve` would start."""
    with cluster(zoo, placed(zoo, MODELS, 2), MODELS) as c:
        yield c


def test_concurrent_requests_match_hf_for_two_families_and_a_finetuned_pair(
    served: Cluster, checkpoints: dict[str, Path]
):
    # 8 requests at once, of different prompt lengths and lengths to generate
    jobs = [
        (MODELS[i % 3], [(7 * i + 3 * k) % 300 + 3 for k in range(1 + 5 * i)], 6 + 3 * i)
        for i in range(8)
    ]
    want = [hf_greedy(checkpoints[m], ids, n) for m, ids, n in jobs]
    # the fine-tune really differs from its base (else the pair proves nothing)
    assert hf_greedy(checkpoints["llama"], jobs[1][1], 20) != hf_greedy(
        checkpoints["llama-ft"], jobs[1][1], 20
    )
    got: list[list[int] | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    with served.client(timeout=120) as client:
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
            t.join(120)
        assert not errors, errors
        for i, (model, ids, n) in enumerate(jobs):
            assert got[i] == want[i], f"request {i} ({model}, {len(ids)} prompt tokens, {n} new)"
        assert client.status()["counters"]["completed"] >= len(jobs)


@pytest.mark.parametrize("model", ["qwen", "llama", "llama-ft"])
def test_streamed_text_equals_generated_text_and_hf(
    served: Cluster, checkpoints: dict[str, Path], model: str
):
    prompt = "Return a new dictionary"
    ids = hf_tokenize(checkpoints[model], prompt)
    want = hf_greedy(checkpoints[model], ids, 24)
    with served.client(timeout=60) as client:
        events = list(client.stream(model, prompt=prompt, max_new_tokens=24))
        whole = client.generate(model, prompt=prompt, max_new_tokens=24)
    assert [e.token_id for e in events] == want == whole.token_ids
    assert "".join(e.text for e in events) == whole.text
    assert events[-1].finish_reason == whole.finish_reason


@pytest.mark.slow
def test_smollm2_answers_a_text_prompt_exactly_as_hf(smollm2_checkpoint: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = make_zoo(tmp_path / "zoo", {"smollm2": smollm2_checkpoint})
    prompt = "The capital of France is"
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=16, do_sample=False
    )
    want_ids = out[0, ids.shape[1] :].tolist()
    want_text = tok.decode(want_ids, skip_special_tokens=True)
    del model
    workers = {"w0": ["smollm2:0-16"], "w1": ["smollm2:16-32"]}
    with cluster(zoo, workers, ["smollm2"], ready_timeout=180) as c, c.client() as client:
        got = client.generate("smollm2", prompt=prompt, max_new_tokens=16)
    assert got.token_ids == want_ids
    assert got.text == want_text
