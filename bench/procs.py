"""Processes the bench starts: an edgecow server on a temp socket (+ loopback port) and the echo server.

    with EdgeServer(workdir, repo) as server:          # repo=None: the packaged example repository
        EdgeClient(server.unix_target, transport="grpc").infer(...)
"""

from __future__ import annotations

import atexit
import os
import re
import sys
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
import psutil

from edge_server.runtime import ModelOptions, resolve_providers, session_options_for
from tests.support import models  # the tests' ONNX builders
from tests.support.processes import ChildProcess, EdgecowProcess

_C = TypeVar("_C", bound="_Tracked")


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
    return ort.InferenceSession(source, session_options_for(ModelOptions()), providers=server_providers())


class _Tracked(ChildProcess):
    """What the bench adds to the tests' launcher: started once (`with child.start():` leaves no second
    process), stopped when the bench exits however it exits, a child that dies at start is an error, and
    its memory and CPU time can be read."""

    def start(self: _C, timeout: float = 60.0) -> _C:
        if self.proc is not None:
            return self
        _RUNNING.add(self)
        try:
            super().start(timeout)
        except BaseException:
            self.stop()
            raise
        if not self.alive():
            self.stop()
            command = " ".join([Path(self.cmd[0]).name, *self.cmd[1:4]])
            raise RuntimeError(f"{command} did not become ready:\n" + "\n".join(self.lines[-30:]))
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        _RUNNING.discard(self)
        return super().stop(timeout)

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        """User + system CPU time of every thread so far, from /proc/<pid>/stat (utime, stime)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_RUNNING: set[_Tracked] = set()


@atexit.register
def _stop_running() -> None:
    for child in list(_RUNNING):
        child.stop()


def edgecow_command() -> list[str]:
    """The `edgecow` console script of this environment, or `python -m edge_server` where there is none."""
    script = Path(sys.executable).parent / "edgecow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge_server"]


class EdgeServer(_Tracked, EdgecowProcess):
    """`python -m edge_server serve` on workdir/edgecow.sock and a free loopback port.

    `console=True` runs the `edgecow` script instead (what a user types); `notify=True` waits for READY=1 on
    workdir/notify.sock rather than for the log line.
    """

    def __init__(self, workdir: Path, repo: Path | None, *args: str, console: bool = False,
                 notify: bool = False) -> None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        socket_path = workdir / "edgecow.sock"
        repo_args = ["--model-repository", str(repo)] if repo is not None else []
        program = edgecow_command() if console else [sys.executable, "-m", "edge_server"]
        # Every listener on a free port, so that the bench's servers never clash with another server on the
        # box; given as a variable, which a server without that setting ignores.
        env = {"EDGECOW_METRICS_LISTEN": os.environ.get("EDGECOW_METRICS_LISTEN", "127.0.0.1:0")}
        super().__init__([*program, "serve", *repo_args, "--socket", str(socket_path), "--listen", "127.0.0.1:0",
                          *args], socket_path, env=env, notify=workdir / "notify.sock" if notify else None)


class EchoServer(_Tracked):
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
