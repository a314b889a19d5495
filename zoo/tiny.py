"""Tiny random checkpoints of the supported families, saved as real HF checkpoint folders.

Tests, `bench --quick` and users without weights build these locally: nothing is downloaded.
Each folder has config.json, model.safetensors, generation_config.json and a byte-level BPE
tokenizer trained on text this machine already has (Python's own docstrings).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2")
TINY_VOCAB = 384


@functools.lru_cache(maxsize=1)
def local_corpus() -> tuple[str, ...]:
    """Docstrings of standard-library modules: real English-ish text on every Python install."""
    import importlib

    names = (
        "json",
        "os",
        "re",
        "string",
        "textwrap",
        "collections",
        "functools",
        "itertools",
        "pathlib",
        "argparse",
        "logging",
        "subprocess",
        "threading",
        "dataclasses",
        "inspect",
        "unittest",
        "email",
        "http.client",
        "urllib.parse",
        "csv",
        "heapq",
    )
    texts: list[str] = []
    for name in names:
        mod = importlib.import_module(name)
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                texts.append(doc.strip())
    # dedupe, keep order (deterministic across runs)
    return tuple(dict.fromkeys(texts))


def build_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE trained in about a second; wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(local_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_config(family: str, vocab_size: int = TINY_VOCAB, layers: int = 4, hidden: int = 64):
    """Config of a tiny model of `family`: GQA everywhere; qwen2 adds bias and tied embeddings."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        rms_norm_eps=1e-5,
        # a wide init makes greedy output depend on context (0.02 collapses to one token)
        initializer_range=0.25,
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")


def build_tiny(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 64,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random tiny `family` checkpoint (weights from `seed`) with its tokenizer."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(family, vocab_size=len(tokenizer), layers=layers, hidden=hidden)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # random init leaves norms at 1 and biases at 0: perturb them so they are exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    p.add_(torch.randn_like(p) * 0.1)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
