"""API keys of the HTTP endpoint (`blockllm http --api-keys FILE`): which key may use which
models, at how many requests per minute. Keys are stored only as SHA-256 hashes.

The file (TOML; `blockllm keys api-add NAME --models a,b` appends to it):

    [keys.alice]
    sha256 = "9f86d0..."          # hex SHA-256 of the key; the key itself is never stored
    models = ["base", "chat-a"]   # or ["*"]: every model
    rpm = 60                      # requests per minute; 0 or absent: no limit

A request presents `Authorization: Bearer KEY`. A key unknown, or missing, is 401; a model the
key may not use is answered exactly as an unknown model (404), so a tenant cannot learn what
other tenants serve.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

KEY_PREFIX = "sk-blockllm-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
WINDOW_S = 60.0


class ApiKeysError(ValueError):
    """The keys file is missing, malformed, or the key to add is refused (user-facing)."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key's rights: `models` ("*" = all) and `rpm` (0 = unlimited)."""

    name: str
    sha256: str
    models: tuple[str, ...]
    rpm: int = 0

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


@dataclass
class RateLimiter:
    """Requests per minute per key: a sliding window of admission times (monotonic)."""

    seen: dict[str, collections.deque[float]] = field(default_factory=dict)

    def admit(self, key: ApiKey, now: float | None = None) -> float:
        """0 if the request may go, else the seconds until it could (the 429's Retry-After)."""
        if key.rpm <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        window = self.seen.setdefault(key.sha256, collections.deque())
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        if len(window) >= key.rpm:
            return max(0.001, window[0] + WINDOW_S - now)
        window.append(now)
        return 0.0


def _entry(path: Path, name: str, table: object) -> ApiKey:
    if not _NAME.match(name):
        raise ApiKeysError(f"{path}: bad key name [keys.{name}] (letters, digits, _.-)")
    if not isinstance(table, dict):
        raise ApiKeysError(f"{path}: keys.{name} must be a table")
    unknown = set(table) - {"sha256", "models", "rpm"}
    if unknown:
        raise ApiKeysError(f"{path}: [keys.{name}] unknown key {sorted(unknown)[0]!r}")
    digest, models, rpm = table.get("sha256"), table.get("models"), table.get("rpm", 0)
    if not isinstance(digest, str) or not _HEX.match(digest):
        raise ApiKeysError(f"{path}: [keys.{name}] sha256 must be 64 lowercase hex digits")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        raise ApiKeysError(f'{path}: [keys.{name}] models must be a list of names (or ["*"])')
    if isinstance(rpm, bool) or not isinstance(rpm, int) or rpm < 0:
        raise ApiKeysError(f"{path}: [keys.{name}] rpm must be an integer >= 0")
    return ApiKey(name, digest, tuple(models), rpm)


def load_api_keys(path: str | os.PathLike[str]) -> dict[str, ApiKey]:
    """sha256 hex -> ApiKey from the file; ApiKeysError naming what is wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ApiKeysError(f"{path}: cannot read the API keys file ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ApiKeysError(f"{path}: not valid TOML: {e}") from None
    if set(data) - {"keys"}:
        raise ApiKeysError(f"{path}: only [keys.NAME] tables are allowed")
    keys = data.get("keys", {})
    if not isinstance(keys, dict):
        raise ApiKeysError(f"{path}: [keys] must hold [keys.NAME] tables")
    out: dict[str, ApiKey] = {}
    for name, table in keys.items():
        entry = _entry(path, name, table)
        if entry.sha256 in out:
            raise ApiKeysError(f"{path}: keys {out[entry.sha256].name} and {name} are the same")
        out[entry.sha256] = entry
    return out


def add_api_key(path: str | os.PathLike[str], name: str, models: list[str], rpm: int = 0) -> str:
    """Make a key for `name`, append its hash to the file (created mode 0600), return the key
    (shown once: it is not stored). ApiKeysError for a bad or taken name or a bad file."""
    path = Path(path)
    if not _NAME.match(name):
        raise ApiKeysError(f"bad key name {name!r}: letters, digits and _.- (at most 64)")
    if not models or not all(m.strip() for m in models):
        raise ApiKeysError('give the models the key may use: --models a,b (or "*")')
    if rpm < 0:
        raise ApiKeysError("rpm must be >= 0")
    text = ""
    if path.exists():
        if any(k.name == name for k in load_api_keys(path).values()):
            raise ApiKeysError(f"{path}: a key named {name!r} exists already")
        text = path.read_text(encoding="utf-8")
    key = new_key()
    quoted = ", ".join('"' + m.strip().replace('"', "") + '"' for m in models)
    entry = f'\n[keys.{name}]\nsha256 = "{key_hash(key)}"\nmodels = [{quoted}]\n'
    entry += f"rpm = {rpm}\n" if rpm else ""
    if not text:
        text = "# BlockLLM API keys (`blockllm http --api-keys FILE`): SHA-256 hashes only.\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n" + entry)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    load_api_keys(path)  # what we wrote must read back
    return key
