"""Fine-tuned variants made the way users make them: a few real AdamW steps on chosen layers.

`finetune` trains some decoder layers of a checkpoint (or, with `full=True`, every tensor) on
local text and saves a variant whose untouched tensors stay byte-identical to the base's, so they
dedupe in the zoo. Like `convert_smollm2` (zoo/models.py), it writes into a hidden temp sibling
of the output folder and renames it into place, so a killed run leaves nothing half-written.

Library code: no environment reads, no printing; progress goes to an optional callback.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blockllm.zoo.models import (
    WEIGHT_FILE,
    ModelBuildError,
    Progress,
    check_output,
    note_progress,
    publishing,
    quiet_hf_progress,
    write_json,
)

logger = logging.getLogger(__name__)

FINETUNE_RECORD = ".blockllm-finetune.json"


def _layout(base: Path) -> Any:
    """The base's key map (zoo/families.py): its layer count and where its layers live."""
    from blockllm.zoo.errors import ZooError
    from blockllm.zoo.families import layout

    try:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
        return layout(config)
    except (OSError, ValueError, KeyError, TypeError, ZooError) as e:
        raise ModelBuildError(f"{base} is not a checkpoint folder (config.json: {e})") from e


def _check_layers(layers: tuple[int, int] | None, full: bool, n_layers: int) -> None:
    if full:
        if layers is not None:
            raise ModelBuildError("give either layers=(a, b) or full=True, not both")
        return
    if layers is None:
        raise ModelBuildError("choose the layers to fine-tune (layers=(a, b)) or full=True")
    a, b = layers
    if not 0 <= a <= b < n_layers:
        raise ModelBuildError(
            f"bad layer range {a}-{b}: need 0 <= first <= last <= {n_layers - 1} "
            f"(the model has {n_layers} layers, numbered from 0)"
        )


def _training_texts(text: str | Path | None) -> list[list[str]]:
    """Documents (each a list of pieces to concatenate): the local corpus or the user's file."""
    if text is None:
        from blockllm.zoo.tiny import local_corpus

        return [[doc] for doc in local_corpus()]
    path = Path(text)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelBuildError(f"cannot read training text {path}: {e}") from e
    # paragraph pieces keep the tokenizer under its max length; the separators stay attached
    return [[p for p in re.split(r"(?<=\n\n)", content) if p]]


def _token_stream(tokenizer: Any, docs: Sequence[Sequence[str]]) -> torch.Tensor:
    """All documents tokenized and concatenated, each followed by eos: LongTensor[N]."""
    pieces = [p for doc in docs for p in doc]
    encoded = iter(tokenizer(pieces, add_special_tokens=False)["input_ids"])
    ids: list[int] = []
    for doc in docs:
        for _ in doc:
            ids.extend(next(encoded))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _batches(
    stream: torch.Tensor, steps: int, batch_size: int, seq_len: int, seed: int
) -> torch.Tensor:
    """Random windows of the stream, fixed by `seed`: LongTensor[steps, batch_size, seq_len]."""
    if stream.numel() < seq_len + 1:
        raise ModelBuildError(
            f"training text too short: {stream.numel()} tokens, need more than {seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (steps, batch_size), generator=gen)
    offsets = torch.arange(seq_len)
    return stream[starts[..., None] + offsets]  # [steps, B, 1] + [T] -> [steps, B, T]


def _trainable(model: Any, layers: tuple[int, int] | None, lay: Any) -> list[str]:
    """Freeze everything but decoder layers a..b (all parameters when `layers` is None)."""
    if layers is None:
        chosen = {name for name, _ in model.named_parameters()}
    else:
        prefixes = tuple(lay.hf_key(i + 1, "") for i in range(layers[0], layers[1] + 1))
        chosen = {name for name, _ in model.named_parameters() if name.startswith(prefixes)}
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return sorted(chosen)


def _loss(model: Any, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def _train(
    model: Any,
    batches: torch.Tensor,
    lr: float,
    progress: Progress | None,
    clip_norm: float | None = 1.0,
) -> dict[str, Any]:
    """AdamW on the parameters that require grad, one step per batch (gradients clipped to
    `clip_norm`; None: not clipped); returns the loss record."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.eval()
    with torch.no_grad():
        before = _loss(model, batches[0]).item()
    model.train()
    losses: list[float] = []
    steps = batches.shape[0]
    for i in range(steps):
        loss = _loss(model, batches[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        losses.append(round(loss.item(), 5))
        note_progress(progress, f"step {i + 1}/{steps} loss {losses[-1]:.4f}")
    model.eval()
    with torch.no_grad():
        after = _loss(model, batches[0]).item()
    return {"losses": losses, "loss_first_batch_before": before, "loss_first_batch_after": after}


def _copy_aux_files(base: Path, out: Path) -> None:
    """Tokenizer files and generation_config.json, byte for byte (weights and config excluded)."""
    for path in sorted(base.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not WEIGHT_FILE.match(path.name):
            shutil.copyfile(path, out / path.name)


def _changed_tensors(model: Any, snapshot: dict[str, torch.Tensor], dtype: torch.dtype) -> set[str]:
    """Names of trained tensors that differ from the base once cast back to the saved dtype."""
    params = dict(model.named_parameters())
    return {n for n, t in snapshot.items() if not torch.equal(params[n].detach().to(dtype), t)}


def _load_trainable(
    base: Path, layers: tuple[int, int] | None, lay: Any
) -> tuple[Any, Any, torch.dtype, list[str]]:
    """Tokenizer, float32 model with only the chosen tensors trainable, base dtype, names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_hf_progress():
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", local_files_only=True)
    # fp32 master weights: bf16/fp16 -> fp32 -> back is exact, so frozen tensors survive as-is
    base_dtype = model.dtype
    model.float()
    return tokenizer, model, base_dtype, _trainable(model, layers, lay)


def _save_variant(
    model: Any, base: Path, out: Path, record: dict[str, Any], overwrite: bool
) -> None:
    """save_pretrained in the base dtype + the base's tokenizer/generation files + our record."""
    model.to(getattr(torch, record["dtype"]))
    with publishing(out, replace=overwrite) as tmp:
        model.save_pretrained(tmp)
        _copy_aux_files(base, tmp)
        write_json(tmp / FINETUNE_RECORD, record)


def finetune(
    base_dir: str | Path,
    out_dir: str | Path,
    layers: tuple[int, int] | None = None,
    *,
    full: bool = False,
    steps: int = 20,
    text: str | Path | None = None,
    lr: float = 1e-4,
    seed: int = 0,
    seq_len: int = 64,
    batch_size: int = 4,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Fine-tune decoder layers a..b (inclusive, 0-based; or every tensor with `full`) of the
    checkpoint at `base_dir` for `steps` AdamW steps of causal-LM loss and save it to `out_dir`.

    Training text: Python's own docstrings, or the UTF-8 file `text`. Deterministic for a
    seed. Trains in float32 and saves in the base's dtype; every frozen tensor round-trips
    exactly, so it stays byte-identical to the base. Tokenizer files and generation_config are
    copied; `.blockllm-finetune.json` records the settings and losses. Raises ModelBuildError
    (bad layer range or settings, unreadable text, `out_dir` not empty without `overwrite`).
    """
    base, out = Path(base_dir), Path(out_dir)
    lay = _layout(base)
    _check_layers(layers, full, lay.num_layers)
    if steps < 1 or batch_size < 1 or seq_len < 2 or not lr > 0:
        raise ModelBuildError("steps and batch size must be >= 1, seq len >= 2, lr > 0")
    if out.resolve() == base.resolve():
        raise ModelBuildError("the output folder must differ from the base checkpoint")
    check_output(out, overwrite)
    start = time.monotonic()
    span = None if full else layers
    what = "every tensor" if span is None else f"layers {span[0]}-{span[1]}"
    note_progress(progress, f"fine-tuning {what} of {base} for {steps} steps")
    tokenizer, model, base_dtype, names = _load_trainable(base, span, lay)
    wanted = set(names)
    snapshot = {
        n: p.detach().to(base_dtype).clone() for n, p in model.named_parameters() if n in wanted
    }
    stream = _token_stream(tokenizer, _training_texts(text))
    batches = _batches(stream, steps, batch_size, seq_len, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        record = _train(model, batches, lr, progress)
    changed = _changed_tensors(model, snapshot, base_dtype)
    if not changed:
        logger.warning("no trained tensor changed in %s; raise lr or steps", base_dtype)
    record.update(
        base=str(base.resolve()),
        layers=None if span is None else list(span),
        steps=steps,
        lr=lr,
        seed=seed,
        seq_len=seq_len,
        batch_size=batch_size,
        dtype=str(base_dtype).removeprefix("torch."),
        text=None if text is None else str(text),
        trained_tensors=len(names),
        changed_tensors=len(changed),
        train_seconds=round(time.monotonic() - start, 2),
    )
    _save_variant(model, base, out, record, overwrite)
    seconds = time.monotonic() - start
    before, after = record["loss_first_batch_before"], record["loss_first_batch_after"]
    note_progress(progress, f"saved {out} in {seconds:.1f} s (loss {before:.3f} -> {after:.3f})")
    return out
