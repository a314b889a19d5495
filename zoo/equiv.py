"""Equivalence of non-identical blocks at the same chain position of one family.

For an ordered pair (original a, substitute b) at position p, with host model A (the first
model, by name, whose chain has a at p):
- rel_error: ||f_a(x) - f_b(x)|| / ||f_a(x)||, x = A's real activations entering p on the
  calibration prompts (the head's output is the logits);
- kl: mean over calibration tokens of KL(P_A || P_A[a->b]) of next-token distributions (nats);
- agreement: fraction of calibration tokens where A and A[a->b] pick the same greedy token.
Records live in `equivalence/<a>-<b>.json`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import permutations

import torch

from blockllm.zoo.equiv_store import EquivalenceRecord, EquivalenceStore
from blockllm.zoo.manifest import ModelManifest
from blockllm.zoo.store import Zoo

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Pair:
    """One measurement to make: replace `original` by `substitute` in `host` at `position`."""

    host: str
    position: int
    original: str
    substitute: str


def candidate_pairs(manifests: dict[str, ModelManifest]) -> list[Pair]:
    """Every ordered pair of distinct blocks at one position of one family."""
    # (fingerprint, position) -> block id -> first host model by name
    slots: dict[tuple[str, int], dict[str, str]] = {}
    for name in sorted(manifests):
        m = manifests[name]
        if m.adapter is not None:  # its chain is its base's; hosts run without adapters
            continue
        for p, bid in enumerate(m.chain):
            slots.setdefault((m.fingerprint, p), {}).setdefault(bid, name)
    pairs = []
    for (_fp, p), hosts in sorted(slots.items(), key=lambda kv: kv[0][1]):
        for a, b in permutations(sorted(hosts), 2):
            pairs.append(Pair(hosts[a], p, a, b))
    return pairs


class Measurer:
    """Runs host models on calibration prompts; one baseline per host, one run per pair."""

    def __init__(self, zoo: Zoo, prompts: int, seq_len: int, seed: int = 0) -> None:
        self.zoo, self.prompts, self.seq_len, self.seed = zoo, prompts, seq_len, seed
        self._host: str | None = None

    def _load_host(self, name: str) -> None:
        from blockllm.zoo.hfmodel import build_hf_model, calibration_ids, trace

        if self._host == name:
            return
        m = self.zoo.manifest(name)
        model = build_hf_model(self.zoo, m)
        ids, source = calibration_ids(self.zoo, m, self.prompts, self.seq_len, self.seed)
        self._host = name
        self.m, self.model, self.ids, self.source = m, model, ids, source
        self.base = trace(model, ids)
        self.base_logp = torch.log_softmax(self.base.logits, dim=-1)

    def measure(self, host: str, position: int, substitute: str) -> EquivalenceRecord:
        """Score substituting block `substitute` at `position` of model `host`."""
        from blockllm.zoo.hfmodel import run_from, substituted

        self._load_host(host)
        tensors = self.zoo.load_block(substitute)
        with substituted(self.model, self.m, position, tensors):
            logits, out = run_from(self.model, self.base, position, self.ids)
        ref = self.base.outputs[position]
        diff = torch.linalg.vector_norm(out - ref)
        rel = (diff / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()
        logp, logq = self.base_logp, torch.log_softmax(logits, dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).mean().item()
        agree = (self.base.logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
        return EquivalenceRecord(
            original=self.m.chain[position],
            substitute=substitute,
            position=position,
            fingerprint=self.m.fingerprint,
            host_model=host,
            rel_error=rel,
            kl=kl,
            agreement=agree,
            prompts=self.prompts,
            seq_len=self.seq_len,
            calibration=self.source,
            seed=self.seed,
            measured_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )


@dataclass(frozen=True, slots=True)
class EquivResult:
    measured: tuple[EquivalenceRecord, ...]
    skipped: int


def measure_all(
    zoo: Zoo,
    *,
    prompts: int = 8,
    seq_len: int = 32,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EquivResult:
    """Measure every candidate pair not yet recorded (all of them with force)."""
    store = EquivalenceStore(zoo)
    pairs = candidate_pairs(zoo.manifests())
    todo = [p for p in pairs if force or store.get(p.original, p.substitute) is None]
    # group by host so each host model is built and run once
    todo.sort(key=lambda p: (p.host, p.position))
    measurer = Measurer(zoo, prompts, seq_len, seed)
    done = []
    for i, pair in enumerate(todo):
        rec = measurer.measure(pair.host, pair.position, pair.substitute)
        with zoo.shared_lock():  # gc is not running: both blocks are still referenced
            if zoo.has_block(rec.original) and zoo.has_block(rec.substitute):
                store.put(rec)
        logger.info(
            "[equiv] %s p%d %s->%s kl=%.4g agree=%.3f rel=%.4g",
            pair.host,
            pair.position,
            rec.original[:8],
            rec.substitute[:8],
            rec.kl,
            rec.agreement,
            rec.rel_error,
        )
        done.append(rec)
        if progress is not None:
            progress(i + 1, len(todo))
    return EquivResult(tuple(done), len(pairs) - len(todo))
