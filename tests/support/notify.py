"""systemd's side of $NOTIFY_SOCKET: every sd_notify datagram a server sends, in order.

    sd = NotifyListener(tmp_path / "notify")
    server = ServerProcess(repo, tmp_path, env=sd.env(watchdog_usec=400_000)).start()
    assert sd.wait_for("READY") and sd.wait_for_pings(3)
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

Predicate = Callable[[list[dict[str, str]]], bool]
FLAGS = ("READY", "RELOADING", "STOPPING", "WATCHDOG")


class NotifyListener:
    """Collects every message as a dict of fields.

    `on_ready` runs in the listener thread the moment a READY=1 arrives, before anything else is read, so
    it sees the server exactly as systemd would when it declares the service started.
    """

    def __init__(self, path: Path, on_ready: Callable[[], object] | None = None) -> None:
        self.path = path
        self.on_ready = on_ready
        self.ready_results: list[object] = []
        self.messages: list[dict[str, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        """The environment a server needs to talk to this listener (and to be watched, if asked)."""
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if message.get("READY") == "1" and self.on_ready is not None:
                self.ready_results.append(self.on_ready())
            with self._changed:
                self.messages.append(message)
                self._changed.notify_all()

    def keys(self) -> list[str]:
        """Which flag each message carried, in order: READY, WATCHDOG, RELOADING, STOPPING or STATUS."""
        with self._changed:
            return [next((f for f in FLAGS if m.get(f) == "1"), "STATUS" if "STATUS" in m else "?")
                    for m in self.messages]

    @property
    def pings(self) -> int:
        with self._changed:
            return sum(m.get("WATCHDOG") == "1" for m in self.messages)

    def wait_for(self, predicate: Predicate | str, timeout: float = 30.0) -> bool:
        """Wait until `predicate(messages)` holds; a string waits for a message with that flag set to 1."""
        if isinstance(predicate, str):
            flag = predicate
            predicate = lambda messages: any(m.get(flag) == "1" for m in messages)  # noqa: E731
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self.messages)), timeout)

    def wait_for_pings(self, count: int, timeout: float = 15.0) -> bool:
        """Wait until `count` more WATCHDOG=1 than now have arrived."""
        target = self.pings + count
        return self.wait_for(lambda messages: sum(m.get("WATCHDOG") == "1" for m in messages) >= target, timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()
