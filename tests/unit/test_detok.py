"""Incremental detokenization with a real byte-level BPE: the stream equals the full decode."""

from __future__ import annotations

import json
import random

import pytest

from blockllm.broker.text import REPLACEMENT, IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok():
    from blockllm.zoo.tiny import build_tokenizer

    return build_tokenizer()


def build_sentencepiece_like():
    """A Llama-style tokenizer: metaspace pieces, <0xNN> byte fallback, leading-space strip."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from blockllm.zoo.tiny import local_corpus

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = norm
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, show_progress=False, limit_alphabet=100
    )
    base.train_from_iterator(local_corpus(), trainer=trainer)
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte pieces are ordinary vocabulary, as in sentencepiece models
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    sp = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    sp.normalizer = norm
    sp.add_special_tokens(SPECIALS)
    sp.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


SPECIALS = ["<unk>", "<s>", "</s>"]


@pytest.fixture(scope="module")
def sp_tok():
    return build_sentencepiece_like()


def stream(tok, ids: list[int]) -> list[str]:
    d = IncrementalDetokenizer(tok)
    parts = [d.push(i) for i in ids]
    parts[-1] += d.finish()
    return parts


TEXTS = [
    "plain ascii text, with punctuation.",
    "café résumé naïve",
    "日本語のテキスト",
    "emoji 😀👍🏽 and flags 🇫🇷 🎉",
    "mixed: Grüße, 你好, привет, ✓",
    "  leading and trailing spaces  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode(tok, text: str) -> None:
    ids = tok(text).input_ids
    parts = stream(tok, ids)
    assert "".join(parts) == tok.decode(ids, skip_special_tokens=True) == text
    assert all(REPLACEMENT not in p for p in parts)


def test_multibyte_characters_are_split_across_tokens(tok) -> None:
    """The case the detokenizer exists for: tokens that end inside a character emit ""."""
    ids = tok("日本").input_ids
    assert any(REPLACEMENT in tok.decode([i]) for i in ids), "tokenizer should split the bytes"
    parts = stream(tok, ids)
    assert "" in parts
    assert [p for p in parts if p] == ["日", "本"]


def test_special_tokens_never_emitted(tok) -> None:
    eos, bos = tok.eos_token_id, tok.bos_token_id
    ids = [bos, *tok("hello").input_ids, eos, *tok(" é").input_ids, eos]
    parts = stream(tok, ids)
    assert parts[0] == ""
    assert "".join(parts) == tok.decode(ids, skip_special_tokens=True) == "hello é"
    assert all("<" not in p for p in parts)


def test_random_ids_stream_equals_decode(tok) -> None:
    """Arbitrary id sequences, including invalid UTF-8 byte runs and specials."""
    rng = random.Random(1234)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        assert "".join(stream(tok, ids)) == tok.decode(ids, skip_special_tokens=True)


def test_invalid_bytes_are_held_then_flushed(tok) -> None:
    """A lone lead byte is held ("") while nothing completes it, and finish() flushes it."""
    lead = tok("é").input_ids[0]  # the first byte of a 2-byte character, on its own
    d = IncrementalDetokenizer(tok)
    assert d.push(lead) == ""
    assert d.finish() == tok.decode([lead], skip_special_tokens=True)


def test_prime_emits_nothing_and_continues(tok) -> None:
    first = tok("日本 and").input_ids
    rest = tok(" more 😀").input_ids
    d = IncrementalDetokenizer(tok)
    d.prime(first)
    out = "".join(d.push(i) for i in rest) + d.finish()
    full = tok.decode(first + rest, skip_special_tokens=True)
    assert tok.decode(first, skip_special_tokens=True) + out == full


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_byte_fallback_stream_equals_decode(sp_tok, text: str) -> None:
    ids = sp_tok(text).input_ids
    assert any(p.startswith("<0x") for p in sp_tok.convert_ids_to_tokens(ids)) or text.isascii()
    parts = stream(sp_tok, ids)
    assert "".join(parts) == sp_tok.decode(ids, skip_special_tokens=True)
    assert all(REPLACEMENT not in p for p in parts)


def test_sentencepiece_random_ids_stream_equals_decode(sp_tok) -> None:
    """Byte-fallback runs are decoded as a whole (an invalid run rewrites earlier bytes)."""
    rng = random.Random(99)
    for _ in range(300):
        ids = [rng.randrange(len(sp_tok)) for _ in range(rng.randint(1, 40))]
        assert "".join(stream(sp_tok, ids)) == sp_tok.decode(ids, skip_special_tokens=True)
