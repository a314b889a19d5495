"""Atomic files and advisory locks: a write is complete or absent, never partial.

Temp files are named `.<final name>.<pid>.<random>.tmp` in the final file's directory, so a
crash leaves only names `is_temp` recognises; `Zoo.gc` removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def temp_path(final: Path) -> Path:
    """A fresh temp name next to `final` (same filesystem, so os.replace is atomic)."""
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (directories: makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(final: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)`, fsync tmp, rename it to `final`, fsync the directory.

    On any failure the temp file is removed and `final` is untouched.
    """
    tmp = temp_path(final)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_path(final.parent)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    atomic_write(final, lambda tmp: tmp.write_bytes(data))


def atomic_install_dir(final: Path, fill: Callable[[Path], None]) -> bool:
    """Build a directory at a temp name with `fill(tmp)`, then rename it to `final`.

    Returns False (and discards the temp dir) when `final` already exists: content-addressed
    folders are identical, so whoever renamed first wins.
    """
    tmp = temp_path(final)
    try:
        tmp.mkdir()
        fill(tmp)
        for child in tmp.iterdir():
            fsync_path(child)
        fsync_path(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)
    return True


@contextlib.contextmanager
def flocked(path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold an advisory flock on `path` (created if absent) for the `with` body.

    Each call opens its own file description, so two holders in one process exclude each
    other like two processes do. Never nest an exclusive lock on a path inside a lock on the
    same path in one thread: that deadlocks.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the description releases the lock
