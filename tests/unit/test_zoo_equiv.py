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
