"""Equivalence records and the `equivalence/` folder of a zoo, without torch.

The planner and the broker read records (the catalog it hands a planner) without the
measurement's dependencies; measuring is zoo/equiv.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from blockllm.zoo.errors import IntegrityError
from blockllm.zoo.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from blockllm.zoo.store import Zoo

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
