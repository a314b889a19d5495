"""Typed errors of the zoo: every failure the CLI turns into one line is one of these."""

from __future__ import annotations


class ZooError(Exception):
    """Base of every zoo failure."""


class UnknownModelError(ZooError):
    """No manifest of that name in the zoo."""


class UnsupportedModelError(ZooError):
    """The checkpoint's architecture (model_type, layout, quantization) is not supported."""


class CheckpointError(ZooError):
    """The checkpoint folder is malformed: missing folder/config, or a missing, extra or
    misshapen tensor (the message names it)."""


class IntegrityError(ZooError):
    """A stored block or tokenizer does not hash to its id, or is missing or unreadable."""
