"""LoRA adapters made the way users make them: `peft` on a local checkpoint, a few AdamW steps.

`train_lora` wraps the base in `peft.get_peft_model` (LoRA on the chosen projections of decoder
layers a..b), trains only the adapter on local text (the same data as `finetune`) and saves a
PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`), written into a hidden
temp sibling and renamed into place. `peft` is the optional extra `blockllm[lora]`.

Library code: no environment reads, no printing; progress goes to an optional callback.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from blockllm.zoo.families import FAMILIES
from blockllm.zoo.finetune import (
    _batches,
    _check_layers,
    _layout,
    _token_stream,
    _train,
    _training_texts,
)
from blockllm.zoo.models import (
    ModelBuildError,
    Progress,
    check_output,
    note_progress,
    publishing,
    quiet_hf_progress,
    write_json,
)

LORA_RECORD = ".blockllm-lora.json"


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ModelBuildError(
            "training a LoRA adapter needs peft: pip install 'blockllm[lora]'"
        ) from e
    return peft


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """peft's save_pretrained draws huggingface_hub's "Writing model shards" bar: hide it."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _check(targets: Sequence[str], rank: int, steps: int, lr: float) -> None:
    from blockllm.zoo.families import LORA_TARGETS

    bad = sorted(set(targets) - set(LORA_TARGETS))
    if not targets or bad:
        raise ModelBuildError(
            f"bad LoRA targets {bad or '(none)'}: choose from {', '.join(LORA_TARGETS)}"
        )
    if rank < 1 or steps < 0 or not lr > 0:
        raise ModelBuildError("rank must be >= 1, steps >= 0 and lr > 0")


def train_lora(
    base_dir: str | Path,
    out_dir: str | Path,
    layers: tuple[int, int] | None,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    rslora: bool = False,
    steps: int = 20,
    text: str | Path | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    seq_len: int = 64,
    batch_size: int = 4,
    overwrite: bool = False,
    progress: Progress | None = None,
    rank_pattern: dict[str, int] | None = None,
) -> Path:
    """Train a LoRA adapter (rank `rank`, alpha `alpha` [2 * rank], on `targets` [the
    family's `Traits.lora_targets`] of decoder layers a..b, 0-based inclusive; every layer with
    `layers=None`) on the checkpoint
    `base_dir` for `steps` AdamW steps and save it as a PEFT adapter folder `out_dir`.

    `steps=0` trains nothing and keeps PEFT's `init_lora_weights=False` initialisation (lora_B
    random, not zero): an adapter that changes outputs at once, for tests and benchmarks.
    `rank_pattern`: PEFT's per-module ranks. Deterministic for a seed (data order and the
    adapter's initialisation). Raises
    ModelBuildError (bad settings, no peft, `out_dir` not empty without `overwrite`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft = _peft()
    base, out = Path(base_dir), Path(out_dir)
    lay = _layout(base)
    if targets is None:
        targets = FAMILIES[lay.model_type].lora_targets
    if layers is not None:
        _check_layers(layers, False, lay.num_layers)
    _check(targets, rank, steps, lr)
    check_output(out, overwrite)
    start = time.monotonic()
    span = range(lay.num_layers) if layers is None else range(layers[0], layers[1] + 1)
    note_progress(
        progress,
        f"LoRA r={rank} on {','.join(targets)} of layers "
        f"{span[0]}-{span[-1]} of {base} for {steps} steps",
    )
    with quiet_hf_progress():
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, local_files_only=True
        )
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(targets),
        layers_to_transform=list(span),
        lora_dropout=0.0,
        use_rslora=rslora,
        bias="none",
        rank_pattern=dict(rank_pattern or {}),
        init_lora_weights=steps > 0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pm = peft.get_peft_model(model, config)
        record: dict[str, Any] = {"loss_first_batch_before": None, "loss_first_batch_after": None}
        if steps > 0:
            stream = _token_stream(tokenizer, _training_texts(text))
            batches = _batches(stream, steps, batch_size, seq_len, seed)
            record = _train(pm, batches, lr, progress, clip_norm=None)
    record.update(
        base=str(base.resolve()),
        layers=[span[0], span[-1]],
        rank=rank,
        alpha=config.lora_alpha,
        targets=list(targets),
        rslora=rslora,
        steps=steps,
        lr=lr,
        seed=seed,
        train_seconds=round(time.monotonic() - start, 2),
    )
    with publishing(out, replace=overwrite) as tmp, _quiet_hub():
        pm.save_pretrained(tmp)
        write_json(tmp / LORA_RECORD, record)
    before, after = record["loss_first_batch_before"], record["loss_first_batch_after"]
    losses = "untrained" if before is None else f"loss {before:.3f} -> {after:.3f}"
    note_progress(progress, f"saved {out} in {time.monotonic() - start:.1f} s ({losses})")
    return out
