"""`blockllm keys ...`: make and manage the CurveZMQ keys that secure TCP between nodes."""

from __future__ import annotations

from pathlib import Path

import click

from blockllm.broker import security
from blockllm.client.cli.common import CliError, echo_json, json_option

_dir_arg = click.argument("keys_dir", metavar="DIR", type=click.Path(path_type=Path))


def _fail(e: security.KeysError) -> CliError:
    return CliError(str(e), exit_code=1)


@click.group("keys")
def keys() -> None:
    """CurveZMQ keys: authentication and encryption between broker, workers and clients."""


_role_opt = click.option(
    "--role",
    type=click.Choice(security.ROLES),
    default=None,
    help="worker: may register and serve; planner: may send commands (load, routes, reload);"
    " client: may generate, cancel, ask status.",
)


@keys.command("gen")
@_dir_arg
@click.option("--force", is_flag=True, help="Replace existing key pairs in DIR.")
@click.option(
    "--broker-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Join a cluster: use this broker public key (its broker.key) instead of making a "
    "broker pair; then admit this node's public keys on the broker with `keys add`.",
)
@_role_opt
@click.option("--name", default=None, help="With --role: the pair's name [default: the role].")
def gen(
    keys_dir: Path, force: bool, broker_key: Path | None, role: str | None, name: str | None
) -> None:
    """Write the broker's pair and one pair per role, each admitted with its role.

    \b
    DIR/broker.key, broker.key_secret     the broker's pair (secret: mode 0600)
    DIR/worker.key, worker.key_secret     what workers present (role worker)
    DIR/planner.key, planner.key_secret   what the planner presents (role planner)
    DIR/client.key, client.key_secret     what clients present (role client)
    DIR/authorized/*.key                  the public keys the broker admits, with roles

    Every process given --keys DIR presents its own role's pair. With --role: make one more
    pair of that role (named --name) and admit it when DIR has authorized/. Keys admitted
    without a role (folders made before roles) may act as any role: re-admit them with
    `keys add --role`.
    """
    if name is not None and role is None:
        raise CliError("--name needs --role")
    try:
        written = security.generate_keys(
            keys_dir, force=force, broker_key=broker_key, role=role, name=name
        )
    except security.KeysError as e:
        raise _fail(e) from None
    for path in written:
        click.echo(str(path))


@keys.command("add")
@_dir_arg
@click.argument("pubkey_file", metavar="PUBKEY_FILE", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Name under authorized/ [default: the file's stem].")
@click.option("--force", is_flag=True, help="Replace an admitted key of the same name.")
@_role_opt
def add(keys_dir: Path, pubkey_file: Path, name: str | None, force: bool, role: str | None) -> None:
    """Admit another node's public key into DIR/authorized/ with its role (--role, else the
    role its file names; a key with neither may act as any role).

    A running broker reads the change at the next connection attempt; no restart needed.
    """
    if name is None and pubkey_file.name.split(".", 1)[0] in (security.BROKER, *security.ROLES):
        # Every node's pairs have these names: name it, or it would replace this node's own.
        raise CliError("name the key of another node: `keys add DIR FILE --name NODE`")
    try:
        dest = security.admit_key(keys_dir, pubkey_file, name=name, force=force, role=role)
    except security.KeysError as e:
        raise _fail(e) from None
    if security.read_role(dest) is None:
        click.echo(f"warning: {dest} has no role: it may act as any role (use --role)", err=True)
    click.echo(str(dest))


@keys.command("rotate-broker")
@click.argument("old_dir", metavar="OLD", type=click.Path(file_okay=False, path_type=Path))
@click.argument("new_dir", metavar="NEW", type=click.Path(file_okay=False, path_type=Path))
@json_option
def rotate_broker(old_dir: Path, new_dir: Path, as_json: bool) -> None:
    """Make NEW: the broker keys folder OLD with a new broker pair, admitting every key OLD
    admits (other nodes', clients', this node's own).

    \b
    NEW absent: a new broker pair, and this node's worker/planner/client pairs copied from
    OLD (only the broker key changes). NEW made before (`keys gen NEW`): its pairs and
    admitted keys stay. Each OLD/authorized/NAME.key is admitted in NEW as NAME, or as
    NAME-old where NEW has another key of that name. Nothing in NEW is replaced; OLD is only
    read. Then give NEW/broker.key to every node and restart the broker on NEW.
    """
    from blockllm.broker.keyrotate import rotate_broker as rotate

    try:
        done = rotate(old_dir, new_dir)
    except security.KeysError as e:
        raise _fail(e) from None
    if as_json:
        echo_json(
            {
                "new_dir": str(done.new_dir),
                "created": done.created,
                "broker_key": str(done.new_dir / f"{security.BROKER}{security.PUBLIC_SUFFIX}"),
                "kept": done.kept,
                "already_admitted": done.already,
            }
        )
        return
    for old, new in done.kept.items():
        click.echo(f"admitted {old}" + (f" as {new}" if new != old else ""))
    for name in done.already:
        click.echo(f"admitted {name} (already in {new_dir})")
    click.echo(f"new broker key: {done.new_dir / (security.BROKER + security.PUBLIC_SUFFIX)}")


@keys.command("revoke")
@_dir_arg
@click.argument("name")
def revoke(keys_dir: Path, name: str) -> None:
    """Stop admitting DIR/authorized/NAME.key (new connections; restart the broker to cut
    established ones)."""
    try:
        click.echo(str(security.revoke_key(keys_dir, name)))
    except security.KeysError as e:
        raise _fail(e) from None


@keys.command("ls")
@_dir_arg
@json_option
def ls(keys_dir: Path, as_json: bool) -> None:
    """Show the public keys in DIR and the admitted ones (compare them across nodes)."""
    if not keys_dir.is_dir():
        raise CliError(f"{keys_dir}: no such keys directory")
    own: dict[str, str | None] = {}
    for name in (security.BROKER, *security.ROLES):
        path = keys_dir / f"{name}{security.PUBLIC_SUFFIX}"
        try:
            own[name] = security.read_key_file(path, secret=False)[0].decode()
        except security.KeysError:
            own[name] = None
    try:
        roles = security.authorized_roles(keys_dir)
    except security.KeysError:
        roles = {}
    admitted = {n: k.decode() for n, (k, _role) in roles.items()}
    if as_json:
        echo_json(
            {
                "dir": str(keys_dir),
                **own,
                "authorized": admitted,
                "roles": {n: r for n, (_k, r) in roles.items()},
            }
        )
        return
    for name, key in own.items():
        click.echo(f"{name:<12} {key or '-'}")
    for name, (key, role) in roles.items():
        click.echo(f"authorized   {key.decode()}  {name} ({role})")


@keys.command("api-add")
@click.argument("name")
@click.option(
    "--models",
    "models_text",
    required=True,
    metavar="A,B",
    help='Models the key may use, comma-separated ("*": every model).',
)
@click.option(
    "--rpm",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Requests per minute the key may make (0: no limit).",
)
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BLOCKLLM_API_KEYS",
    default="api_keys.toml",
    show_default=True,
    help="The API keys file `blockllm http --api-keys FILE` reads (created mode 0600).",
)
def api_add(name: str, models_text: str, rpm: int, path: Path) -> None:
    """Make an API key for the HTTP API: print it once, store only its SHA-256 in FILE.

    A running `blockllm http` reads the file at start: restart it to admit the new key.
    """
    from blockllm.client.http.apikeys import ApiKeysError, add_api_key

    models = [m.strip() for m in models_text.split(",") if m.strip()]
    try:
        key = add_api_key(path, name, models, rpm)
    except ApiKeysError as e:
        raise CliError(str(e)) from None
    click.echo(key)
    click.echo(
        f"(key {name!r} for {', '.join(models)} stored as a hash in {path}; it is shown only now)",
        err=True,
    )
