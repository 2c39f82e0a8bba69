"""systemd's runtime side: sd_notify over $NOTIFY_SOCKET and a health-checked watchdog.

    notifier = Notifier.from_env(); notifier.ready("3 models loaded")
    Watchdog(notifier, check=server_answers).start()

Everything here is a no-op when the process was not started by systemd (no $NOTIFY_SOCKET), so the server
calls it unconditionally. Only the standard library is used: the notify protocol is one datagram per message.
The unit files and their installer are in edge_server/install.py.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

_SEND_TIMEOUT = 1.0


class Notifier:
    """Sends sd_notify(3) messages to the socket systemd passed in $NOTIFY_SOCKET."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(_notify_address(env.get("NOTIFY_SOCKET", "")), _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout systemd set (sd_watchdog_enabled(3))."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, message: str | None = None, /, **fields: object) -> bool:
        """Send a raw message and/or KEY=value fields in one datagram; True when it was delivered."""
        if self._address is None:
            return False
        lines = [] if message is None else [message.rstrip("\n")]
        lines += [f"{key.upper()}={_one_line(value)}" for key, value in fields.items()]
        payload = "\n".join(lines).encode()
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # A receiver that stops reading must not hang the caller (the watchdog thread, a reload).
                    self._sock.settimeout(_SEND_TIMEOUT)
                self._sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1") if status is None else self.notify("READY=1", status=status)

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) matches RELOADING=1 to the reload request by this timestamp;
        # older versions ignore the extra field.
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", monotonic_usec=monotonic_usec)

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _notify_address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value:
        log.debug("NOTIFY_SOCKET %r is not a unix socket address; not notifying", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were forked or exec'd by the real service process)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _one_line(value: object) -> str:
    return " ".join(str(value).splitlines())


class Watchdog:
    """A daemon thread that pings WATCHDOG=1 only while `check()` says the server is healthy.

    When the check fails (or raises) the ping is skipped, so systemd restarts a server that hangs instead of
    one that merely keeps a timer thread alive.
    """

    def __init__(self, notifier: Notifier, check: Callable[[], bool], interval: float | None = None) -> None:
        self._notifier = notifier
        self._check = check
        self._interval = notifier.watchdog_interval if interval is None else interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self._notifier.enabled and self._interval is not None and self._interval > 0

    def start(self) -> Watchdog:
        if self.enabled and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        assert self._interval is not None
        while not self._stop.wait(self._interval):
            if self._healthy():
                self._notifier.watchdog()

    def _healthy(self) -> bool:
        try:
            if self._check():
                return True
            log.warning("watchdog: health check failed; not pinging systemd")
        except Exception:
            log.warning("watchdog: health check raised; not pinging systemd", exc_info=True)
        return False
