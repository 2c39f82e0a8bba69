"""A start that cannot work fails at once, before any model loads, in one line that names the address or the
setting's source (flag, EDGECOW_* variable, TOML file), and leaves nothing behind: no beacon segment in /dev/shm,
no socket files.

    run_serve(repo, tmp_path, "--listen", f"127.0.0.1:{taken_port}")  -> exit 1, "cannot listen on ..."
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shm_client.shared.segments import SERVER_PREFIX
from tests.support.models import build_repository
from tests.support.processes import REPO_ROOT

START_LIMIT = 60.0  # seconds; the check is meant to answer in well under one


def run_serve(repo: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
              ) -> tuple[int, str, int, float]:
    """(exit code, output, pid, seconds) of `edgecow serve` with its own socket and no metrics listener."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGECOW_")}
    environ.update({"EDGECOW_METRICS_LISTEN": "none", "EDGECOW_LOG_LEVEL": "info"}, **(env or {}))
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_server", "serve", "--model-repository", str(repo),
         "--socket", str(tmp_path / "edgecow.sock"), *args],
        cwd=REPO_ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output, _ = proc.communicate(timeout=START_LIMIT)
    return proc.returncode, output, proc.pid, time.monotonic() - began


def leftovers(pid: int, tmp_path: Path) -> list[str]:
    segments = [name for name in os.listdir("/dev/shm") if name.startswith(f"{SERVER_PREFIX}{pid}-")]
    sockets = [p.name for p in tmp_path.glob("*.sock")]
    return segments + sockets


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo") / "models")


@pytest.fixture()
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _one_failure_line(output: str) -> str:
    assert "Traceback" not in output, output
    assert "loaded model" not in output, output  # refused before any model loaded
    lines = [line for line in output.splitlines() if "cannot start" in line or "error" in line.lower()]
    assert len(lines) == 1, output
    return lines[0]


def test_a_port_in_use_fails_at_once_naming_the_address(repo: Path, tmp_path: Path, taken_port: int) -> None:
    code, output, pid, seconds = run_serve(repo, tmp_path, "--listen", f"127.0.0.1:{taken_port}")
    assert code != 0
    line = _one_failure_line(output)
    assert f"127.0.0.1:{taken_port}" in line
    assert "flag --listen" in line
    assert seconds < START_LIMIT
    assert leftovers(pid, tmp_path) == []


def test_a_port_in_use_from_the_environment_names_the_variable(repo: Path, tmp_path: Path, taken_port: int,
                                                                ) -> None:
    code, output, pid, _ = run_serve(repo, tmp_path, env={"EDGECOW_LISTEN": f"127.0.0.1:{taken_port}"})
    assert code != 0
    line = _one_failure_line(output)
    assert "EDGECOW_LISTEN" in line and "--listen" in line  # where it was set, and the flag that overrides it
    assert leftovers(pid, tmp_path) == []


@pytest.mark.parametrize("value", ["8001", "nohost:", "127.0.0.1:70000"])
def test_a_bad_listen_from_the_environment_names_the_variable(repo: Path, tmp_path: Path, value: str) -> None:
    code, output, pid, _ = run_serve(repo, tmp_path, env={"EDGECOW_LISTEN": value})
    assert code != 0
    line = _one_failure_line(output)
    assert "environment variable EDGECOW_LISTEN" in line
    assert "flag" not in line
    assert leftovers(pid, tmp_path) == []


def test_a_bad_value_in_the_toml_file_names_the_file(repo: Path, tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text('listen = "not an address"\n')
    code, output, pid, _ = run_serve(repo, tmp_path, "--config", str(config))
    assert code != 0
    line = _one_failure_line(output)
    assert f"configuration file {config}" in line
    assert leftovers(pid, tmp_path) == []


def test_an_unreadable_tls_file_fails_before_loading(repo: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    code, output, pid, _ = run_serve(repo, tmp_path, "--listen", "127.0.0.1:0", "--tls-cert", str(missing),
                                     "--tls-key", str(missing))
    assert code != 0
    line = _one_failure_line(output)
    assert str(missing) in line and "flag --tls-cert" in line
    assert leftovers(pid, tmp_path) == []


def test_a_socket_held_by_another_server_leaves_nothing_of_this_one(repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "edgecow.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        holder.bind(str(path))
        holder.listen()
        code, output, pid, _ = run_serve(repo, tmp_path, "--listen", "none")
        assert code != 0
        line = _one_failure_line(output)
        assert str(path) in line
        assert [name for name in os.listdir("/dev/shm") if name.startswith(f"{SERVER_PREFIX}{pid}-")] == []
    path.unlink()
