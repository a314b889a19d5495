"""The head's log-probabilities (worker/logprobs.py) against HF's log_softmax, in one batched
step with other requests: the sampled token's logprob and alternatives, and a prompt's
teacher-forced logprobs (`targets`), for a prefill split over two stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockllm.worker.errors import BadRequest
from blockllm.worker.items import SamplingParams, WorkItem
from blockllm.worker.worker import Worker, WorkerConfig
from blockllm.zoo import Zoo


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory) -> tuple[Worker, tuple[str, ...], Path]:
    ckpt = tiny_checkpoint("llama")
    zoo = Zoo(tmp_path_factory.mktemp("zoo"))
    zoo.import_checkpoint(ckpt, "base")
    w = Worker(zoo, WorkerConfig(kv_budget_bytes=8 << 20, threads=1))
    a = w.load_stage("base", 0, 3)
    b = w.load_stage("base", 3, 6)
    return w, (a.key, b.key), ckpt


def _hf_logprobs(ckpt: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]  # [T, V]
    return torch.log_softmax(logits.float(), dim=-1)


def test_prompt_and_token_logprobs_match_hf(engine) -> None:
    w, keys, ckpt = engine
    prompt = [5, 17, 42, 9, 33, 120, 7]
    other = [3, 4, 5, 6]
    k = 3
    w.submit(
        WorkItem(
            "scored",
            1,
            keys,
            0,
            tokens=torch.tensor(prompt),
            max_total_len=16,
            top_logprobs=k,
            targets=tuple(prompt[1:]),
        )
    )
    w.submit(WorkItem("plain", 1, keys, 0, tokens=torch.tensor(other), max_total_len=16))
    results = {r.request_id: r for r in w.step()}
    ref = _hf_logprobs(ckpt, prompt)  # [T, V]
    got = results["scored"]
    # prompt: position i scores token i+1
    want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(torch.tensor(got.prompt_logprobs), want, atol=1e-4, rtol=0)
    assert len(got.prompt_top) == len(prompt) - 1
    for i, alts in enumerate(got.prompt_top):
        top = torch.topk(ref[i], k)
        assert [t for t, _ in alts] == top.indices.tolist()
        torch.testing.assert_close(
            torch.tensor([lp for _, lp in alts]), top.values, atol=1e-4, rtol=0
        )
    # the sampled (greedy) token: its logprob and alternatives from the last position
    assert got.token_id == int(ref[-1].argmax())
    assert got.logprob == pytest.approx(float(ref[-1].max()), abs=1e-4)
    assert [t for t, _ in got.top] == torch.topk(ref[-1], k).indices.tolist()
    plain = results["plain"]
    assert plain.top == () and plain.prompt_logprobs == () and plain.logprob is not None
    w.release("scored")
    w.release("plain")


def test_sampled_token_logprob_is_the_models(engine) -> None:
    """With temperature, the logprob and alternatives stay the model's raw distribution."""
    w, keys, ckpt = engine
    prompt = [11, 12, 13]
    sampling = SamplingParams(temperature=1.5, seed=3)
    item = WorkItem(
        "s",
        1,
        keys,
        0,
        tokens=torch.tensor(prompt),
        max_total_len=8,
        sampling=sampling,
        top_logprobs=2,
    )
    w.submit(item)
    (r,) = w.step()
    ref = _hf_logprobs(ckpt, prompt)[-1]
    assert r.logprob == pytest.approx(float(ref[r.token_id]), abs=1e-4)
    assert [t for t, _ in r.top] == torch.topk(ref, 2).indices.tolist()
    w.release("s")


@pytest.mark.parametrize(
    "fields",
    [
        {"top_logprobs": 21},
        {"top_logprobs": -1},
        {"targets": (1, 2, 3, 4)},  # as many targets as tokens: position T-1 has none
        {"targets": (1, 9999)},
        {"targets": (1,), "top_logprobs": 6},
    ],
)
def test_bad_logprob_fields_are_refused(engine, fields) -> None:
    w, keys, _ = engine
    with pytest.raises(BadRequest):
        w.submit(WorkItem("bad", 1, keys, 0, tokens=torch.tensor([1, 2, 3, 4]), **fields))
