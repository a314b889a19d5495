"""A zoo model as a transformers model, and calibration inputs for measuring it.

Used by equivalence measurement (zoo/equiv.py); the serving engine has its own loader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from blockllm.zoo.errors import IntegrityError
from blockllm.zoo.export import hf_key, hf_state_dict
from blockllm.zoo.manifest import ModelManifest
from blockllm.zoo.store import Zoo

logger = logging.getLogger(__name__)

CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "In the morning, the market opens early and the streets fill with people.",
    "Scientists measured the temperature of the lake every day for a year.",
    "She wrote a long letter to her grandmother about the summer holidays.",
    "The train to the city was delayed because of heavy snow on the tracks.",
    "Learning a new language takes patience, practice and a little courage.",
    "The old library keeps thousands of books about history and philosophy.",
    "After dinner, we walked along the beach and watched the sun go down.",
    "A good recipe for bread needs flour, water, salt, yeast and time.",
    "The committee will announce its decision at the end of the month.",
)


def build_hf_model(zoo: Zoo, m: ModelManifest) -> torch.nn.Module:
    """AutoModelForCausalLM built from the manifest's config and blocks, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in m.config.items() if k != "model_type"}
    config = AutoConfig.for_model(m.model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, m.dtype))
    result = model.load_state_dict(hf_state_dict(zoo, m), strict=False)
    allowed = {"lm_head.weight"} if m.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise IntegrityError(
            f"model {m.name!r}: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    return model.eval()


def calibration_ids(
    zoo: Zoo, m: ModelManifest, prompts: int, seq_len: int, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """input ids [prompts, seq_len] and their source ("tokenizer" or "random").

    With a tokenizer: the built-in sentences, tokenized and cut into equal windows (cycled if
    short), so no padding is needed. Without: random ids from a fixed-seed generator.
    """
    folder = zoo.tokenizer_dir(m.name)
    if folder is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok(" ".join(CALIBRATION_TEXT), add_special_tokens=False).input_ids
        if ids:
            stream = torch.tensor(ids, dtype=torch.long)
            reps = -(-prompts * seq_len // len(stream))
            stream = stream.repeat(reps)[: prompts * seq_len]
            return stream.view(prompts, seq_len), "tokenizer"
    gen = torch.Generator().manual_seed(seed)
    vocab = int(m.config["vocab_size"])
    return torch.randint(0, vocab, (prompts, seq_len), generator=gen), "random"


def block_module(model: torch.nn.Module, position: int, num_layers: int) -> torch.nn.Module:
    """The module whose output is the block's output: embed, a decoder layer, or lm_head."""
    if position == 0:
        return model.model.embed_tokens
    if position <= num_layers:
        return model.model.layers[position - 1]
    return model.lm_head


@contextmanager
def substituted(
    model: torch.nn.Module, m: ModelManifest, position: int, tensors: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Temporarily copy a block's tensors into the model at chain `position`."""
    params = {rel: model.get_parameter(hf_key(position, m.num_layers, rel)) for rel in tensors}
    saved = {rel: p.detach().clone() for rel, p in params.items()}
    with torch.no_grad():
        for rel, p in params.items():
            if tuple(p.shape) != tuple(tensors[rel].shape):
                raise IntegrityError(f"{rel}: shape {list(tensors[rel].shape)} != {list(p.shape)}")
            p.copy_(tensors[rel].to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for rel, p in params.items():
                p.copy_(saved[rel])


@torch.no_grad()
def run_capture(
    model: torch.nn.Module, ids: torch.Tensor, modules: Mapping[int, torch.nn.Module]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(logits float32 [B, T, V], output of each module keyed like `modules`)."""
    captured: dict[int, torch.Tensor] = {}

    def hook(key: int):
        def fn(_mod, _args, out):
            captured[key] = (out[0] if isinstance(out, tuple) else out).detach().float()

        return fn

    handles = [mod.register_forward_hook(hook(k)) for k, mod in modules.items()]
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for h in handles:
            h.remove()
    return logits, captured
