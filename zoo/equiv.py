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
import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import permutations
from typing import Any

import torch

from blockllm.zoo.errors import IntegrityError
from blockllm.zoo.fsutil import atomic_write_bytes
from blockllm.zoo.manifest import ModelManifest
from blockllm.zoo.store import Zoo

logger = logging.getLogger(__name__)

RECORD_FORMAT = 1
_RECORD_NAME = re.compile(r"([0-9a-f]{64})-([0-9a-f]{64})\.json")


@dataclass(frozen=True, slots=True)
class EquivalenceRecord:
    """How well `substitute` stands in for `original` at `position` of `host_model`."""

    original: str
    substitute: str
    position: int
    fingerprint: str
    host_model: str
    rel_error: float
    kl: float
    agreement: float
    prompts: int
    seq_len: int
    calibration: str  # "tokenizer" or "random"
    seed: int
    measured_at: str

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> EquivalenceRecord:
        fields = {k: v for k, v in doc.items() if k != "format"}
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Pair:
    """One measurement to make: replace `original` by `substitute` in `host` at `position`."""

    host: str
    position: int
    original: str
    substitute: str


class EquivalenceStore:
    """The `equivalence/` folder of a zoo. Callers hold the zoo lock the operation needs."""

    def __init__(self, zoo: Zoo) -> None:
        self.folder = zoo.root / "equivalence"

    def path(self, original: str, substitute: str) -> Any:
        return self.folder / f"{original}-{substitute}.json"

    def get(self, original: str, substitute: str) -> EquivalenceRecord | None:
        try:
            text = self.path(original, substitute).read_text()
        except FileNotFoundError:
            return None
        try:
            return EquivalenceRecord.from_dict(json.loads(text))
        except (ValueError, TypeError) as e:
            raise IntegrityError(f"bad equivalence record {original}-{substitute}: {e}") from e

    def all(self) -> list[EquivalenceRecord]:
        out = []
        for p in sorted(self.folder.glob("*.json")):
            if m := _RECORD_NAME.fullmatch(p.name):
                rec = self.get(m.group(1), m.group(2))
                if rec is not None:
                    out.append(rec)
        return out

    def put(self, rec: EquivalenceRecord) -> None:
        data = json.dumps(rec.to_dict(), indent=2) + "\n"
        atomic_write_bytes(self.path(rec.original, rec.substitute), data.encode())

    def prune(self, referenced: set[str]) -> int:
        """Delete records naming a block no manifest references (gc, under its lock)."""
        n = 0
        for p in self.folder.glob("*.json"):
            m = _RECORD_NAME.fullmatch(p.name)
            if m and not {m.group(1), m.group(2)} <= referenced:
                p.unlink(missing_ok=True)
                n += 1
        return n


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
