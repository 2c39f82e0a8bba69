"""sd_notify and the watchdog against a real AF_UNIX datagram socket that plays systemd's part.

    with NotifySocket.bound(tmp_path) as sd: Notifier.from_env({"NOTIFY_SOCKET": sd.address}).ready()
    assert sd.receive() == {"READY": "1"}
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_server.sd_notify import Notifier, Watchdog


class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET: one datagram per sd_notify message, parsed into fields."""

    def __init__(self, address: str) -> None:
        self.address = address  # as it appears in $NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive(self, timeout: float = 5.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def pending(self) -> list[dict[str, str]]:
        messages = []
        while True:
            try:
                messages.append(self.receive(timeout=0.01))
            except TimeoutError:
                return messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    address = str(tmp_path / "notify") if request.param == "path" else f"@edgecow-test-{uuid.uuid4().hex}"
    sd = NotifySocket(address)
    yield sd
    sd.close()


def test_lifecycle_messages_reach_systemd(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.enabled

    assert notifier.ready("2 models loaded")
    assert notify_socket.receive() == {"READY": "1", "STATUS": "2 models loaded"}

    notifier.status("serving 2 models,\n3 regions")
    assert notify_socket.receive() == {"STATUS": "serving 2 models, 3 regions"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    message = notify_socket.receive()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after

    notifier.ready()
    assert notify_socket.receive() == {"READY": "1"}

    notifier.stopping()
    assert notify_socket.receive() == {"STOPPING": "1"}

    notifier.watchdog()
    assert notify_socket.receive() == {"WATCHDOG": "1"}
    notifier.close()


def test_raw_message_and_fields_share_one_datagram(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    notifier.notify("READY=1", status="up", mainpid=os.getpid())
    assert notify_socket.receive() == {"READY": "1", "STATUS": "up", "MAINPID": str(os.getpid())}
    assert notify_socket.pending() == []


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready("x") is False
    assert notifier.stopping() is False
    watchdog = Watchdog(notifier, check=lambda: True, interval=0.01).start()
    assert not watchdog.enabled
    watchdog.stop()


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    sd = NotifySocket(str(tmp_path / "notify"))
    notifier = Notifier.from_env({"NOTIFY_SOCKET": sd.address})
    sd.close()
    os.unlink(sd.address)
    assert notifier.ready() is False
    assert notifier.watchdog() is False


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(env: dict[str, str], interval: float | None) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/nowhere", **env})
    assert notifier.watchdog_interval == interval


def test_watchdog_pings_only_while_the_check_passes(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "40000"})
    assert notifier.watchdog_interval == pytest.approx(0.02)
    healthy = threading.Event()
    healthy.set()
    checks = []

    def check() -> bool:
        ok = healthy.is_set()
        checks.append(ok)
        return ok

    def failed_checks(at_least: int) -> bool:
        deadline = time.monotonic() + 5
        while checks.count(False) < at_least and time.monotonic() < deadline:
            time.sleep(0.01)
        return checks.count(False) >= at_least

    watchdog = Watchdog(notifier, check).start()
    try:
        assert notify_socket.receive() == {"WATCHDOG": "1"}
        assert notify_socket.receive() == {"WATCHDOG": "1"}

        healthy.clear()
        # The thread checks, then pings, then waits: once a failed check is seen, every ping from a passing
        # check is already in the socket.
        assert failed_checks(1)
        notify_socket.pending()
        assert failed_checks(6), "the check stopped running while it failed"
        assert notify_socket.pending() == []

        healthy.set()
        assert notify_socket.receive() == {"WATCHDOG": "1"}
    finally:
        watchdog.stop()


def test_a_check_that_raises_counts_as_unhealthy(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "40000"})
    calls = threading.Semaphore(0)

    def check() -> bool:
        calls.release()
        raise ConnectionError("server does not answer")

    watchdog = Watchdog(notifier, check).start()
    try:
        for _ in range(3):
            assert calls.acquire(timeout=5)
        assert notify_socket.pending() == []
    finally:
        watchdog.stop()
