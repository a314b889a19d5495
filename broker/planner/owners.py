"""Which catalog models can load a block: an index of the planner's catalog by (chain length,
position, block), so a chain's owners cost its length, not the catalog's size times it; and
the stage keys of the catalog's models, memoized (over catalog re-reads: per model while its
manifest is equal; and by what the key is made of, so a family's shared spans hash once)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockllm.zoo.chain import stage_key

MAX_CONTENT_KEYS = 1 << 20  # keys by content kept at most (then forgotten at once)


class Owners:
    """`of(chain, p, tied)`: the models whose own chain holds what `chain` holds at p (any can
    load it): the block, and for a tied head also the embedding its lm_head is. The index is
    rebuilt when the manifests mapping is replaced (the planner re-read its catalog)."""

    def __init__(self) -> None:
        self._for: Mapping[str, Any] | None = None
        self._by_block: dict[tuple[int, int, str], list[str]] = {}
        self._keys_for: Mapping[str, Any] | None = None
        # model -> (its manifest, its stage keys by span): kept over catalog re-reads while
        # the model's manifest is equal (a tenant arriving recomputes only its own keys)
        self._keys: dict[str, tuple[Any, dict[tuple[int, int], str | None]]] = {}
        self._by_content: dict[tuple[Any, ...], str | None] = {}  # what stage_key hashes -> key
        # what `of` answered, by what its answer depends on (a chain's block at p, and for
        # the head its embedding and tying): a family's models share the answers of its blocks
        self._of: dict[tuple[int, int, str, bool, str | None], tuple[str, ...]] = {}
        self._bytes_for: Mapping[str, Any] | None = None
        self._bytes: dict[str, int] = {}

    def nbytes(self, manifests: Mapping[str, Any], block: str) -> int:
        """A block's size from the first catalog model (in the mapping's order) holding it;
        0 when none does."""
        if self._bytes_for is not manifests:
            sizes: dict[str, int] = {}
            for m in manifests.values():
                for b, n in zip(m.chain, m.block_bytes, strict=False):
                    sizes.setdefault(b, int(n))
            self._bytes_for, self._bytes = manifests, sizes
        return self._bytes.get(block, 0)

    def key(self, manifests: Mapping[str, Any], model: str, start: int, end: int) -> str | None:
        """stage_key of `model` over [start, end) (None: unknown model or span)."""
        if self._keys_for is not manifests:
            self._keys_for = manifests
            if any(n not in manifests for n in self._keys):
                self._keys = {n: v for n, v in self._keys.items() if n in manifests}
        m = manifests.get(model)
        if m is None:
            return None
        memo = self._keys.get(model)
        if memo is None or memo[0] is not m:
            same = memo is not None and memo[0] == m  # a re-read catalog: an equal manifest
            memo = self._keys[model] = (m, memo[1] if same else {})
        keys = memo[1]
        k = (start, end)
        if k not in keys:
            keys[k] = self._content_key(m, start, end)
        return keys[k]

    def _content_key(self, m: Any, start: int, end: int) -> str | None:
        """stage_key(m, start, end), shared by the models whose key is made of the same
        things (the family fingerprint, the chain's length, the span, its blocks and a tied
        head's embedding: what stage_key hashes), so a family's shared spans hash once."""
        fingerprint = getattr(m, "fingerprint", "")
        content = None
        # without a fingerprint stage_key derives one from the config: not shared
        if fingerprint and type(start) is int and type(end) is int:
            chain = tuple(m.chain)
            tied = chain[0] if end == len(chain) and m.tie_word_embeddings else None
            content = (fingerprint, len(chain), start, end, chain[start:end], tied)
            if content in self._by_content:
                return self._by_content[content]
        try:
            key = stage_key(m, start, end)
        except Exception:
            key = None
        if content is not None:
            if len(self._by_content) >= MAX_CONTENT_KEYS:
                self._by_content.clear()
            self._by_content[content] = key
        return key

    def of(
        self, manifests: Mapping[str, Any], chain: tuple[str, ...], p: int, tied: bool
    ) -> tuple[str, ...]:
        if self._for is not manifests:
            by_block: dict[tuple[int, int, str], list[str]] = {}
            for name in sorted(manifests):
                own = tuple(manifests[name].chain)
                for q, b in enumerate(own):
                    by_block.setdefault((len(own), q, b), []).append(name)
            self._for, self._by_block, self._of = manifests, by_block, {}
        last = p == len(chain) - 1
        memo = (len(chain), p, chain[p], tied, chain[0] if last else None)
        found = self._of.get(memo)
        if found is not None:
            return found
        out = []
        for name in self._by_block.get((len(chain), p, chain[p]), ()):
            own = manifests[name].chain
            other_tied = bool(manifests[name].tie_word_embeddings)
            head = p == len(chain) - 1 and (tied or other_tied)
            if head and (own[0] != chain[0] or other_tied != tied):
                continue
            out.append(name)
        found = self._of[memo] = tuple(out)
        return found
