"""The planner's stage keys (planner/owners.py `Owners.key`) are memoized per model over
catalog re-reads while the model's manifest is equal: on random catalogs, re-read as new
mappings with equal copies, changed manifests, models gone and back, every key equals
zoo.chain.stage_key's (None for an unknown model or span); keys shared by content (a
family's models with the same blocks over a span) never leak to another family."""

from __future__ import annotations

import dataclasses
import random

from blockllm.broker.planner.owners import Owners
from blockllm.zoo.chain import stage_key
from tests.unit.broker_harness import manifest


def plain(manifests: dict, model: str, start: int, end: int) -> str | None:
    m = manifests.get(model)
    if m is None:
        return None
    try:
        return stage_key(m, start, end)
    except Exception:  # a span the chain lacks; no family to key by
        return None


def test_memoized_keys_equal_the_plain_ones_over_catalog_rereads() -> None:
    rng = random.Random(7)
    names = [f"m{i}" for i in range(6)]
    catalog = {n: manifest(n, {rng.randrange(1, 5): f"{i:064x}"}) for i, n in enumerate(names)}
    owners = Owners()
    for step in range(300):
        r = rng.random()
        if r < 0.2:  # re-read: a new mapping of equal copies
            catalog = {n: dataclasses.replace(m) for n, m in catalog.items()}
        elif r < 0.3:  # a model changed under its name (another block, or tied)
            n = rng.choice(names)
            changes = {rng.randrange(0, 6): f"{step:064x}"}
            m = manifest(n, changes)
            if rng.random() < 0.3:
                m = dataclasses.replace(m, tie_word_embeddings=True)
            if rng.random() < 0.2:  # the same blocks in another family: another key
                m = dataclasses.replace(m, fingerprint=rng.choice(["other", ""]))
            catalog = {**catalog, n: m}
        elif r < 0.4:  # a model gone, or back
            n = rng.choice(names)
            catalog = {k: v for k, v in catalog.items() if k != n} if n in catalog else catalog
            if rng.random() < 0.5:
                catalog = {**catalog, n: manifest(n)}
        for _ in range(5):
            model = rng.choice([*names, "unknown"])
            start = rng.randrange(0, 6)
            end = rng.randrange(start, 8)
            assert owners.key(catalog, model, start, end) == plain(catalog, model, start, end)
