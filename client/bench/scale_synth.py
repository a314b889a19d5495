"""Synthetic tenants and clusters for `blockllm bench scale` (and the placement tests).

A family is a base model of `layers` decoder layers (chain: embed, layers, head) and its
fine-tunes, each owning `owned` consecutive layers of its own (a different block id there; the
rest is the base's, shared). `families(n)` picks about sqrt(n / 5) families (2 for 18 models,
20 for 2,020). Sizes default to a ~1.5B-parameter model in bf16: 100 MB a layer, 128 MB the
embedding and the head (3.46 GB a chain). Workers have `capacity` bytes of weights each and sit
in nodes of `per_node` workers. Pure and seeded: the same arguments give the same cluster.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from blockllm.broker.planner.placement import ModelInfo, WorkerInfo

MB = 1 << 20
GB = 1 << 30


@dataclass(frozen=True, slots=True)
class Tenant:
    """One synthetic model: its name, family, chain of block ids and block sizes."""

    name: str
    family: str
    chain: tuple[str, ...]
    sizes: tuple[int, ...]


def n_families(n_models: int) -> int:
    return max(1, round(math.sqrt(n_models / 5)))


def make_tenants(
    n_models: int,
    *,
    layers: int = 32,
    owned: int = 2,
    layer_bytes: int = 100 * MB,
    edge_bytes: int = 128 * MB,
    seed: int = 0,
    first: int = 0,
) -> list[Tenant]:
    """`n_models` tenants over `n_families(n_models)` families (bases first in each family);
    `first` numbers the fine-tunes from there (tenants that arrive later get fresh names)."""
    rng = random.Random(seed)
    fams = n_families(n_models)
    sizes = (edge_bytes, *([layer_bytes] * layers), edge_bytes)
    out: list[Tenant] = []
    for i in range(n_models):
        f = i % fams
        fam = f"fam{f:02d}"
        base = (f"{fam}.E", *(f"{fam}.L{p}" for p in range(layers)), f"{fam}.H")
        if i < fams and first == 0:
            out.append(Tenant(f"{fam}-base", fam, base, sizes))
            continue
        name = f"{fam}-ft{first + i:05d}"
        chain = list(base)
        start = rng.randrange(1, layers + 2 - owned)  # decoder positions 1..layers
        for p in range(start, start + owned):
            chain[p] = f"{name}.L{p - 1}"
        out.append(Tenant(name, fam, tuple(chain), sizes))
    return out


def model_infos(tenants: list[Tenant], demand: dict[str, float]) -> list[ModelInfo]:
    """ModelInfo per tenant as the planner builds them: owners per position are the tenants
    whose own chain holds the same block there (any can load it)."""
    holders: dict[tuple[int, str], list[str]] = {}
    for t in tenants:
        for p, b in enumerate(t.chain):
            holders.setdefault((p, b), []).append(t.name)
    interned: dict[tuple[int, str], tuple[str, ...]] = {
        k: tuple(sorted(v)) for k, v in holders.items()
    }
    return [
        ModelInfo(
            t.name,
            t.chain,
            t.sizes,
            fingerprint=t.family,
            demand=demand.get(t.name, 0.0),
            owners=tuple(interned[(p, b)] for p, b in enumerate(t.chain)),
        )
        for t in tenants
    ]


def zipf_demand(names: list[str], *, s: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Tokens/s-like demand: a random permutation of the names ranked by Zipf(s)."""
    order = list(names)
    random.Random(seed).shuffle(order)
    return {n: 1.0 / (k + 1) ** s for k, n in enumerate(order)}


def worker_name(node: int, i: int) -> str:
    return f"n{node:03d}.w{i:02d}"


def node_of(worker: str) -> str:
    """The node part of a synthetic worker name (`n003.w01` -> `n003`)."""
    return worker.split(".", 1)[0]


def make_workers(
    n_workers: int, *, capacity: float = 8 * GB, per_node: int = 8, nodes: bool = True
) -> list[WorkerInfo]:
    """`n_workers` workers named by node (`n003.w01`); with `nodes`, each knows its node."""
    out = []
    for i in range(n_workers):
        name = worker_name(i // per_node, i % per_node)
        out.append(WorkerInfo(name, capacity, node=node_of(name) if nodes else ""))
    return out
