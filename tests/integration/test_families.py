"""Every supported family through the generic path, in-process: the engine's greedy tokens
and log-probs equal HF's, fine-tunes share blocks with their base, equivalence is measured,
export round-trips. (tests/integration/test_families_served.py runs them all through real
processes at once.)

Each family's tiny checkpoint (zoo/tiny.py) exercises what sets it apart: q/k norms,
post-norms, soft-caps, multipliers, fused projections, learned positions, per-layer-type
windows and rope. Prompts of up to 40 tokens pass the 16-token sliding window, and the
`FEATURES` check proves each of those differences changes HF's own output on these prompts,
so a runner that ignored it could not pass.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from blockllm.worker.worker import Worker, WorkerConfig
from blockllm.zoo import Zoo
from blockllm.zoo.families import SUPPORTED_MODEL_TYPES, layout
from blockllm.zoo.tiny import FAMILIES, TINY_WINDOW
from tests.integration.engine_driver import Driver, cuts_to_hops, eos_ids, make_reqs
from tests.unit.test_zoo_support import copy_tokenizer, decoder_layers, read_tensors

# (prompt length, join tick, max new tokens): two prompts longer than the window, decodes
# that run past it, short ones joining later
PLAN = ((40, 0, 10), (5, 0, 12), (1, 1, 8), (33, 2, 9), (19, 3, 6))
# a config change that must change HF's greedy output on PLAN's prompts (else parity on that
# family would not prove the feature is served)
FEATURES = {
    "qwen3": {"sliding_window": 4096, "layer_types": ["full_attention"] * 4},
    "gemma2": {"attn_logit_softcapping": None},
    "gemma3_text": {"sliding_window": 4096},
    "phi3": {"sliding_window": None},
    "granite": {"embedding_multiplier": 1.0, "residual_multiplier": 1.0},
    "gpt2": {"scale_attn_by_inverse_layer_idx": False},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _hf(path: str, changes: str = "{}"):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    for k, v in json.loads(changes).items():
        setattr(cfg, k, v)
    return AutoModelForCausalLM.from_pretrained(path, config=cfg).eval()


def hf_run(path: Path, prompt: list[int], max_new: int, **changes) -> tuple[list[int], list]:
    """HF greedy tokens and each token's log-prob under the model's raw logits."""
    model = _hf(str(path), json.dumps(changes, sort_keys=True))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logps = [
        torch.log_softmax(lg[0].float(), -1)[t].item()
        for lg, t in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logps


@pytest.fixture(scope="module")
def family_zoo(tiny_checkpoint, tmp_path_factory):
    """family -> (zoo with the tiny checkpoint as "m", its folder); imported once."""
    cache: dict[str, tuple[Zoo, Path]] = {}

    def get(family: str) -> tuple[Zoo, Path]:
        if family not in cache:
            ckpt = tiny_checkpoint(family)
            zoo = Zoo(tmp_path_factory.mktemp(f"zoo-{family}"))
            zoo.import_checkpoint(ckpt, "m")
            cache[family] = (zoo, ckpt)
        return cache[family]

    return get


def test_every_target_family_is_supported() -> None:
    from blockllm.client.cli.models import TINY_FAMILIES

    assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_hf_greedy_and_logprobs(family_zoo, family: str) -> None:
    """Two workers, three stages (embed alone, layers, layers + head): staggered ragged
    requests, prefills and decodes batched together, equal to HF token for token."""
    zoo, ckpt = family_zoo(family)
    m = zoo.manifest("m")
    n = m.num_layers + 2
    reqs = make_reqs(m.config["vocab_size"], plan=PLAN)
    assert max(len(r.prompt) for r in reqs) > TINY_WINDOW  # long prompts pass the window
    driver = Driver(cuts_to_hops(zoo, "m", [[0, 1, 3], [3, n]]), eos_ids(zoo, "m")).add(*reqs)
    logps: dict[str, list[float]] = {r.rid: [] for r in reqs}
    handle = driver.handle

    def spy(res) -> None:
        if res.logprob is not None:
            logps[res.request_id].append(res.logprob)
        handle(res)

    driver.handle = spy
    outs = driver.run()
    assert sum(map(len, outs.values())) > 30
    for r in reqs:
        want, want_lp = hf_run(ckpt, r.prompt, r.max_new)
        assert outs[r.rid] == want, f"{family} {r.rid} (prompt {len(r.prompt)})"
        assert logps[r.rid] == pytest.approx(want_lp, abs=2e-4), f"{family} {r.rid} logprobs"


@pytest.mark.parametrize("family", sorted(FEATURES))
def test_the_family_difference_changes_hf_output(family_zoo, family: str) -> None:
    """Without its difference the family would answer otherwise on PLAN's prompts."""
    _zoo, ckpt = family_zoo(family)
    prompts = make_reqs(384, plan=PLAN)
    assert any(
        hf_run(ckpt, r.prompt, r.max_new)[0]
        != hf_run(ckpt, r.prompt, r.max_new, **FEATURES[family])[0]
        for r in prompts
    ), f"{family}: {FEATURES[family]} does not change the output"


def _variant(src: Path, out: Path, seed: int = 1) -> Path:
    """A fine-tune: decoder layer 2 and the final norm nudged, everything else identical."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    lay = layout(model.config.to_dict())
    gen = torch.Generator().manual_seed(seed)
    norm = getattr(model, lay.prefix).get_submodule(lay.norm)
    with torch.no_grad():
        for p in [*decoder_layers(model)[2].parameters(), *norm.parameters()]:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    copy_tokenizer(src, out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_shares_blocks_equiv_and_export(tmp_path, tiny_checkpoint, family: str) -> None:
    base = tiny_checkpoint(family)
    ft = _variant(base, tmp_path / "ft")
    zoo = Zoo(tmp_path / "zoo")
    mb, mf = zoo.import_checkpoint(base, "base"), zoo.import_checkpoint(ft, "ft")
    n = mb.num_layers
    assert mb.fingerprint == mf.fingerprint and len(mb.chain) == n + 2
    differ = [p for p in range(n + 2) if mb.chain[p] != mf.chain[p]]
    assert differ == [3, n + 1]  # layer 2 and the head; embed and the other layers shared
    assert zoo.du()["shared_blocks"] == n
    w = Worker(zoo, WorkerConfig(kv_budget_bytes=1 << 20))
    assert w.load_stage("base", 0, 3).key == w.load_stage("ft", 0, 3).key

    result = zoo.measure_equivalence(prompts=2, seq_len=8)
    got = {(r.position, r.host_model) for r in result.measured}
    assert got == {(3, "base"), (3, "ft"), (n + 1, "base"), (n + 1, "ft")}
    for r in result.measured:
        assert r.kl >= 0 and 0 <= r.agreement <= 1 and r.rel_error > 0, r

    out = zoo.export("ft", tmp_path / "export")
    exported, original = read_tensors(out), read_tensors(ft)
    tied = f"{layout(mf.config).lm_head}.weight" if mf.tie_word_embeddings else None
    assert set(exported) == set(original) - {tied}
    assert all(torch.equal(exported[k], original[k]) for k in exported)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (ft / "config.json").read_text()
    )
    prompt = make_reqs(mf.config["vocab_size"], plan=((12, 0, 6),))[0].prompt
    assert hf_run(out, prompt, 6) == hf_run(ft, prompt, 6)


def test_learned_positions_past_the_table_are_refused(family_zoo) -> None:
    from blockllm.worker.errors import BadRequest
    from blockllm.worker.items import WorkItem

    zoo, _ckpt = family_zoo("gpt2")
    w = Worker(zoo, WorkerConfig(kv_budget_bytes=1 << 22))
    key = w.load_stage("m", 0, 6).key
    limit = zoo.manifest("m").config["n_positions"]
    with pytest.raises(BadRequest, match=f"model's {limit} positions"):
        w.submit(WorkItem("r", 0, (key,), 0, tokens=torch.tensor([3, 4]), max_total_len=limit + 1))
    w.submit(WorkItem("r", 0, (key,), 0, tokens=torch.tensor([3, 4]), max_total_len=limit))
    assert w.step()[0].error is None


def test_gpt2_checkpoint_without_the_base_prefix_imports(tmp_path, tiny_checkpoint) -> None:
    """The hub's original GPT-2 stores `h.0.attn...`, `wte.weight` (no `transformer.`)."""
    from tests.unit.test_zoo_support import rewrite_checkpoint

    src = tiny_checkpoint("gpt2")
    tensors = {k.removeprefix("transformer."): t for k, t in read_tensors(src).items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)  # an old buffer HF ignores on load
    bare = rewrite_checkpoint(src, tmp_path / "bare", tensors)
    zoo = Zoo(tmp_path / "zoo")
    assert zoo.import_checkpoint(bare, "bare").chain == zoo.import_checkpoint(src, "m").chain
