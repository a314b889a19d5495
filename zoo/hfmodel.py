"""A zoo model as a transformers model, calibration inputs, and block-substitution runs.

Used by equivalence measurement (zoo/equiv.py); the serving engine has its own loader.
A substitution at chain position p only changes what runs from p on, so `run_from` replays
the baseline's recorded inputs of block p and recomputes the suffix, not the whole model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from blockllm.zoo.errors import IntegrityError
from blockllm.zoo.export import hf_config_doc, hf_key, hf_state_dict
from blockllm.zoo.families import FAMILIES, Layout, layout, postprocess_logits
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
    from transformers.initialization import no_init_weights

    kwargs = {k: v for k, v in hf_config_doc(m).items() if k != "model_type"}
    config = AutoConfig.for_model(m.model_type, **kwargs)
    with no_init_weights():  # every parameter is overwritten below: skip random init
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, m.dtype))
    model.tie_weights()  # no_init_weights also skips the tying post_init would do
    result = model.load_state_dict(hf_state_dict(zoo, m), strict=False)
    allowed = {f"{layout(m.config).lm_head}.weight"} if m.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise IntegrityError(
            f"model {m.name!r}: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if m.tie_word_embeddings and not tied:
        raise IntegrityError(f"model {m.name!r}: lm_head is not tied to the embedding")
    model._blockllm_layout = layout(m.config)  # trace / run_from find the blocks' modules by it
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


@contextmanager
def substituted(
    model: torch.nn.Module, m: ModelManifest, position: int, tensors: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Temporarily copy a block's tensors into the model at chain `position`."""
    params = {rel: model.get_parameter(hf_key(m, position, rel)) for rel in tensors}
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


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Trace:
    """A baseline run: logits, each block's output, and what each decoder layer was called with
    (all of its arguments: GPT-2's blocks take the mask and cache positionally)."""

    logits: torch.Tensor  # float32 [B, T, V]
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> output (float32)
    layer_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    norm_input: torch.Tensor | None = None


def _parts(model: torch.nn.Module) -> tuple[Layout, Any, torch.nn.Module]:
    """(layout, decoder layers, final norm) of a zoo model built by `build_hf_model`."""
    lay = getattr(model, "_blockllm_layout", None) or layout(model.config.to_dict())
    inner = getattr(model, lay.prefix)
    return lay, inner.get_submodule(lay.layers), inner.get_submodule(lay.norm)


def _head(model: torch.nn.Module, lay: Layout, normed: torch.Tensor) -> torch.Tensor:
    """lm_head plus what the family's forward does to the logits (Granite, Gemma)."""
    logits = model.get_output_embeddings()(normed)
    return postprocess_logits(FAMILIES[lay.model_type], model.config, logits).float()


@torch.no_grad()
def trace(model: torch.nn.Module, ids: torch.Tensor) -> Trace:
    """Run the model once, recording every block's output and every layer's inputs. The embed
    block's output is the first layer's input (token embedding, scaled or plus positions)."""
    _lay, layers, norm = _parts(model)
    outputs: dict[int, torch.Tensor] = {}
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    norm_in: list[torch.Tensor] = []

    def keep(pos: int):
        return lambda _m, _a, out: outputs.__setitem__(pos, _first(out).detach().float())

    def record(_m, args, kwargs):
        if not calls:
            outputs[0] = args[0].detach().float()
        calls.append((tuple(args), dict(kwargs)))

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(record, with_kwargs=True))
        handles.append(layer.register_forward_hook(keep(i + 1)))
    handles.append(norm.register_forward_pre_hook(lambda _m, args: norm_in.append(args[0])))
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for h in handles:
            h.remove()
    outputs[len(layers) + 1] = logits
    if len(calls) != len(layers) or len(norm_in) != 1:
        raise IntegrityError("unexpected model structure while tracing (layer calls differ)")
    return Trace(logits, outputs, calls, norm_in[0])


@torch.no_grad()
def run_from(
    model: torch.nn.Module, base: Trace, position: int, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, output of block `position`) recomputing only the blocks from `position` on."""
    lay, layers, norm = _parts(model)
    n = len(layers)
    if position == 0:  # the embedding (and a tied head): the whole model
        got = trace(model, ids)
        return got.logits, got.outputs[0]

    def call(i: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = base.layer_calls[i]
        return _first(layers[i](hidden, *args[1:], **kwargs))

    if position <= n:
        hidden = call(position - 1, base.layer_calls[position - 1][0][0])
        block_out = hidden.float()
        for i in range(position, n):
            hidden = call(i, hidden)
        return _head(model, lay, norm(hidden)), block_out
    logits = _head(model, lay, norm(base.norm_input))
    return logits, logits
