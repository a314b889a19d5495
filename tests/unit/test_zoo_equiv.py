"""Equivalence scores: identical content is perfect, light perturbations beat heavy ones."""

from __future__ import annotations

import time

import pytest

from blockllm.zoo import Zoo
from blockllm.zoo.equiv import Measurer, candidate_pairs
from tests.unit.test_zoo_support import finetune

LIGHT, HEAVY = 1e-3, 1e-1


@pytest.fixture
def family_zoo(tmp_path, tiny_checkpoint):
    """base + a light and a heavy fine-tune of layer 1 (chain position 2)."""
    src = tiny_checkpoint("llama")
    zoo = Zoo(tmp_path / "zoo")
    zoo.import_checkpoint(src, "base")
    # same seed: the heavy fine-tune is the light one's noise scaled up 100x
    zoo.import_checkpoint(finetune(src, tmp_path / "light", {1: LIGHT}), "light")
    zoo.import_checkpoint(finetune(src, tmp_path / "heavy", {1: HEAVY}), "heavy")
    return zoo


def test_identical_block_scores_perfect(family_zoo):
    m = family_zoo.manifest("base")
    measurer = Measurer(family_zoo, prompts=4, seq_len=16)
    for position in (0, 2, len(m.chain) - 1):
        rec = measurer.measure("base", position, m.chain[position])
        assert (rec.kl, rec.agreement, rec.rel_error) == (0.0, 1.0, 0.0)
        assert rec.calibration == "tokenizer"


def test_pairs_are_only_differing_blocks_of_one_family(family_zoo, tiny_checkpoint):
    family_zoo.import_checkpoint(tiny_checkpoint("qwen2"), "other-family")
    pairs = candidate_pairs(family_zoo.manifests())
    assert {p.position for p in pairs} == {2}
    assert len(pairs) == 6  # 3 distinct layer-1 blocks, ordered pairs
    for p in pairs:
        assert family_zoo.manifest(p.host).chain[p.position] == p.original != p.substitute


def test_light_perturbation_scores_better_than_heavy(family_zoo):
    start = time.monotonic()
    result = family_zoo.measure_equivalence(prompts=4, seq_len=16)
    assert len(result.measured) == 6 and result.skipped == 0
    assert time.monotonic() - start < 30  # well under a second per pair in practice
    base = family_zoo.manifest("base").chain[2]
    light = family_zoo.equivalence(base, family_zoo.manifest("light").chain[2])
    heavy = family_zoo.equivalence(base, family_zoo.manifest("heavy").chain[2])
    assert light.host_model == heavy.host_model == "base" and light.position == 2
    assert 0 < light.kl < heavy.kl
    assert 0 < light.rel_error < heavy.rel_error
    assert light.agreement >= heavy.agreement and heavy.agreement < 1
    assert light.fingerprint == family_zoo.manifest("heavy").fingerprint
    assert (light.prompts, light.seq_len) == (4, 16)


def test_records_are_kept_skipped_and_pruned(family_zoo):
    first = family_zoo.measure_equivalence(prompts=2, seq_len=8)
    assert len(family_zoo.equivalences()) == 6
    again = family_zoo.measure_equivalence(prompts=2, seq_len=8)
    assert (len(again.measured), again.skipped) == (0, 6)
    forced = family_zoo.measure_equivalence(prompts=2, seq_len=8, force=True)
    assert len(forced.measured) == 6
    assert {(r.original, r.substitute) for r in first.measured} == {
        (r.original, r.substitute) for r in family_zoo.equivalences()
    }
    family_zoo.remove("heavy")
    assert family_zoo.gc().removed_equivalence == 4  # every record naming heavy's block
    assert len(family_zoo.equivalences()) == 2


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_suffix_rerun_matches_full_forward(tmp_path, tiny_checkpoint, family):
    """run_from (replaying recorded layer inputs) equals a full forward under substitution."""
    import torch
    from transformers import AutoModelForCausalLM

    from blockllm.zoo.hfmodel import build_hf_model, run_from, substituted, trace

    src = tiny_checkpoint(family)
    zoo = Zoo(tmp_path / "zoo")
    m = zoo.import_checkpoint(src, "m")
    model = build_hf_model(zoo, m)
    ids = torch.randint(
        0, m.config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3)
    )
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    base = trace(model, ids)
    for position, bid in enumerate(m.chain):
        scaled = {k: v * 1.05 for k, v in zoo.load_block(bid).items()}
        with substituted(model, m, position, scaled), torch.no_grad():
            logits, _out = run_from(model, base, position, ids)
            full = model(input_ids=ids).logits.float()
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        assert not torch.equal(logits, base.logits)
    with torch.no_grad():  # every substitution was undone
        assert torch.equal(model(input_ids=ids).logits.float(), base.logits)
