"""Child processes the tests start: an edgecow server on a temporary socket, its output collected by a thread.

    with ServerProcess(repo, tmp_path) as server:            # or .start() ... .stop()
        EdgeClient(server.unix_target).infer("scale", {"x": x})
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTEN_PATTERN = re.compile(r"listening on (\S+)")


class ChildProcess:
    """A command whose output a thread collects line by line; ready once a line contains `ready_marker`
    (or once its output ends: a process that dies at start is reported by `alive()`, not by `start()`)."""

    ready_marker = "ready"

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if "NOTIFY_SOCKET" not in (env or {}):
            self.env.pop("NOTIFY_SOCKET", None)
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = 60.0) -> ChildProcess:
        """Start the command and wait until it is ready; again after it has stopped, a new process."""
        if self.alive():
            raise RuntimeError(f"{self.cmd[1:4]} is already running; stop it before starting it again")
        self._ready = threading.Event()  # a restart waits for its own ready line, not the last one's
        self._restarting()
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._pump, args=(self.proc, self._ready), daemon=True).start()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError(f"{self.cmd[1:4]} did not become ready in {timeout}s:\n{self.log}")
        return self

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

    def __enter__(self) -> ChildProcess:
        return self if self.alive() else self.start()  # `with proc.start():` starts it once

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess(ChildProcess):
    """`python -m edge_server serve` on workdir/edgecow.sock and a free loopback port."""

    ready_marker = "ready: "

    def __init__(self, repo: Path, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.repo = Path(repo)
        self.socket = Path(workdir) / "edgecow.sock"
        self.args = list(args)
        self.listeners: list[str] = []
        super().__init__(
            [sys.executable, "-m", "edge_server", "serve", "--model-repository", str(self.repo),
             "--socket", str(self.socket), "--listen", "127.0.0.1:0", *self.args],
            env=env,
        )

    def start(self, timeout: float = 60.0) -> ServerProcess:
        super().start(timeout)
        return self

    def __enter__(self) -> ServerProcess:
        return self if self.alive() else self.start()  # `with server.start():` starts it once

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


def serving(repository: Path, workdir: Path, *args: str) -> Iterator[ServerProcess]:
    """A module fixture's body: a server on `repository`, which must still be alive when the module is done.

        @pytest.fixture(scope="module")
        def server(repo, tmp_path_factory): yield from serving(repo, tmp_path_factory.mktemp("srv"))
    """
    proc = ServerProcess(repository, workdir, *args).start()
    yield proc
    assert proc.alive(), "the server died during the module's tests"
    proc.stop()
