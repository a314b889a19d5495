"""broker/lifecycle.py notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import socket

import pytest

from blockllm.broker.lifecycle import notify


def test_notify_outside_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_notify_sends_one_datagram(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1", "STATUS=serving") is True
        assert server.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"blockllm-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STOPPING=1") is True
        assert server.recv(4096) == b"STOPPING=1"


def test_notify_to_a_missing_socket_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    assert notify("READY=1") is False


def test_watchdog_kicks_at_half_the_interval(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from blockllm.broker.lifecycle import Watchdog

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "60000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        dog = Watchdog()
        assert dog.interval_s == 30.0
        dog.kick()
        dog.kick()  # within the interval: nothing more
        assert server.recv(4096) == b"WATCHDOG=1"
        server.settimeout(0.05)
        with pytest.raises(TimeoutError):
            server.recv(4096)


def test_watchdog_off_without_usec_or_for_another_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    from blockllm.broker.lifecycle import Watchdog

    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert Watchdog().interval_s == 0
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # inherited from a parent: not ours
    assert Watchdog().interval_s == 0
