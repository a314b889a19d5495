"""Rotate the broker's CurveZMQ key pair without losing an admitted key (`keys rotate-broker`).

A server socket has exactly one key, so a new broker pair means a new keys folder that the
broker is restarted on. Everything the old folder admitted must be admitted by the new one:
the other nodes' keys, the operator's client keys, and this node's own worker/planner/client
pairs. Copying `authorized/*.key` by hand overwrote the new folder's own `client.key` etc.
with the old ones (issue 19, item 2); `rotate_broker` never replaces a key that is there.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import zmq.auth

from blockllm.broker import security
from blockllm.broker.security import (
    AUTHORIZED,
    BROKER,
    PUBLIC_SUFFIX,
    ROLES,
    SECRET_SUFFIX,
    KeysError,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Rotation:
    """What `rotate_broker` did: the new folder, and the old admitted keys by their new name."""

    new_dir: Path
    created: bool  # NEW was made here (else: an existing folder was completed)
    kept: dict[str, str] = field(default_factory=dict)  # old name -> name in NEW/authorized
    already: list[str] = field(default_factory=list)  # old names NEW admitted already


def _free_name(auth_dir: Path, name: str) -> str:
    """NAME-old, NAME-old2, ...: the first name not yet under `auth_dir`."""
    for i in range(1, 1000):
        candidate = f"{name}-old" if i == 1 else f"{name}-old{i}"
        if not (auth_dir / f"{candidate}{PUBLIC_SUFFIX}").exists():
            return candidate
    raise KeysError(f"{auth_dir}: no free name for the old key {name!r}")


def _copy_private(src: Path, dest: Path, mode: int) -> None:
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def _new_folder(old_dir: Path, new_dir: Path) -> None:
    """Build NEW beside it in a staging folder, then rename it into place (atomic or absent):
    a fresh broker pair, this node's role pairs copied from OLD (only the broker key rotates),
    an empty `authorized/` that `_admit_old` fills."""
    new_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=new_dir.parent, prefix=f".{new_dir.name}.rotating-"))
    try:
        staging.chmod(0o700)
        zmq.auth.create_certificates(staging, BROKER)
        (staging / f"{BROKER}{PUBLIC_SUFFIX}").chmod(0o644)
        (staging / f"{BROKER}{SECRET_SUFFIX}").chmod(0o600)
        for role in ROLES:
            for suffix, mode in ((PUBLIC_SUFFIX, 0o644), (SECRET_SUFFIX, 0o600)):
                src = old_dir / f"{role}{suffix}"
                if src.is_file():
                    _copy_private(src, staging / f"{role}{suffix}", mode)
        (staging / AUTHORIZED).mkdir(mode=0o755)
        # rename(2) replaces an empty directory, never a non-empty one
        os.rename(staging, new_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def rotate_broker(old_dir: Path | str, new_dir: Path | str) -> Rotation:
    """Make NEW a keys folder with a new broker pair that admits every key OLD admits.

    NEW absent (or empty): made with a fresh broker pair and a copy of OLD's worker/planner/
    client pairs. NEW holding a broker pair already (e.g. from `keys gen NEW`): its pairs and
    admitted keys are kept. Then each key in OLD/authorized is admitted in NEW under its name
    with its role; where NEW has that name for another key, under NAME-old (NAME-old2, ...).
    Nothing in NEW is ever replaced. OLD is only read. Raises KeysError.
    """
    old_dir, new_dir = Path(old_dir), Path(new_dir)
    if old_dir.resolve() == new_dir.resolve():
        raise KeysError("the new keys folder must differ from the old one")
    old_keys = security.authorized_roles(old_dir)  # raises if OLD has no authorized/
    security.load_server_keys(old_dir)  # OLD must be a broker's folder (raises if not)
    created = not new_dir.exists() or (new_dir.is_dir() and not any(new_dir.iterdir()))
    if created:
        _new_folder(old_dir, new_dir)
    else:
        security.load_server_keys(new_dir)  # a folder without a broker pair is refused
        (new_dir / AUTHORIZED).mkdir(mode=0o755, exist_ok=True)
    rotation = Rotation(new_dir=new_dir, created=created)
    if security.load_server_keys(new_dir).public == security.load_server_keys(old_dir).public:
        raise KeysError(f"{new_dir} holds the same broker key as {old_dir}: nothing rotates")
    auth_new = new_dir / AUTHORIZED
    have = security.authorized_keys(new_dir)
    for name, (public, role) in old_keys.items():
        if public in have.values():
            rotation.already.append(name)
            continue
        target = name if name not in have else _free_name(auth_new, name)
        src = old_dir / AUTHORIZED / f"{name}{PUBLIC_SUFFIX}"
        security.admit_key(
            new_dir, src, name=target, role=None if role == security.ANY_ROLE else role
        )
        have[target] = public
        rotation.kept[name] = target
    logger.info("[keys] rotated the broker key into %s: kept %s", new_dir, rotation.kept)
    return rotation
