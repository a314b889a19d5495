"""CurveZMQ over real sockets on 127.0.0.1: an admitted client is served; a client whose key is
not admitted, and a client without keys, never get a message in (and the refusal is logged);
key files are private; `blockllm keys` refuses to overwrite."""

from __future__ import annotations

import contextlib
import json
import logging
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner

from blockllm.broker import security
from blockllm.broker.sockets import CurveKeys, bound_endpoint, make_socket
from blockllm.client.cli.keys import keys as keys_cli

DEADLINE_MS = 5000  # bound on every wait; the happy paths take milliseconds


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    security.generate_keys(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


class Server:
    """A CURVE ROUTER with its authenticator and handshake monitor, as the broker wires them."""

    def __init__(self, ctx: zmq.Context, keys_dir: Path) -> None:
        self.auth = security.start_authenticator(ctx, keys_dir)  # before bind
        self.sock = make_socket(
            ctx,
            zmq.ROUTER,
            "tcp://127.0.0.1:0",
            bind=True,
            curve=security.load_server_keys(keys_dir),
        )
        self.monitor = security.watch_handshakes(self.sock)
        self.endpoint = bound_endpoint(self.sock)

    def wait_refusal(self) -> str:
        assert self.monitor.poll(DEADLINE_MS), "no handshake failure reported"
        return security.read_handshake_failure(self.monitor)

    def close(self) -> None:
        security.unwatch_handshakes(self.sock, self.monitor)
        self.sock.close(0)
        self.auth.stop()


@pytest.fixture
def server(ctx: zmq.Context, keys_dir: Path) -> Iterator[Server]:
    s = Server(ctx, keys_dir)
    yield s
    s.close()


def _client(ctx: zmq.Context, endpoint: str, curve: CurveKeys | None) -> zmq.Socket:
    return make_socket(ctx, zmq.DEALER, endpoint, bind=False, curve=curve)


def _try_send(sock: zmq.Socket, body: bytes) -> None:
    """Send without blocking: once libzmq drops a refused connection a DEALER has no peer,
    and a blocking send would wait forever."""
    with contextlib.suppress(zmq.Again):
        sock.send(body, zmq.NOBLOCK)


def _round_trip(server: Server, client: zmq.Socket) -> None:
    client.send(b"ping")
    assert server.sock.poll(DEADLINE_MS), "admitted client not served"
    peer, body = server.sock.recv_multipart()
    assert body == b"ping"
    server.sock.send_multipart([peer, b"pong"])
    assert client.poll(DEADLINE_MS) and client.recv() == b"pong"


def test_admitted_client_is_served(ctx: zmq.Context, server: Server, keys_dir: Path) -> None:
    client = _client(ctx, server.endpoint, security.load_client_keys(keys_dir))
    _round_trip(server, client)


def test_unadmitted_key_gets_nothing_and_is_logged(
    ctx: zmq.Context,
    server: Server,
    keys_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A node that knows the broker's key but whose own key was never admitted.
    other = tmp_path / "other"
    security.generate_keys(other, broker_key=keys_dir / "broker.key")
    caplog.set_level(logging.WARNING, logger="blockllm.broker.security")
    client = _client(ctx, server.endpoint, security.load_client_keys(other))
    _try_send(client, b"let me in")
    assert "not admitted" in server.wait_refusal()
    assert server.sock.poll(0) == 0  # the handshake failed: nothing can have come in
    refused = security.read_key_file(other / "client.key", secret=False)[0].decode()
    assert any(refused in r.getMessage() for r in caplog.records), caplog.text

    # Admitting the key takes effect without restarting the server. (libzmq does not retry a
    # connection refused by ZAP: the node connects again with a new socket.)
    security.admit_key(keys_dir, other / "client.key", name="other")
    _round_trip(server, _client(ctx, server.endpoint, security.load_client_keys(other)))


def test_plain_client_gets_nothing(ctx: zmq.Context, server: Server) -> None:
    client = _client(ctx, server.endpoint, None)
    _try_send(client, b"hello?")
    assert "security mismatch" in server.wait_refusal()
    assert server.sock.poll(0) == 0


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("plain", "security mismatch"),
        ("unadmitted", "not admitted"),
        ("wrong broker key", "broker's current public key"),
    ],
)
def test_client_learns_why_it_was_refused(
    ctx: zmq.Context, server: Server, keys_dir: Path, tmp_path: Path, case: str, expected: str
) -> None:
    other = tmp_path / "other"
    security.generate_keys(other, broker_key=keys_dir / "broker.key")
    mine = security.load_client_keys(keys_dir)
    curve = {
        "plain": None,
        "unadmitted": security.load_client_keys(other),
        "wrong broker key": CurveKeys(mine.public, mine.secret, server_public=mine.public),
    }[case]
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        client.curve_publickey, client.curve_secretkey = curve.public, curve.secret
        client.curve_serverkey = curve.server_public
    monitor = security.watch_handshakes(client)  # before connecting: no event can be missed
    client.connect(server.endpoint)
    _try_send(client, b"hello?")
    assert monitor.poll(DEADLINE_MS), "the client was not told"
    assert expected in security.read_handshake_failure(monitor)
    assert server.sock.poll(0) == 0
    security.unwatch_handshakes(client, monitor)


def test_revoked_key_is_refused(ctx: zmq.Context, server: Server, keys_dir: Path) -> None:
    security.revoke_key(keys_dir, "client")
    client = _client(ctx, server.endpoint, security.load_client_keys(keys_dir))
    _try_send(client, b"ping")
    assert "not admitted" in server.wait_refusal()
    assert server.sock.poll(0) == 0


def test_key_files_are_private(keys_dir: Path) -> None:
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    for name in ("broker", *security.ROLES):
        assert stat.S_IMODE((keys_dir / f"{name}.key_secret").stat().st_mode) == 0o600
    assert (keys_dir / "authorized" / "client.key").read_text().count("secret-key") == 0
    server, client = security.load_server_keys(keys_dir), security.load_client_keys(keys_dir)
    assert client.server_public == server.public and client.public != server.public
    assert security.authorized_roles(keys_dir) == {
        role: (security.load_client_keys(keys_dir, role).public, role) for role in security.ROLES
    }
    assert security.authorized_keys(keys_dir)["client"] == client.public


def test_no_overwrite_without_force(keys_dir: Path) -> None:
    before = security.load_server_keys(keys_dir)
    with pytest.raises(security.KeysError, match="--force"):
        security.generate_keys(keys_dir)
    assert security.load_server_keys(keys_dir) == before
    security.generate_keys(keys_dir, force=True)
    assert security.load_server_keys(keys_dir) != before
    # The new client key replaced the old one in authorized/.
    assert (
        security.authorized_keys(keys_dir)["client"] == security.load_client_keys(keys_dir).public
    )


def test_clear_errors_for_missing_and_corrupt_keys(tmp_path: Path, keys_dir: Path) -> None:
    with pytest.raises(security.KeysError, match="blockllm keys gen"):
        security.load_client_keys(tmp_path / "nowhere")
    (keys_dir / "broker.key").unlink()
    with pytest.raises(security.KeysError, match=r"broker\.key: missing"):
        security.load_client_keys(keys_dir)
    (keys_dir / "client.key_secret").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(security.KeysError, match=r"client\.key_secret: no valid CurveZMQ public"):
        security.load_client_keys(keys_dir)
    (keys_dir / "client.key_secret").write_text(f'curve\n    public-key = "{"~" * 40}"\n')
    with pytest.raises(security.KeysError, match="not Z85"):
        security.load_client_keys(keys_dir)
    (keys_dir / "authorized").rename(tmp_path / "moved")
    with pytest.raises(security.KeysError, match="authorized: missing"):
        security.start_authenticator(zmq.Context.instance(), keys_dir)
    assert security.KeysError("x").exit_code == 78


def test_admit_copies_only_the_public_key(keys_dir: Path, tmp_path: Path) -> None:
    node = tmp_path / "node"
    security.generate_keys(node, broker_key=keys_dir / "broker.key")
    assert not (node / "broker.key_secret").exists()  # a joining node never holds it
    dest = security.admit_key(keys_dir, node / "client.key_secret", name="node2", role="client")
    assert "secret" not in dest.read_text().replace("Secret", "")
    assert security.authorized_keys(keys_dir)["node2"] == security.load_client_keys(node).public
    # Same key and role again (client.key names its role): no-op; another key or another
    # role under the same name: refused without force.
    assert security.admit_key(keys_dir, node / "client.key", name="node2") == dest
    with pytest.raises(security.KeysError, match="exists with another key"):
        security.admit_key(keys_dir, node / "client.key", name="node2", role="worker")
    with pytest.raises(security.KeysError, match="exists with another key"):
        security.admit_key(keys_dir, keys_dir / "broker.key", name="node2")
    with pytest.raises(security.KeysError, match="bad key name"):
        security.admit_key(keys_dir, node / "client.key", name="../evil")


def test_keys_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    d = tmp_path / "k"
    result = runner.invoke(keys_cli, ["gen", str(d)])
    assert result.exit_code == 0, result.output
    assert f"{d}/broker.key_secret" in result.output
    result = runner.invoke(keys_cli, ["gen", str(d)])
    assert result.exit_code != 0 and "refusing to overwrite" in str(result.exception)
    assert runner.invoke(keys_cli, ["gen", str(d), "--force"]).exit_code == 0

    node = tmp_path / "node"
    args = ["gen", str(node), "--broker-key", str(d / "broker.key")]
    assert runner.invoke(keys_cli, args).exit_code == 0
    # Every node's key file is called client.key: admitting one needs a name.
    result = runner.invoke(keys_cli, ["add", str(d), str(node / "client.key")])
    assert result.exit_code != 0 and "--name" in str(result.exception)
    add = ["add", str(d), str(node / "client.key"), "--name", "node2"]
    assert runner.invoke(keys_cli, add).exit_code == 0

    result = runner.invoke(keys_cli, ["ls", str(d), "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert set(listing["authorized"]) == {"client", "planner", "worker", "node2"}
    assert listing["roles"] == {
        "client": "client",
        "planner": "planner",
        "worker": "worker",
        "node2": "client",
    }
    # one more key of a role, made and admitted in one go
    result = runner.invoke(keys_cli, ["gen", str(d), "--role", "worker", "--name", "gpu7"])
    assert result.exit_code == 0, result.output
    assert security.authorized_roles(d)["gpu7"][1] == "worker"
    result = runner.invoke(keys_cli, ["add", str(d), str(node / "worker.key"), "--name", "n2w"])
    assert result.exit_code == 0 and security.authorized_roles(d)["n2w"][1] == "worker"
    assert listing["broker"] == security.load_server_keys(d).public.decode()
    assert runner.invoke(keys_cli, ["revoke", str(d), "node2"]).exit_code == 0
    assert "node2" not in security.authorized_keys(d)


def test_refusals_are_rate_limited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "authorized").mkdir()
    provider = security._AdmittedKeys(tmp_path / "authorized")
    caplog.set_level(logging.WARNING, logger="blockllm.broker.security")
    key = b"x" * 40
    t0 = time.monotonic()
    assert not provider.callback("*", key)
    assert not provider.callback("*", key)
    assert provider.refused == 2
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
    assert time.monotonic() - t0 < security.REFUSAL_LOG_INTERVAL_S


def test_a_keyless_client_is_told_to_pass_keys(server: Server, keys_dir: Path) -> None:
    """Issue 19.7: a keyless `Client` of a keyed broker logged "HANDSHAKE_FAILED_PROTOCOL;
    check the keys"; now its error says to pass keys. A client with keys (a worker's key
    refused) no longer reads "admit the client's client.key"."""
    from blockllm.client import Client
    from blockllm.client.errors import BrokerUnavailable

    with Client(server.endpoint, timeout=30) as c, pytest.raises(BrokerUnavailable) as e:
        c.status(timeout=30)
    assert "requires CurveZMQ keys" in str(e.value) and "BLOCKLLM_KEYS" in str(e.value)
    security.revoke_key(keys_dir, "client")
    with (
        Client(server.endpoint, keys_dir=keys_dir, timeout=30) as c,
        pytest.raises(BrokerUnavailable) as e,
    ):
        c.status(timeout=30)
    assert "keys add --role" in str(e.value) and "client's client.key" not in str(e.value)
