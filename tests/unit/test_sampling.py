"""Sampling on the head: greedy, temperature, top-k, top-p, per-row params, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from blockllm.worker.errors import BadRequest
from blockllm.worker.sampling import SamplingParams, position_seed, sample

GREEDY = SamplingParams()


def logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_with_model_logprob() -> None:
    x = logits()
    toks, lps = sample(x, [GREEDY] * 4, [5, 6, 7, 8])
    assert toks == x.argmax(-1).tolist()
    want = torch.log_softmax(x, -1).gather(1, torch.tensor(toks)[:, None]).squeeze(1)
    assert lps == pytest.approx(want.tolist(), abs=1e-5)


def test_bf16_logits_are_sampled_in_fp32() -> None:
    x = logits().bfloat16()
    toks, lps = sample(x, [GREEDY] * 4, [0] * 4)
    assert toks == x.float().argmax(-1).tolist() and all(isinstance(v, float) for v in lps)


def test_same_seed_and_position_same_token_different_seeds_differ() -> None:
    x = logits(1, 200)
    p = SamplingParams(temperature=1.5, seed=7)
    runs = [[sample(x, [p], [pos])[0][0] for pos in range(30)] for _ in range(2)]
    assert runs[0] == runs[1]
    other = [sample(x, [SamplingParams(1.5, seed=8)], [pos])[0][0] for pos in range(30)]
    assert other != runs[0]
    assert len(set(runs[0])) > 5  # positions draw differently


def test_rows_are_independent_of_the_batch() -> None:
    x = logits(6, 100)
    params = [SamplingParams(1.0, top_k=20, top_p=0.9, seed=i) for i in range(6)]
    params[2] = GREEDY
    batched, _ = sample(x, params, list(range(10, 16)))
    for i in range(6):
        alone, _ = sample(x[i : i + 1], [params[i]], [10 + i])
        assert alone[0] == batched[i]


def test_top_k_restricts_support() -> None:
    x = logits(1, 100)
    top3 = set(x[0].topk(3).indices.tolist())
    p = SamplingParams(temperature=5.0, top_k=3, seed=1)
    drawn = {sample(x, [p], [pos])[0][0] for pos in range(200)}
    assert drawn == top3
    one = SamplingParams(temperature=5.0, top_k=1, seed=1)
    assert {sample(x, [one], [pos])[0][0] for pos in range(20)} == {int(x[0].argmax())}


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draw = lambda top_p: {  # noqa: E731
        sample(x, [SamplingParams(1.0, top_p=top_p, seed=3)], [pos])[0][0] for pos in range(300)
    }
    assert draw(0.5) == {0}  # 0.5 already reaches p: token 1 is dropped
    assert draw(0.6) == {0, 1}
    assert draw(0.9) == {0, 1, 2}
    assert draw(1.0) == {0, 1, 2, 3}


def test_temperature_shapes_the_distribution() -> None:
    x = torch.log(torch.tensor([[0.6, 0.4]]))
    count = lambda t: sum(  # noqa: E731
        sample(x, [SamplingParams(t, seed=0)], [pos])[0][0] == 0 for pos in range(2000)
    )
    assert 1050 < count(1.0) < 1350  # about 60%
    assert count(0.1) > 1950  # (0.6/0.4)^10: nearly always


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=-1),
        SamplingParams(temperature=math.nan),
        SamplingParams(top_k=-1),
        SamplingParams(top_p=0.0),
        SamplingParams(top_p=1.5),
        SamplingParams(seed=1.5),  # type: ignore[arg-type]
    ],
)
def test_bad_params_are_bad_request(params: SamplingParams) -> None:
    with pytest.raises(BadRequest):
        params.validate()


def test_position_seed_is_stable() -> None:
    assert position_seed(1, 2) == position_seed(1, 2) != position_seed(2, 1)
    assert 0 <= position_seed(-5, 10**9) < 2**63


def test_greedy_ties_pick_the_first_index_like_argmax() -> None:
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    assert sample(x, [GREEDY] * 2, [0, 0])[0] == x.argmax(-1).tolist() == [1, 0]
