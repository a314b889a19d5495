"""Incremental detokenization: the new text each generated token completes.

Contract: the concatenation of every `push()` result and the final `finish()` equals
`tokenizer.decode(all_ids, skip_special_tokens=True)`. Special tokens never produce text. A
token that ends in the middle of a multi-byte UTF-8 character yields "" until the character
is complete.

How: decode only a short window (the tokens since the last emitted boundary, plus the few
before it as context, which is what makes leading-space and byte-level merges come out as in
a full decode), and hold the text back while it ends in U+FFFD (an incomplete character).
The window keeps every step O(window), not O(length). A trailing U+FFFD that is real text (an
invalid byte sequence) is held until a later token or `finish()`, which reconciles with one
full decode, so whatever a window got wrong is made good at the end.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Decoder(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    def decode(self, ids: Any, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Per-request streaming decoder. One thread (the broker's loop) uses each instance."""

    __slots__ = ("_emitted", "_ids", "_prefix", "_read", "_special", "_tok")

    def __init__(self, tokenizer: Decoder) -> None:
        self._tok = tokenizer
        self._special = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self._ids: list[int] = []
        self._prefix = 0  # window start: context tokens already emitted
        self._read = 0  # tokens up to here have had their text emitted
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    def prime(self, ids: list[int] | tuple[int, ...]) -> None:
        """Feed tokens whose text the client already has (a resumed request); emits nothing."""
        for tid in ids:
            self.push(tid)

    def push(self, token_id: int) -> str:
        """Append one generated token; the new complete text it adds (may be "")."""
        self._ids.append(token_id)
        if token_id in self._special:
            return ""  # skipped by the decode, and cannot change the text around it
        if self._is_byte_piece(token_id):
            # sentencepiece byte fallback: a run of <0xNN> pieces decodes as a whole (an invalid
            # run turns every byte of it into U+FFFD), so its text is settled when it ends
            return ""
        new_text = self._decode(self._ids[self._prefix :])
        if new_text.endswith(REPLACEMENT):
            return ""  # a multi-byte character is incomplete (or a real U+FFFD, settled later)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        if new_text.startswith(prefix_text):
            # equal: a special token, or a piece that renders as nothing yet
            return self._emit(new_text[len(prefix_text) :]) if new_text != prefix_text else ""
        return self._settle(new_text, prefix_text)

    def finish(self) -> str:
        """The text not emitted yet, so that everything emitted equals the full decode."""
        full = self._decode(self._ids)
        done = self.text
        if not full.startswith(done):
            # only a tokenizer whose decode rewrites earlier text gets here; never un-send text
            logger.warning("detokenizer: streamed text diverged from the full decode")
            return ""
        return self._emit(full[len(done) :])

    def _settle(self, new_text: str, prefix_text: str) -> str:
        """The window's context decodes differently now (e.g. space clean-up): diff the full
        text instead; if even that is not an extension of what was sent, go on best-effort."""
        full = self._decode(self._ids)
        done = self.text
        if full.startswith(done):
            return "" if full.endswith(REPLACEMENT) else self._emit(full[len(done) :])
        common = next(
            (i for i, (a, b) in enumerate(zip(new_text, prefix_text, strict=False)) if a != b),
            min(len(new_text), len(prefix_text)),
        )
        return self._emit(new_text[common:])

    def _is_byte_piece(self, token_id: int) -> bool:
        convert = getattr(self._tok, "convert_ids_to_tokens", None)
        piece = convert(token_id) if convert is not None else None
        return isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece) is not None

    def _emit(self, text: str) -> str:
        self._prefix = self._read
        self._read = len(self._ids)
        if text:
            self._emitted.append(text)
        return text

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tok.decode(ids, skip_special_tokens=True)
