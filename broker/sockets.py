"""One place that creates ZeroMQ sockets with every option set explicitly (STYLE 7.4)."""

from __future__ import annotations

from dataclasses import dataclass

import zmq

# Tensor sockets keep small queues: the batch queues are the buffer, not libzmq.
DEFAULT_HWM = 1000
MAX_MSG_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """CurveZMQ key material for one socket (z85-encoded bytes)."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None  # set on client sockets: the broker's public key


def make_socket(
    ctx: zmq.Context,
    kind: int,
    endpoint: str,
    *,
    bind: bool,
    identity: bytes | None = None,
    linger_ms: int = 0,
    hwm: int = DEFAULT_HWM,
    curve: CurveKeys | None = None,
) -> zmq.Socket:
    """A socket of `kind` bound or connected to `endpoint` with HWMs, linger, MAXMSGSIZE set.

    ROUTERs get ROUTER_MANDATORY (an unknown peer raises EHOSTUNREACH instead of a silent drop)
    and ROUTER_HANDOVER (a restarted worker reclaims its identity).
    """
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if curve is not None:
        sock.curve_publickey = curve.public
        sock.curve_secretkey = curve.secret
        if bind:
            sock.curve_server = True
        else:
            if curve.server_public is None:
                raise ValueError("a CurveZMQ client socket needs the server's public key")
            sock.curve_serverkey = curve.server_public
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


def bound_endpoint(sock: zmq.Socket) -> str:
    """The real endpoint a socket bound to (tcp://127.0.0.1:0 -> the port the OS chose)."""
    ep = sock.getsockopt(zmq.LAST_ENDPOINT)
    return ep.decode() if isinstance(ep, bytes) else str(ep)
