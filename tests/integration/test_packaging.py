"""edgecow as a user installs it: a wheel built from the source tree, installed into a fresh virtual environment.

    pytest -m slow tests/integration/test_packaging.py   # a wheel build and two pip installs from the index

One environment serves the whole module, and the tests use it in file order: first the client alone (the base
install, at the grpcio and protobuf floors), which must infer against a real server started from the project's
environment and must refuse server commands in one line; then `pip install 'edgecow[server]'` from the same
wheel, after which that environment serves the bundled models itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shm_client.shared._proto import edgecow_pb2_grpc, inference_pb2_grpc
from tests.support.processes import REPO_ROOT, ServerProcess

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py

SYSTEMD_DIR = REPO_ROOT / "systemd"
PIP_TIMEOUT = 600.0  # seconds one pip command may take; the [server] extra downloads onnxruntime
SERVE_TIMEOUT = 120.0  # seconds the installed server may take to send READY=1
# Not part of a build: outputs, caches and virtual environments (a venv is recognised by its pyvenv.cfg).
NOT_SOURCE = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
SERVER_HINT = "pip install 'edgecow[server]'"

# Run by the environment's python: one call per target, and what the client process ended up importing.
CLIENT_SCRIPT = """
import json, sys
import grpc
import numpy as np
from google.protobuf import __version__ as protobuf_version
from shm_client import EdgeClient

model, targets = sys.argv[1], sys.argv[2:]
report = {"grpcio": grpc.__version__, "protobuf": protobuf_version, "calls": {}}
for target in targets:
    with EdgeClient(target) as client:
        y = client.infer(model, {"x": np.arange(8, dtype=np.float32)})["y"]
        report["calls"][target] = {"transport": client.transport, "y": y.tolist()}
report["onnxruntime_imported"] = "onnxruntime" in sys.modules
print(json.dumps(report))
"""


def dependency_floor(name: str) -> str:
    """The version after `>=` in pyproject's base dependency on `name`."""
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in dependencies:
        match = re.match(rf"{re.escape(name)}\s*>=\s*([0-9][0-9.]*)", requirement)
        if match:
            return match.group(1)
    raise AssertionError(f"pyproject.toml has no '{name}>=' dependency")


def generated_protobuf_versions() -> set[str]:
    proto_dir = Path(inference_pb2_grpc.__file__).parent
    return {
        match.group(1)
        for path in proto_dir.glob("*_pb2.py")
        if (match := re.search(r"^# Protobuf Python Version: (\S+)$", path.read_text(), re.M))
    }


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would point a child at the project's own environment."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NOTIFY_SOCKET"}
    env = {key: value for key, value in os.environ.items() if key not in dropped and not key.startswith("EDGECOW_")}
    return {**env, **extra}


@dataclass(frozen=True)
class Venv:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def run(self, program: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        # The working directory is the venv itself, so `python -c` cannot import the source tree instead.
        return subprocess.run([str(self.root / "bin" / program), *args], cwd=self.root, env=clean_env(),
                              capture_output=True, text=True, timeout=timeout)

    def pip_install(self, *requirements: str) -> None:
        # This environment's pip installs into the venv (`--python`), which so needs no pip of its own;
        # nothing is byte-compiled ahead (the few modules the tests import are compiled as they load).
        result = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(self.python), "install", "--quiet",
             "--disable-pip-version-check", "--no-compile", *requirements],
            cwd=self.root, env=clean_env(), capture_output=True, text=True, timeout=PIP_TIMEOUT,
        )
        assert result.returncode == 0, result.stderr


def not_source(directory: str, names: list[str]) -> set[str]:
    return {
        name for name in names
        if name in NOT_SOURCE or name.endswith((".egg-info", ".so", ".pyc"))
        or Path(directory, name, "pyvenv.cfg").exists()
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the tree: pip builds in place, and the tree is shared with other runs."""
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO_ROOT, work / "source", ignore=not_source, symlinks=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--wheel-dir", str(work / "dist"), str(work / "source")],
        env=clean_env(), capture_output=True, text=True, timeout=PIP_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    (built,) = (work / "dist").glob("edgecow-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh environment holding the wheel without extras, with grpcio and protobuf at their floors."""
    env = Venv(tmp_path_factory.mktemp("venv") / "env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env.root)], check=True, env=clean_env(),
                   timeout=120)
    env.pip_install(str(wheel), f"grpcio=={dependency_floor('grpcio')}", f"protobuf=={dependency_floor('protobuf')}")
    return env


@pytest.fixture(scope="module")
def server_venv(venv: Venv, wheel: Path) -> Venv:
    venv.pip_install(f"{wheel}[server]")
    return venv


def test_the_client_floors_are_the_versions_the_generated_code_accepts() -> None:
    # The generated modules refuse an older runtime at import, so a lower floor would install a client
    # that cannot start, and a higher one would turn away runtimes that work.
    assert {inference_pb2_grpc.GRPC_GENERATED_VERSION, edgecow_pb2_grpc.GRPC_GENERATED_VERSION} == {
        dependency_floor("grpcio")
    }
    assert generated_protobuf_versions() == {dependency_floor("protobuf")}


@pytest.mark.slow
def test_the_wheel_carries_the_systemd_files(wheel: Path) -> None:
    sources = sorted(path for path in SYSTEMD_DIR.iterdir() if path.is_file())
    assert [path.name for path in sources] == ["edgecow.service", "gpu.conf", "sysusers.conf", "tmpfiles.conf"]
    with zipfile.ZipFile(wheel) as archive:
        for path in sources:
            assert archive.read(f"edge_server/units/{path.name}") == path.read_bytes()


@pytest.mark.slow
def test_the_client_alone_infers_against_a_real_server(venv: Venv, server: ServerProcess) -> None:
    no_runtime = venv.run("python", "-c", "import onnxruntime")
    assert no_runtime.returncode != 0
    assert "No module named 'onnxruntime'" in no_runtime.stderr

    result = venv.run("python", "-c", CLIENT_SCRIPT, "scale", server.unix_target, server.tcp_target)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["grpcio"] == dependency_floor("grpcio")
    assert report["protobuf"] == dependency_floor("protobuf")
    assert not report["onnxruntime_imported"]
    expected = (np.arange(8, dtype=np.float32) * 2).tolist()  # scale's highest version doubles
    assert report["calls"] == {
        server.unix_target: {"transport": "shm", "y": expected},
        server.tcp_target: {"transport": "grpc", "y": expected},
    }

    listing = venv.run("edgecow", "models", "list", "--target", server.unix_target)
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"^scale\s+v2\s+READY", listing.stdout, re.M)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--socket", "none", "--listen", "127.0.0.1:0"],
        ["models", "import", str(REPO_ROOT / "edge_server/examples/models/identity/1/model.onnx"), "--name", "x",
         "--model-repository", "imported"],
        ["models", "list", "--model-repository", str(REPO_ROOT / "edge_server/examples/models")],
    ],
    ids=["serve", "models-import", "models-list-offline"],
)
def test_server_commands_without_the_server_extra_say_what_to_install(venv: Venv, command: list[str]) -> None:
    result = venv.run("edgecow", *command)

    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("edgecow: error: ") and line.endswith(SERVER_HINT)


@pytest.mark.slow
def test_install_systemd_from_the_wheel_writes_the_shipped_units(venv: Venv, tmp_path: Path) -> None:
    # --force: the test's venv lives under /tmp, which the unit hides (a real install is refused there).
    result = venv.run("edgecow", "install-systemd", "--root", str(tmp_path), "--gpu", "--force")
    assert result.returncode == 0, result.stderr

    exec_start = f"{venv.python} -m edge_server serve --config /etc/edgecow/edgecow.toml"
    unit = (SYSTEMD_DIR / "edgecow.service").read_text().replace("@EXEC_START@", exec_start)
    assert (tmp_path / "etc/systemd/system/edgecow.service").read_text() == unit
    for installed, shipped in [
        ("etc/systemd/system/edgecow.service.d/gpu.conf", "gpu.conf"),
        ("etc/sysusers.d/edgecow.conf", "sysusers.conf"),
        ("etc/tmpfiles.d/edgecow.conf", "tmpfiles.conf"),
    ]:
        assert (tmp_path / installed).read_text() == (SYSTEMD_DIR / shipped).read_text()


def notified_ready(notify: socket.socket, server: subprocess.Popen[str], timeout: float) -> bool:
    """Reads sd_notify datagrams until READY=1; False when the server exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    notify.settimeout(0.5)  # how often the loop looks at whether the server is still running
    while server.poll() is None and time.monotonic() < deadline:
        try:
            message = notify.recv(4096).decode()
        except TimeoutError:
            continue
        if "READY=1" in message.splitlines():
            return True
    return False


def stop(server: subprocess.Popen[str]) -> int:
    """SIGTERM, as systemd stops the service; SIGKILL if the drain does not end."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        raise


@pytest.mark.slow
def test_the_server_extra_serves_the_bundled_models(server_venv: Venv, tmp_path: Path) -> None:
    target = f"unix://{tmp_path / 'edgecow.sock'}"
    log_path = tmp_path / "serve.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, log_path.open("w") as log:
        notify.bind(str(tmp_path / "notify"))
        server = subprocess.Popen(
            [str(server_venv.root / "bin" / "edgecow"), "serve", "--socket", str(tmp_path / "edgecow.sock"),
             "--listen", "127.0.0.1:0"],
            cwd=server_venv.root, env=clean_env(NOTIFY_SOCKET=str(tmp_path / "notify")), stdout=log,
            stderr=subprocess.STDOUT, text=True,
        )
        try:
            assert notified_ready(notify, server, SERVE_TIMEOUT), log_path.read_text()
            result = server_venv.run("python", "-c", CLIENT_SCRIPT, "identity", target)
        finally:
            returncode = stop(server)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["calls"] == {target: {"transport": "shm", "y": np.arange(8, dtype=np.float32).tolist()}}
    assert returncode == 0, log_path.read_text()
