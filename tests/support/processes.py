"""Child processes the tests start: an edgecow server on a temporary socket, its output collected by a thread.

    with ServerProcess(repo, tmp_path) as server:            # or .start() ... .stop()
        EdgeClient(server.unix_target).infer("scale", {"x": x})
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTEN_PATTERN = re.compile(r"listening on (\S+)")
_C = TypeVar("_C", bound="ChildProcess")


class ChildProcess:
    """A command whose output a thread collects line by line; ready once a line contains `ready_marker`
    (or once its output ends: a process that dies at start is reported by `alive()`, not by `start()`)."""

    ready_marker = "ready"

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, notify: Path | None = None) -> None:
        self.cmd = cmd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if "NOTIFY_SOCKET" not in (env or {}):
            self.env.pop("NOTIFY_SOCKET", None)
        self.notify = notify  # with it, ready means READY=1 on this NOTIFY_SOCKET, as systemd would see it
        if notify is not None:
            self.env["NOTIFY_SOCKET"] = str(notify)
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.ready_after = 0.0  # seconds from spawning the process to ready
        self._ready = threading.Event()

    def start(self: _C, timeout: float = 60.0) -> _C:
        """Start the command and wait until it is ready; again after it has stopped, a new process."""
        if self.alive():
            raise RuntimeError(f"{self.cmd[1:4]} is already running; stop it before starting it again")
        self._ready = threading.Event()  # a restart waits for its own ready line, not the last one's
        self._restarting()
        listener = self._bind_notify()
        began = time.perf_counter()
        try:
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            threading.Thread(target=self._pump, args=(self.proc, self._ready), daemon=True).start()
            ready = self._ready.wait(timeout) if listener is None else self._wait_notify(listener, timeout)
        finally:
            if listener is not None:
                listener.close()
        self.ready_after = time.perf_counter() - began
        if not ready:
            self.kill()
            raise RuntimeError(f"{self.cmd[1:4]} did not become ready in {timeout}s:\n{self.log}")
        return self

    def _bind_notify(self) -> socket.socket | None:
        if self.notify is None:
            return None
        self.notify.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(self.notify))
        return listener

    def _wait_notify(self, listener: socket.socket, timeout: float) -> bool:
        """True once READY=1 arrives; False when the process exits first or `timeout` passes."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        listener.settimeout(0.1)
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                message = listener.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in message.split(b"\n"):
                return True
        return False

    def _pump(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._line(line)
            if self.ready_marker in line:
                ready.set()
        ready.set()

    def _line(self, line: str) -> None:
        """Called for every output line before the ready check; subclasses pick out what they need."""

    def _restarting(self) -> None:
        """Called before each start; subclasses forget what the previous process told them."""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; a process still there after `timeout` is killed and TimeoutExpired raised."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self: _C) -> _C:
        return self if self.alive() else self.start()  # `with proc.start():` starts it once

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EdgecowProcess(ChildProcess):
    """An edgecow server started with `cmd`, serving on `socket`; it learns its listeners from its log."""

    ready_marker = "ready: "

    def __init__(self, cmd: list[str], socket_path: Path, env: dict[str, str] | None = None,
                 notify: Path | None = None) -> None:
        self.socket = socket_path
        self.listeners: list[str] = []
        super().__init__(cmd, env=env, notify=notify)

    def _restarting(self) -> None:
        self.listeners = []

    def _line(self, line: str) -> None:
        match = LISTEN_PATTERN.search(line)
        if match:
            self.listeners.append(match.group(1))

    @property
    def unix_target(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_target(self) -> str:
        return next(addr for addr in self.listeners if not addr.startswith("unix:"))

    @property
    def lane_path(self) -> Path:
        """The local lane's socket, beside the gRPC one."""
        return self.socket.with_name(f"{self.socket.stem}-lane.sock")


class ServerProcess(EdgecowProcess):
    """`python -m edge_server serve` on workdir/edgecow.sock and a free loopback port."""

    def __init__(self, repo: Path, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.repo = Path(repo)
        self.args = list(args)
        socket_path = Path(workdir) / "edgecow.sock"
        super().__init__(
            [sys.executable, "-m", "edge_server", "serve", "--model-repository", str(self.repo),
             "--socket", str(socket_path), "--listen", "127.0.0.1:0", *self.args],
            socket_path, env=env,
        )


def serving(repository: Path, workdir: Path, *args: str) -> Iterator[ServerProcess]:
    """A module fixture's body: a server on `repository`, which must still be alive when the module is done.

        @pytest.fixture(scope="module")
        def server(repo, tmp_path_factory): yield from serving(repo, tmp_path_factory.mktemp("srv"))
    """
    proc = ServerProcess(repository, workdir, *args).start()
    yield proc
    assert proc.alive(), "the server died during the module's tests"
    proc.stop()
