"""Processes the bench starts: an edgecow server on a temp socket (+ loopback port) and the echo server.

    with EdgeServer(workdir, repo) as server:          # repo=None: the packaged example repository
        EdgeClient(server.unix_target, transport="grpc").infer(...)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import models  # the tests' ONNX builders (tests/models.py)

REPO_ROOT = Path(__file__).resolve().parent.parent

LISTEN_PATTERN = re.compile(r"listening on (\S+)")


def build_repository(root: Path) -> Path:
    """y = x*1 (`scale`, FP32[n]) plus the models the soak mixes in."""
    models.write_model(root, "scale", 1, models.scale_model(factor=1.0))
    models.write_model(root, "double", 1, models.scale_model(factor=2.0))
    models.write_model(root, "identity", 1, models.identity_model())
    models.write_model(root, "add_sub", 1, models.add_sub_model())
    return root


def scale_model_bytes() -> bytes:
    return models.scale_model(factor=1.0).SerializeToString()


class _Child:
    """A child process whose output is pumped on a thread; ready when `ready_marker` appears."""

    ready_marker = "ready"

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("NOTIFY_SOCKET", None)
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = 60.0) -> _Child:
        self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"{self.cmd[2:4]} did not become ready:\n" + "\n".join(self.lines[-30:]))
        return self

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
        return psutil.Process(self.pid).memory_info().rss

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> _Child:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EdgeServer(_Child):
    """`python -m edge_server serve` on workdir/edgecow.sock and a free loopback port."""

    ready_marker = "ready: "

    def __init__(self, workdir: Path, repo: Path | None, *args: str) -> None:
        self.socket = Path(workdir) / "edgecow.sock"
        self.listeners: list[str] = []
        repo_args = ["--model-repository", str(repo)] if repo is not None else []
        super().__init__([sys.executable, "-m", "edge_server", "serve", *repo_args,
                          "--socket", str(self.socket), "--listen", "127.0.0.1:0", *args])

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
    return np.random.default_rng(seed).standard_normal(max(nbytes // 4, 1)).astype(np.float32)
