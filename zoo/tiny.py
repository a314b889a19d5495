"""Tiny random checkpoints of the supported families, saved as real HF checkpoint folders.

Tests, `bench --quick` and users without weights build these locally: nothing is downloaded.
Each folder has config.json, model.safetensors, generation_config.json and a byte-level BPE
tokenizer trained on text this machine already has (Python's own docstrings).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "granite",
    "gpt2",
)
# sliding window of the tiny families that have one: prompts of a few dozen tokens pass it
TINY_WINDOW = 16
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


def tiny_config(
    family: str,
    vocab_size: int = TINY_VOCAB,
    layers: int = 4,
    hidden: int = 64,
    kv_heads: int | None = None,
    overrides: dict | None = None,
):
    """Config of a tiny model of `family`, each exercising what sets its family apart.

    Every family keeps one KV geometry (2 KV heads of 16 dims), so one worker hosts them all.
    llama/mistral/qwen2 are as before (qwen2: biases, tied embeddings). qwen3: q/k norms,
    head_dim != hidden/heads, tied, sliding layers. gemma2: attention and final logit
    soft-caps, query_pre_attn_scalar, sliding/global layers. gemma3_text: local/global layers
    with their own rope, q/k norms. phi3: fused qkv and gate_up, a sliding window. olmo2:
    post-norms only, q/k norms over all heads. granite: embedding/residual/attention/logit
    multipliers. gpt2: learned positions, LayerNorm, Conv1D, tied.
    `kv_heads` (a divisor of the family's attention heads; not gpt2) gives another KV geometry:
    a cluster of several geometries is what a mixed zoo of real models looks like.
    `overrides`: more config fields (e.g. mistral's `sliding_window`).
    """
    from transformers import AutoConfig

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
    head16 = dict(num_attention_heads=8, head_dim=16)  # 8 heads of 16 dims: head_dim != D / H
    sliding = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (
        layers % 2
    )
    extra: dict = {
        "llama": dict(tie_word_embeddings=False),
        "mistral": dict(tie_word_embeddings=False, sliding_window=None),
        "qwen2": dict(tie_word_embeddings=True, use_sliding_window=False),
        "qwen3": dict(
            **head16,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=TINY_WINDOW,
            max_window_layers=layers // 2,  # layers >= max_window_layers slide
        ),
        "gemma2": dict(
            **head16,
            tie_word_embeddings=False,  # tied, sqrt(D)-scaled tiny embeddings echo the input
            query_pre_attn_scalar=24,
            attn_logit_softcapping=10.0,
            final_logit_softcapping=3.0,
            sliding_window=TINY_WINDOW,
            layer_types=sliding,
        ),
        "gemma3_text": dict(
            **head16,
            tie_word_embeddings=False,
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
            sliding_window=TINY_WINDOW,
            layer_types=sliding,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
        "phi3": dict(tie_word_embeddings=False, sliding_window=TINY_WINDOW, pad_token_id=2),
        "olmo2": dict(tie_word_embeddings=False, pad_token_id=2),
        "granite": dict(
            tie_word_embeddings=False,
            embedding_multiplier=6.0,
            residual_multiplier=0.5,
            attention_multiplier=0.1,
            logits_scaling=4.0,
        ),
    }
    if family == "gpt2":  # its own names; 2 heads of 16 dims keep the common KV geometry
        if kv_heads not in (None, 2):
            raise ValueError("tiny gpt2 has 2 KV heads (no grouped-query attention)")
        return AutoConfig.for_model(
            "gpt2",
            vocab_size=vocab_size,
            n_embd=hidden // 2,
            n_layer=layers,
            n_head=2,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=1,
            initializer_range=0.25,
            scale_attn_by_inverse_layer_idx=True,
        )
    if family not in extra:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    kw = {**common, **extra[family]}
    if kv_heads is not None:
        if kv_heads < 1 or kw["num_attention_heads"] % kv_heads:
            heads = kw["num_attention_heads"]
            raise ValueError(f"kv_heads {kv_heads} must divide the {heads} attention heads")
        kw["num_key_value_heads"] = kv_heads
    return AutoConfig.for_model(family, **{**kw, **(overrides or {})})


def build_tiny(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 64,
    dtype: torch.dtype = torch.float32,
    kv_heads: int | None = None,
    overrides: dict | None = None,
) -> Path:
    """Write a random tiny `family` checkpoint (weights from `seed`) with its tokenizer;
    `kv_heads` and `overrides` as in `tiny_config`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(
        family,
        vocab_size=len(tokenizer),
        layers=layers,
        hidden=hidden,
        kv_heads=kv_heads,
        overrides=overrides,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # random init leaves norms at 1 (Gemma: 0) and biases at 0: perturb them (every 1-D
        # tensor) so they are exercised
        with torch.no_grad():
            for _name, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
