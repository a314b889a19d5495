"""Roles behind the keys (issue 14, item 3), on a real broker with --keys: each message kind is
accepted only from the roles allowed to send it. A client key sending READY, RESULT or RELOAD
is refused (ERROR FORBIDDEN) and nothing changes; a worker key sending GENERATE is refused; a
client may FETCH a manifest but not a block; a key admitted without a role (folders made
before roles) may still do anything, as before.

Before roles, any admitted key could register as a worker or send planner commands.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from blockllm.broker import frames
from blockllm.broker.config import BrokerConfig
from blockllm.broker.planner.proc import send_command
from blockllm.broker.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Blob,
    Error,
    Fetch,
    Generate,
    Message,
    Ready,
    Reload,
    Result,
    StageRef,
    StatusRequest,
    Token,
)
from blockllm.broker.security import (
    admit_key,
    generate_keys,
    load_client_keys,
)
from blockllm.broker.sockets import make_socket
from blockllm.client import Client
from blockllm.client.launcher import Launcher
from blockllm.zoo import Zoo
from blockllm.zoo.chain import stage_key
from tests.integration.cluster import FAST_BEAT, hf_greedy, make_zoo, worker_config


class Peer:
    """A DEALER presenting the keys of one role (a test peer, not a mock)."""

    def __init__(self, endpoint: str, keys: Path, role: str, identity: bytes | None = None):
        self.ctx = zmq.Context()
        curve = load_client_keys(keys, role)
        self.sock = make_socket(
            self.ctx, zmq.DEALER, endpoint, bind=False, curve=curve, identity=identity
        )

    def ask(self, msg: Message, want: tuple[type, ...] = (Error,), timeout: float = 20.0):
        """Send `msg`; the first answer of a type in `want` (others, e.g. pings, skipped)."""
        self.sock.send_multipart(frames.encode(msg))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            assert self.sock.poll(int(left * 1000)), f"no answer to {msg}"
            reply, _ = frames.decode(self.sock.recv_multipart())
            if isinstance(reply, want):
                return reply
        raise AssertionError(f"no {want} answering {msg}")

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def forbidden(reply: object) -> bool:
    return isinstance(reply, Error) and reply.code == "FORBIDDEN"


@pytest.mark.timeout(180)
def test_each_role_sends_only_its_kinds(tiny_checkpoint, tmp_path: Path):
    ckpt = tiny_checkpoint("llama")
    zoo_dir = make_zoo(tmp_path / "zoo", {"llama": ckpt})
    keys = tmp_path / "keys"
    generate_keys(keys)
    old = tmp_path / "old-node"  # a key admitted without a role: any role, as before roles
    generate_keys(old, broker_key=keys / "broker.key", role="client")
    admit_key(keys, old / "client.key_secret", name="legacy")  # a secret file names no role
    m = Zoo(zoo_dir).manifest("llama")
    n = len(m.chain)
    with Launcher(log_level="WARNING", stop_timeout=15.0) as launcher:
        cfg = BrokerConfig(
            bind="tcp://127.0.0.1:0",
            zoo_dir=str(zoo_dir),
            heartbeat_s=FAST_BEAT,
            keys_dir=str(keys),
        )
        endpoint = launcher.start_broker(cfg, 60.0)
        launcher.start_worker(
            "w0", worker_config(endpoint, zoo_dir, "w0", [f"llama:0-{n}"], keys_dir=str(keys))
        )
        before = launcher.wait_ready(["llama"], 90.0, keys_dir=str(keys))
        client, worker = Peer(endpoint, keys, "client"), Peer(endpoint, keys, "worker")
        legacy = Peer(endpoint, old, "client")
        try:
            stage = StageRef(stage_key(m, 0, n), "llama", 0, n)
            fake = Ready(PROTOCOL_VERSION, "evil", 1, "h", "cpu", (stage,), 1 << 30, 1 << 30, 8, 8)
            assert forbidden(client.ask(fake))
            assert forbidden(client.ask(Result("r", 1, token_id=3)))
            assert forbidden(client.ask(Reload("c1")))
            block = client.ask(Fetch("f1", "block", m.chain[1]))
            assert forbidden(block) and block.request_id == "f1"
            assert not forbidden(client.ask(Fetch("f2", "manifest", "llama"), (Error, Blob)))
            assert forbidden(worker.ask(Generate("g1", "llama", None, (5, 17), 2)))
            # a legacy key (no role) may still do anything: a planner command is ACKed
            assert legacy.ask(Reload("c2"), (Ack,)).ok
            # ... and nothing changed: still one worker, no command from the refused keys
            with Client(endpoint, keys_dir=str(keys), timeout=60) as c:
                after = c.status()
                got = c.generate("llama", input_ids=[5, 17, 42], max_new_tokens=4).token_ids
            assert got == hf_greedy(ckpt, [5, 17, 42], 4)
            assert [w["name"] for w in after["workers"]] == ["w0"]
            counters = after["counters"]
            assert counters["forbidden"] == 5
            assert counters["commands"] == before["counters"]["commands"] + 1  # the legacy one
            tok = legacy.ask(Generate("g2", "llama", None, (5, 17), 2), (Token,))
            assert tok.request_id == "g2"
            # `blockllm reload` (send_command) with a folder whose only pair is a client key
            # (it presents client.key): refused at once, not after its timeout
            only_client = tmp_path / "only-client"
            only_client.mkdir()
            for f in ("broker.key", "client.key", "client.key_secret"):
                (only_client / f).write_bytes((keys / f).read_bytes())
            (only_client / "client.key_secret").chmod(0o600)
            t0 = time.monotonic()
            ack = send_command(endpoint, Reload("c3"), 20.0, str(only_client))
            assert not ack.ok and "may not send RELOAD" in ack.message
            assert time.monotonic() - t0 < 10
            # a client key presenting worker w0's routing identity (the ROUTER hands w0's
            # traffic over to it): the broker sees another key under w0's identity, refuses
            # it and drops w0 (its requests would replay); the real w0 registers again
            thief = Peer(endpoint, keys, "client", identity=b"w0")
            try:
                thief.sock.send_multipart(frames.encode(StatusRequest("steal")))
                with Client(endpoint, keys_dir=str(keys), timeout=60) as c:
                    deadline = time.monotonic() + 30
                    while c.status()["counters"]["forbidden"] < 7:
                        assert time.monotonic() < deadline, "the identity theft went unseen"
            finally:
                thief.close()
            launcher.wait_ready(["llama"], 60.0, keys_dir=str(keys))
            with Client(endpoint, keys_dir=str(keys), timeout=60) as c:
                got = c.generate("llama", input_ids=[5, 17, 42], max_new_tokens=4).token_ids
            assert got == hf_greedy(ckpt, [5, 17, 42], 4)
        finally:
            for p in (client, worker, legacy):
                p.close()
