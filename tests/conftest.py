"""Shared fixtures: a model repository built with onnx.helper and a real server process.

    def test_x(server): EdgeClient(server.unix_target).infer("scale", {"x": np.ones(4, np.float32)})
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from onnx import TensorProto

from shm_client.shared.segments import Segment

sys.path.insert(0, str(Path(__file__).parent))

import models

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_PATTERN = re.compile(r"ready: ")
LISTEN_PATTERN = re.compile(r"listening on (\S+)")


class ServerProcess:
    """`python -m edge_server serve` on a temporary unix socket and a free loopback port."""

    def __init__(self, repo: Path, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.repo = Path(repo)
        self.socket = Path(workdir) / "edgecow.sock"
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if "NOTIFY_SOCKET" not in (env or {}):
            self.env.pop("NOTIFY_SOCKET", None)
        self.lines: list[str] = []
        self.listeners: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    @property
    def unix_target(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_target(self) -> str:
        return next(addr for addr in self.listeners if not addr.startswith("unix:"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def start(self, timeout: float = 60.0) -> ServerProcess:
        cmd = [
            sys.executable, "-m", "edge_server", "serve",
            "--model-repository", str(self.repo),
            "--socket", str(self.socket),
            "--listen", "127.0.0.1:0",
            *self.args,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError(f"server did not become ready in {timeout}s:\n{self.log}")
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            match = LISTEN_PATTERN.search(line)
            if match:
                self.listeners.append(match.group(1))
            if READY_PATTERN.search(line):
                self._ready.set()
        self._ready.set()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
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


def build_repository(root: Path) -> Path:
    """The repository most tests share: every datatype the tests need, two versions of `scale`."""
    models.write_model(root, "scale", 1, models.scale_model(factor=1.0))
    models.write_model(root, "scale", 2, models.scale_model(factor=2.0), config='version_policy = "all"\n')
    models.write_model(root, "add_sub", 1, models.add_sub_model())
    models.write_model(root, "add_sub_int32", 1, models.add_sub_model(TensorProto.INT32))
    models.write_model(root, "mixed", 1, models.mixed_model())
    models.write_model(root, "strings", 1, models.string_model())
    models.write_model(root, "slow", 1, models.slow_model())
    models.write_model(root, "gate", 1, models.gate_model())
    for dtype in ("FLOAT", "DOUBLE", "FLOAT16", "BOOL", "INT8", "INT16", "INT32", "INT64",
                  "UINT8", "UINT16", "UINT32", "UINT64", "STRING"):
        models.write_model(root, f"identity_{dtype.lower()}", 1, models.identity_model(getattr(TensorProto, dtype)))
    models.write_model(root, "static", 1, models.scale_model(shape=[4, 256], factor=3.0))
    return root


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo") / "models")


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(model_repo, tmp_path_factory.mktemp("srv")).start()
    yield proc
    proc.stop()


@pytest.fixture
def wait_until():
    """Poll `predicate` until it is true or `timeout` passes; returns its last value."""

    def _wait(predicate, timeout: float = 10.0, interval: float = 0.05):
        deadline = time.monotonic() + timeout
        value = predicate()
        while not value and time.monotonic() < deadline:
            time.sleep(interval)
            value = predicate()
        return value

    return _wait


def random_array(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """Deterministic test data for any numpy dtype name, including bool and object (bytes)."""
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype == "object":
        flat = np.array([f"item-{i}-é".encode() for i in range(int(np.prod(shape)))], dtype=object)
        return flat.reshape(shape)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, dtype=dtype)


@contextlib.contextmanager
def owned_segments(prefix: str) -> Iterator[Callable[..., Segment]]:
    """`make(suffix, size, fill=b"")` creates the segment `prefix + suffix`; all are closed and unlinked
    when the block ends (each test suite passes its own prefix, so its leak checks see only its own)."""
    made: list[Segment] = []

    def make(suffix: str, size: int, fill: bytes = b"") -> Segment:
        segment = Segment.create(prefix + suffix, size)
        made.append(segment)
        if fill:
            segment.write(fill)
        return segment

    try:
        yield make
    finally:
        for segment in made:
            segment.close()
            segment.unlink()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and its key, as PEM files in `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
