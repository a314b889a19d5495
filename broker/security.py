"""CurveZMQ keys for BlockLLM: generate, load, admit, and the ZAP authenticator for servers.

A keys directory (`blockllm keys gen DIR`) holds

    broker.key, broker.key_secret   the broker's pair (for the sockets the broker binds)
    worker.key, worker.key_secret   the pair workers present (role worker)
    planner.key, planner.key_secret the pair the planner presents (role planner: commands)
    client.key, client.key_secret   the pair clients present (role client)
    authorized/*.key                public keys the broker admits, each with its role

Roles: a public key file may carry `role = "worker"|"planner"|"client"` in its metadata
section; the ZAP handler records the role of each admitted key as the connection's User-Id
("ROLE:NAME"), and the broker accepts each message kind only from the roles allowed to send
it (`ROLE_KINDS`). An admitted key WITHOUT a role (key folders made before roles) may act
as any role, as before; the broker warns about each at start (re-admit it with `keys add
--role`). A process given `--keys DIR` presents its own role's pair, or `client.key` when
DIR has none (an old folder).

The files are ZeroMQ certificates (`zmq.auth.create_certificates`). Secret files are mode 0600,
the directory 0700. A node that only connects needs `broker.key` (public) and a client pair
(`blockllm keys gen DIR --broker-key broker.key` makes that without a broker pair).

Wiring, per process (all calls on the thread that owns the context's sockets):

    auth = start_authenticator(ctx, keys_dir)        # server side: BEFORE binding
    sock = make_socket(ctx, zmq.ROUTER, ep, bind=True, curve=load_server_keys(keys_dir))
    monitor = watch_handshakes(sock)                 # optional: log peers without keys
    ...
    auth.stop()                                      # before ctx.term()

    sock = make_socket(ctx, zmq.DEALER, ep, bind=False, curve=load_client_keys(keys_dir))

Without a ZAP handler libzmq lets every CURVE client in, whatever its key: that is why the
authenticator must run before the server socket binds.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from blockllm.broker.cluster_config import EXIT_CONFIG
from blockllm.broker.sockets import CurveKeys

logger = logging.getLogger(__name__)

BROKER = "broker"
CLIENT = "client"
WORKER = "worker"
PLANNER = "planner"
ROLES = (WORKER, PLANNER, CLIENT)
ANY_ROLE = "any"  # an admitted key without a role (made before roles): every kind allowed
AUTHORIZED = "authorized"
_ROLE_RE = re.compile(r'^\s*role\s*=\s*"([a-z]+)"\s*$', re.MULTILINE)
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
# A refused key reconnects every few hundred ms: warn once per key per interval, not each time.
REFUSAL_LOG_INTERVAL_S = 60.0
_MAX_TRACKED_KEYS = 1024
_Z85_KEY_LEN = 40
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KeysError(Exception):
    """A keys directory or key file is missing, unreadable or malformed (user-facing)."""

    exit_code = EXIT_CONFIG


def _check_key(key: bytes | None, path: Path, what: str) -> bytes:
    if key is None or len(key) != _Z85_KEY_LEN:
        raise KeysError(f"{path}: no valid CurveZMQ {what} key (corrupt or not a key file)")
    try:
        z85.decode(key)
    except (ValueError, KeyError):  # KeyError: a character outside the Z85 alphabet
        raise KeysError(f"{path}: malformed {what} key (not Z85 text)") from None
    return key


def read_key_file(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) z85 keys from a certificate file; `secret=True` requires the secret.

    Raises KeysError for a missing, unreadable or malformed file.
    """
    if not path.is_file():
        raise KeysError(f"{path}: missing (make keys with `blockllm keys gen DIR`)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeysError(f"{path}: unreadable key file ({e})") from None
    public = _check_key(public, path, "public")
    if secret:
        secret_key = _check_key(secret_key, path, "secret")
        if path.stat().st_mode & 0o077:
            logger.warning("[keys] %s is readable by other users: chmod 600 it", path)
    return public, secret_key


def _load_pair(keys_dir: Path, name: str) -> tuple[bytes, bytes]:
    if not keys_dir.is_dir():
        raise KeysError(f"{keys_dir}: no such keys directory (run `blockllm keys gen {keys_dir}`)")
    public, secret_key = read_key_file(keys_dir / f"{name}{SECRET_SUFFIX}", secret=True)
    assert secret_key is not None  # read_key_file(secret=True) checked it
    return public, secret_key


def load_server_keys(keys_dir: Path | str) -> CurveKeys:
    """The broker's pair, for the sockets that bind (`make_socket(curve=...)`). Raises KeysError."""
    public, secret_key = _load_pair(Path(keys_dir), BROKER)
    return CurveKeys(public=public, secret=secret_key)


def load_client_keys(keys_dir: Path | str, role: str = CLIENT) -> CurveKeys:
    """The pair of `role` (`client.key` when DIR has no such pair: an old folder) plus the
    broker's public key, for sockets that connect. Raises KeysError."""
    keys_dir = Path(keys_dir)
    name = role if (keys_dir / f"{role}{SECRET_SUFFIX}").is_file() else CLIENT
    public, secret_key = _load_pair(keys_dir, name)
    server_public, _ = read_key_file(keys_dir / f"{BROKER}{PUBLIC_SUFFIX}", secret=False)
    return CurveKeys(public=public, secret=secret_key, server_public=server_public)


# ---------------------------------------------------------------------------------------------
# Writing keys (the `blockllm keys` CLI)


def _prepare_dir(keys_dir: Path, paths: Iterable[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise KeysError(
            f"{keys_dir}: already holds {existing[0].name}; refusing to overwrite keys "
            "(pass --force to replace them: every peer then needs the new public keys)"
        )
    keys_dir.mkdir(parents=True, exist_ok=True)
    # 0700 before any secret is written into it, so no other user can ever open one.
    keys_dir.chmod(0o700)


def _install(staging: Path, keys_dir: Path, name: str) -> None:
    """Move a staged pair into place: public 0644, secret 0600, each by an atomic rename."""
    for suffix, mode in ((PUBLIC_SUFFIX, 0o644), (SECRET_SUFFIX, 0o600)):
        src = staging / f"{name}{suffix}"
        src.chmod(mode)
        os.replace(src, keys_dir / f"{name}{suffix}")


def check_role(role: str | None) -> str | None:
    if role is not None and role not in ROLES:
        raise KeysError(f"bad role {role!r}: one of {', '.join(ROLES)}")
    return role


def read_role(path: Path) -> str | None:
    """The `role` in a key file's metadata section; None without one (or unreadable)."""
    try:
        found = _ROLE_RE.search(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    return found.group(1) if found and found.group(1) in ROLES else None


def _write_public(public: bytes, dest: Path, role: str | None = None) -> None:
    """Write a public-only certificate (the format zmq.auth reads) atomically: temp, rename."""
    metadata = f'metadata\n    role = "{role}"\n' if role else "metadata\n"
    text = (
        "#   ZeroMQ CURVE Public Certificate (written by blockllm keys)\n"
        "#   Public: safe to copy to other nodes.\n\n"
        f'{metadata}curve\n    public-key = "{public.decode()}"\n'
    )
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".pub")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate_keys(
    keys_dir: Path | str,
    *,
    force: bool = False,
    broker_key: Path | str | None = None,
    role: str | None = None,
    name: str | None = None,
) -> list[Path]:
    """Write a keys directory; returns the files written. Raises KeysError.

    Without `broker_key` or `role`: the broker pair and one pair per role (worker, planner,
    client), each admitted in `authorized/` with its role. With `broker_key` (a node joining a
    cluster): that broker public key as `broker.key` and a fresh pair per role (or only
    `role`'s), whose public files the broker's operator admits with `blockllm keys add`. With
    `role` alone: one more pair NAME (default: the role) of that role, admitted when DIR has an
    `authorized/` folder. Refuses to replace existing pairs unless `force`.
    """
    keys_dir = Path(keys_dir)
    check_role(role)
    server_public = None
    if broker_key is not None:
        server_public, _ = read_key_file(Path(broker_key), secret=False)
    roles = [role] if role else list(ROLES)
    names = [name or role] if role else list(ROLES)
    if name is not None and not _NAME_RE.match(name):
        raise KeysError(f"bad key name {name!r}: use letters, digits, '_', '.', '-'")
    make_broker = server_public is None and role is None
    pairs = [
        keys_dir / f"{n}{s}"
        for n in ([BROKER] if make_broker else []) + names
        for s in (PUBLIC_SUFFIX, SECRET_SUFFIX)
    ]
    broker_public = keys_dir / f"{BROKER}{PUBLIC_SUFFIX}"
    _prepare_dir(keys_dir, [*pairs, broker_public] if server_public else pairs, force)
    with tempfile.TemporaryDirectory(dir=keys_dir, prefix=".staging-") as staging:
        if make_broker:
            zmq.auth.create_certificates(staging, BROKER)
            _install(Path(staging), keys_dir, BROKER)
        for n, r in zip(names, roles, strict=True):
            zmq.auth.create_certificates(staging, n)
            _install(Path(staging), keys_dir, n)
            pub = keys_dir / f"{n}{PUBLIC_SUFFIX}"
            _write_public(read_key_file(pub, secret=False)[0], pub, r)  # names its role
    written = list(pairs)
    if server_public is not None:
        _write_public(server_public, broker_public)
        written.append(broker_public)
    elif make_broker or (keys_dir / AUTHORIZED).is_dir():
        for n, r in zip(names, roles, strict=True):
            src = keys_dir / f"{n}{PUBLIC_SUFFIX}"
            written.append(admit_key(keys_dir, src, name=n, force=True, role=r))
    logger.info("[keys] wrote %s", ", ".join(str(p) for p in written))
    return written


def admit_key(
    keys_dir: Path | str,
    public_key_file: Path | str,
    *,
    name: str | None = None,
    force: bool = False,
    role: str | None = None,
) -> Path:
    """Copy a peer's public key into `authorized/` (as NAME.key) with its role (`role`, else
    the one its file names, else none: any role); returns the new file.

    Only the public key is copied, even from a secret file. A running broker picks the change
    up at the next handshake. Raises KeysError (bad file, bad name, NAME exists without force).
    """
    keys_dir, src = Path(keys_dir), Path(public_key_file)
    public, _ = read_key_file(src, secret=False)
    role = check_role(role) or read_role(src)
    name = name or src.name.split(".", 1)[0]
    if not _NAME_RE.match(name):
        raise KeysError(f"bad key name {name!r}: use letters, digits, '_', '.', '-'")
    auth_dir = keys_dir / AUTHORIZED
    if not keys_dir.is_dir():
        raise KeysError(f"{keys_dir}: no such keys directory (run `blockllm keys gen {keys_dir}`)")
    auth_dir.mkdir(mode=0o755, exist_ok=True)
    dest = auth_dir / f"{name}{PUBLIC_SUFFIX}"
    if dest.exists() and not force:
        if read_key_file(dest, secret=False)[0] == public and read_role(dest) == role:
            return dest
        raise KeysError(f"{dest}: exists with another key or role (pass --force, or --name)")
    _write_public(public, dest, role)
    return dest


def revoke_key(keys_dir: Path | str, name: str) -> Path:
    """Remove `authorized/NAME.key`; peers with that key are refused from their next handshake.

    Connections already established stay up until they drop: restart the broker to cut them.
    Raises KeysError if there is no such key.
    """
    path = Path(keys_dir) / AUTHORIZED / f"{name}{PUBLIC_SUFFIX}"
    if not _NAME_RE.match(name) or not path.is_file():
        raise KeysError(f"{path}: no such admitted key")
    path.unlink()
    return path


def authorized_roles(keys_dir: Path | str) -> dict[str, tuple[bytes, str]]:
    """Admitted keys by name with their role (ANY_ROLE: the file names none)."""
    auth_dir = Path(keys_dir) / AUTHORIZED
    keys = authorized_keys(keys_dir)
    return {
        n: (k, read_role(auth_dir / f"{n}{PUBLIC_SUFFIX}") or ANY_ROLE) for n, k in keys.items()
    }


def authorized_keys(keys_dir: Path | str) -> dict[str, bytes]:
    """Admitted public keys by name (`authorized/NAME.key`); unreadable files are logged, skipped.

    Raises KeysError if `authorized/` is missing.
    """
    auth_dir = Path(keys_dir) / AUTHORIZED
    if not auth_dir.is_dir():
        raise KeysError(f"{auth_dir}: missing (run `blockllm keys gen`, or create it)")
    keys: dict[str, bytes] = {}
    for path in sorted(auth_dir.glob(f"*{PUBLIC_SUFFIX}")):
        try:
            keys[path.name[: -len(PUBLIC_SUFFIX)]] = read_key_file(path, secret=False)[0]
        except KeysError as e:
            logger.error("[keys] ignoring %s", e)
    return keys


# ---------------------------------------------------------------------------------------------
# Server side: ZAP authenticator and handshake monitoring


class _AdmittedKeys:
    """ZAP credentials provider: admits the keys in `authorized/`, logs refusals.

    Called on the authenticator's thread only. Re-reads the folder when a *.key in it changes
    (checked at each handshake, not each message), so admitting a node needs no restart.
    """

    def __init__(self, auth_dir: Path) -> None:
        self._dir = auth_dir
        self._signature_seen: tuple[tuple[str, int, int, int], ...] | None = None
        self._keys: dict[bytes, tuple[str, str]] = {}  # z85 key -> (name, role)
        self._last_warned: dict[bytes, float] = {}
        self.refused = 0  # read by other threads for stats; written on the ZAP thread only
        self.reload_if_changed()

    @property
    def admitted(self) -> int:
        return len(self._keys)

    def _signature(self) -> tuple[tuple[str, int, int, int], ...]:
        # Inode numbers catch a key replaced within one timestamp tick (keys add renames a new
        # file into place), which a folder mtime alone can miss.
        entries = []
        with os.scandir(self._dir) as it:
            for e in it:
                if e.name.endswith(PUBLIC_SUFFIX):
                    st = e.stat()
                    entries.append((e.name, e.inode(), st.st_size, st.st_mtime_ns))
        return tuple(sorted(entries))

    def reload_if_changed(self) -> None:
        try:
            signature = self._signature()
            if signature == self._signature_seen:
                return
            keys = authorized_roles(self._dir.parent)
        except (OSError, KeysError) as e:
            logger.error("[auth] cannot read %s (%s): keeping the keys loaded before", self._dir, e)
            return
        self._signature_seen = signature
        self._keys = {key: (name, role) for name, (key, role) in keys.items()}
        logger.info("[auth] %d admitted key(s) from %s", len(self._keys), self._dir)
        for name, (_key, role) in sorted(keys.items()):
            if role == ANY_ROLE:
                logger.warning(
                    "[auth] %s/%s.key has no role: it may act as any role (worker, planner,"
                    " client); re-admit it with `blockllm keys add --role ROLE`",
                    self._dir,
                    name,
                )

    def user_id(self, key: bytes) -> str:
        """The User-Id of an admitted z85 key: "ROLE:NAME" (the broker reads the role)."""
        name, role = self._keys.get(key, ("?", ANY_ROLE))
        return f"{role}:{name}"

    def callback(self, domain: str, key: bytes) -> bool:
        self.reload_if_changed()
        found = self._keys.get(key)
        if found is not None:
            logger.debug("[auth] admitted %s as %s (%s)", found[0], found[1], key.decode())
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._last_warned.get(key, -REFUSAL_LOG_INTERVAL_S) >= REFUSAL_LOG_INTERVAL_S:
            if len(self._last_warned) >= _MAX_TRACKED_KEYS:  # bounded against key-spraying peers
                self._last_warned.clear()
            self._last_warned[key] = now
            logger.warning(
                "[auth] refused CurveZMQ key %s: not in %s (admit it with `blockllm keys add`)",
                key.decode(),
                self._dir,
            )
        return False


class _RoleAuthenticator(ThreadAuthenticator):
    """The ZAP handler whose User-Id for an admitted CURVE key is "ROLE:NAME"."""

    provider: _AdmittedKeys

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.provider.user_id(z85.encode(client_public_key))


def peer_role(user_id: str | None) -> tuple[str, str]:
    """(role, key name) of a connection's User-Id ("ROLE:NAME"); ANY_ROLE for anything else
    (no CurveZMQ, or a ZAP handler that is not ours)."""
    role, sep, name = (user_id or "").partition(":")
    if not sep or role not in (*ROLES, ANY_ROLE):
        return ANY_ROLE, user_id or ""
    return role, name


def start_authenticator(ctx: zmq.Context, keys_dir: Path | str) -> ThreadAuthenticator:
    """Start a ZAP handler on `ctx` admitting the CURVE keys in `keys_dir/authorized/`.

    Call before binding any CURVE server socket of `ctx` (one authenticator serves all of the
    context's sockets); call `.stop()` on the result before `ctx.term()`. Peers whose key is not
    admitted never complete the handshake and are logged (WARNING, once a minute per key).
    Raises KeysError if the folder is missing; an empty folder only warns.
    """
    auth_dir = Path(keys_dir) / AUTHORIZED
    if not auth_dir.is_dir():
        raise KeysError(f"{auth_dir}: missing (run `blockllm keys gen`, or create it)")
    provider = _AdmittedKeys(auth_dir)
    if not provider.admitted:
        logger.warning("[auth] %s admits no key: every peer will be refused", keys_dir)
    auth = _RoleAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
    auth.provider = provider
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=provider)
    return auth


_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def watch_handshakes(sock: zmq.Socket) -> zmq.Socket:
    """A PAIR socket that receives `sock`'s failed handshakes; poll it next to `sock`.

    For servers and clients alike. Call on the thread that owns `sock`, right after making it;
    on a readable monitor call `read_handshake_failure`; at the end `unwatch_handshakes`.
    A server learns of peers without keys this way (they never reach the ZAP handler); a
    client learns at once that the broker refused it, instead of waiting for its timeout.
    """
    # A unique address: pyzmq's default (derived from the fd) collides when fds are reused.
    address = f"inproc://blockllm-handshakes-{uuid.uuid4().hex}"
    sock.monitor(address, _HANDSHAKE_EVENTS)
    monitor = sock.context.socket(zmq.PAIR)
    monitor.setsockopt(zmq.LINGER, 0)
    monitor.connect(address)
    return monitor


def unwatch_handshakes(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Stop monitoring and close the monitor socket (before closing `sock`)."""
    if not sock.closed:
        sock.disable_monitor()
    monitor.close(0)


def read_handshake_failure(monitor: zmq.Socket) -> str:
    """Receive one event from a readable monitor, log it (WARNING); returns the reason.

    The connection it names is gone: after a refused key or a mechanism mismatch libzmq does
    not retry it (a new socket is needed), after NO_DETAIL it retries.
    """
    event = recv_monitor_message(monitor)
    endpoint = event["endpoint"].decode(errors="replace")
    reason = handshake_failure_reason(event)
    logger.warning("[auth] handshake failed on %s: %s", endpoint, reason)
    return reason


def handshake_failure_reason(event: Mapping[str, Any]) -> str:
    """A failed-handshake monitor event (`recv_monitor_message`'s dict) in words; pure."""
    kind, value = event["event"], event["value"]
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        reason = (
            f"CurveZMQ key not admitted (ZAP status {int(value)}): admit the peer's public "
            "key (its worker/planner/client.key) on the broker with `blockllm keys add --role`"
        )
    elif value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        reason = "security mismatch: one side uses CurveZMQ (--keys), the other does not"
    else:
        reason = (
            f"CurveZMQ handshake failed ({zmq.Event(kind).name}): does broker.key hold the "
            "broker's current public key?"
        )
    return reason
