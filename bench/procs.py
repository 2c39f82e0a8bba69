"""Processes the bench starts: an edgecow server on a temp socket (+ loopback port) and the echo server.

    with EdgeServer(workdir, repo) as server:          # repo=None: the packaged example repository
        EdgeClient(server.unix_target, transport="grpc").infer(...)
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
import psutil

from edge_server.runtime import resolve_providers
from tests.support import models  # the tests' ONNX builders

REPO_ROOT = Path(__file__).resolve().parent.parent

LISTEN_PATTERN = re.compile(r"listening on (\S+)")
_C = TypeVar("_C", bound="_Child")


def build_repository(root: Path) -> Path:
    """y = x*1 (`scale`, FP32[n]) plus the models the soak mixes in."""
    models.write_model(root, "scale", 1, models.scale_model(factor=1.0))
    models.write_model(root, "double", 1, models.scale_model(factor=2.0))
    models.write_model(root, "identity", 1, models.identity_model())
    models.write_model(root, "add_sub", 1, models.add_sub_model())
    return root


def scale_model_bytes() -> bytes:
    data: bytes = models.scale_model(factor=1.0).SerializeToString()
    return data


def server_providers() -> list[str]:
    """The execution providers a server with default settings asks for here (CUDA only where it can start),
    so that in-process baselines run where the server's sessions run."""
    return resolve_providers(("auto",), require_gpu=False)


def in_process_session(model: bytes | Path | None = None) -> ort.InferenceSession:
    """A model (default: y = x*1) in this process, with the server's default session options and providers."""
    source = scale_model_bytes() if model is None else model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, providers=server_providers())


class _Child:
    """A child process whose output is pumped on a thread; ready when `ready_marker` appears, or, with
    `notify`, when READY=1 arrives on that NOTIFY_SOCKET (the datagram socket systemd would own).

    Started once: `start()` on a running child returns it as it is, so `with child.start():` does not leave
    a second process behind. Every child still running when the bench exits is stopped (atexit).
    """

    ready_marker = "ready"

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, notify: Path | None = None) -> None:
        self.cmd = cmd
        inherited = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.notify = notify
        if notify is not None:
            self.env["NOTIFY_SOCKET"] = str(notify)
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.ready_after = 0.0  # seconds from spawning the process to ready
        self._ready = threading.Event()

    def start(self: _C, timeout: float = 60.0) -> _C:
        if self.proc is not None:
            return self
        listener = self._bind_notify()
        began = time.perf_counter()
        try:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
            _RUNNING.add(self)
            threading.Thread(target=self._pump, daemon=True).start()
            ready = self._wait_notify(listener, timeout) if listener else self._ready.wait(timeout)
            self.ready_after = time.perf_counter() - began
        except BaseException:
            self.stop()
            raise
        finally:
            if listener is not None:
                listener.close()
        if not ready or self.proc.poll() is not None:
            self.stop()
            command = " ".join([Path(self.cmd[0]).name, *self.cmd[1:4]])
            raise RuntimeError(f"{command} did not become ready:\n" + "\n".join(self.lines[-30:]))
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

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._line(self.lines[-1])
            if self.ready_marker in line:
                self._ready.set()
        self._ready.set()

    def _line(self, line: str) -> None:
        pass

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        """User + system CPU time of every thread so far, from /proc/<pid>/stat (utime, stime)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 30.0) -> None:
        _RUNNING.discard(self)
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self: _C) -> _C:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_RUNNING: set[_Child] = set()


@atexit.register
def _stop_running() -> None:
    for child in list(_RUNNING):
        child.stop()


def edgecow_command() -> list[str]:
    """The `edgecow` console script of this environment, or `python -m edge_server` where there is none."""
    script = Path(sys.executable).parent / "edgecow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge_server"]


class EdgeServer(_Child):
    """`python -m edge_server serve` on workdir/edgecow.sock and a free loopback port.

    `console=True` runs the `edgecow` script instead (what a user types); `notify=True` waits for READY=1 on
    workdir/notify.sock rather than for the log line.
    """

    ready_marker = "ready: "

    def __init__(self, workdir: Path, repo: Path | None, *args: str, console: bool = False,
                 notify: bool = False) -> None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "edgecow.sock"
        self.listeners: list[str] = []
        repo_args = ["--model-repository", str(repo)] if repo is not None else []
        program = edgecow_command() if console else [sys.executable, "-m", "edge_server"]
        # Every listener on a free port, so that the bench's servers never clash with another server on the
        # box; given as a variable, which a server without that setting ignores.
        env = {"EDGECOW_METRICS_LISTEN": os.environ.get("EDGECOW_METRICS_LISTEN", "127.0.0.1:0")}
        super().__init__([*program, "serve", *repo_args, "--socket", str(self.socket), "--listen", "127.0.0.1:0",
                          *args], env=env, notify=workdir / "notify.sock" if notify else None)

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


class EchoServer(_Child):
    def __init__(self, workdir: Path) -> None:
        self.socket = Path(workdir) / "echo.sock"
        super().__init__([sys.executable, "-m", "bench.echo", "--socket", str(self.socket)])

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"


_OWNED = re.compile(r"^edgecow-(?:cli|srv)-(\d+)-")


def dev_shm_entries(pids: set[int] | None = None) -> list[str]:
    """/dev/shm names; with `pids`, only edgecow segments those processes created (the box is shared)."""
    try:
        names = sorted(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return []
    if pids is None:
        return names
    return [n for n in names if (m := _OWNED.match(n)) and int(m.group(1)) in pids]


def payload(nbytes: int, seed: int = 0) -> np.ndarray:
    """FP32 values in [-1, 1), `nbytes` of them (uniform: ten times quicker to make than normal at 64 MB)."""
    values = np.random.default_rng(seed).random(max(nbytes // 4, 1), dtype=np.float32)
    values *= 2
    values -= 1
    return values
