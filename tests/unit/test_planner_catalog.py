"""The planner's catalog from the broker (14.6): the document the broker serves over FETCH,
its chunks, its parsing, and when the Planner reads it again."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from blockllm.broker.fetch import catalog_document, serve_fetch
from blockllm.broker.models import ZooCatalog
from blockllm.broker.planner.catalog import CatalogUnavailable, parse_catalog
from blockllm.broker.planner.planner import Planner
from blockllm.broker.protocol import Blob, Error, Fetch
from tests.unit.test_planner import MANIFESTS, cfg, snapshot


@pytest.fixture(scope="module")
def measured(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zoo of m and its fine-tune ft (layer 2 changed), equivalences measured."""
    from blockllm.zoo import Zoo
    from tests.integration.cluster import make_zoo, perturbed_copy

    ft = perturbed_copy(llama, tmp_path_factory.mktemp("ft"), layers=[2])
    root = make_zoo(tmp_path_factory.mktemp("zoo"), {"m": llama, "ft": ft})
    Zoo(root).measure_equivalence(prompts=2, seq_len=8)
    return root


def fetch_all(zoo: Path, doc: bytes, chunk: int) -> bytes:
    """The catalog through serve_fetch, `chunk` bytes at a time (as BrokerCatalog asks)."""
    data = b""
    while True:
        blob, part = serve_fetch(zoo, Fetch("r", "catalog", "", len(data), chunk), lambda: doc)
        assert isinstance(blob, Blob) and blob.total == len(doc) and part is not None
        data += part
        if len(data) == blob.total:
            return data


def test_the_broker_serves_manifests_and_equivalences_the_planner_reads(measured: Path):
    from blockllm.zoo import Zoo

    zoo = Zoo(measured)
    doc = catalog_document(ZooCatalog(measured)(), measured)
    assert fetch_all(measured, doc, 100) == doc  # chunked like any zoo object
    manifests, records = parse_catalog(doc)
    assert sorted(manifests) == ["ft", "m"]
    assert manifests["ft"].chain == zoo.manifest("ft").chain
    assert manifests["m"].fingerprint == zoo.manifest("m").fingerprint
    assert records and records == zoo.equivalences()  # EquivalenceRecords, equal field by field


def test_a_bad_catalog_or_offset_is_a_typed_answer(measured: Path):
    with pytest.raises(CatalogUnavailable):
        parse_catalog(b'{"models": 3}')
    with pytest.raises(CatalogUnavailable):
        parse_catalog(b"\xff")
    answer, data = serve_fetch(measured, Fetch("r", "catalog", "", 10**9), lambda: b"{}")
    assert isinstance(answer, Error) and answer.code == "BAD_REQUEST" and data is None


def test_the_planner_reads_the_catalog_again_when_the_broker_reloads():
    reads: list[int] = []

    def catalog():
        reads.append(1)
        return MANIFESTS, []

    p = Planner(cfg(), catalog)
    body = snapshot({"w0": [("m", 0, 6), ("ft", 0, 6)]})
    p.on_stats(replace(body, catalog_gen=1), 0.0)
    p.on_stats(replace(body, catalog_gen=1), 1.0)
    assert len(reads) == 1  # same models, same generation: nothing to re-read
    p.on_stats(replace(body, catalog_gen=2), 2.0)  # a reload (e.g. equivalences measured)
    assert len(reads) == 2


def test_the_planner_keeps_its_catalog_when_the_broker_does_not_answer():
    answers = [(MANIFESTS, []), CatalogUnavailable("no catalog within 5 s")]

    def catalog():
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    p = Planner(cfg(), catalog)
    body = snapshot({"w0": [("m", 0, 6), ("ft", 0, 6)]})
    p.on_stats(replace(body, catalog_gen=1), 0.0)
    p.on_stats(replace(body, catalog_gen=2), 1.0)  # the read fails: logged, tried again later
    assert sorted(p.manifests) == ["ft", "m"]
