"""`edgecow doctor` end to end: a real server, a missing one, one without shared memory, a socket out of reach.

    result = doctor("--target", server.unix_target)     # exit 0 and "shared memory works", or FAIL lines
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.models import identity_model, write_model
from tests.support.processes import REPO_ROOT, ServerProcess

# Imports first, then drops to `nobody`: the interpreter may live where nobody cannot read it.
AS_NOBODY = """
import os, sys
from edge_server import cli
import shm_client.doctor
cli._parser().parse_args(["doctor"])  # argparse imports some of its modules on first use
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
sys.exit(cli.main(["doctor", *sys.argv[3:]]))
"""

# A client-only install: the [server] extra's modules cannot be imported (None in sys.modules).
CLIENT_ONLY = """
import sys
from edge_server import cli
for name in cli.SERVER_ONLY_MODULES:
    sys.modules[name] = None
sys.exit(cli.main(["doctor", *sys.argv[1:]]))
"""


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "EDGECOW_TARGET"}
    return subprocess.run([sys.executable, "-m", "edge_server", "doctor", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("doctor") / "models"
    write_model(root, "identity", 1, identity_model())
    return root


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may search (pytest's own are private to root)."""
    with tempfile.TemporaryDirectory(prefix="edgecow-doctor-") as made:
        os.chmod(made, 0o755)
        yield Path(made)


def _lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return result.stdout.splitlines()


def test_doctor_passes_against_a_server_with_shared_memory(repo: Path, tmp_path: Path) -> None:
    with ServerProcess(repo, tmp_path) as server:
        result = doctor("--target", server.unix_target)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result)
    assert all(line.split()[0] in ("ok", "warn") for line in lines), lines
    assert lines[0].startswith("ok   target:") and "(from --target)" in lines[0]
    assert "shared memory works" in lines[-1]


def test_doctor_names_a_missing_socket_and_how_to_start_the_server(tmp_path: Path) -> None:
    missing = tmp_path / "edgecow.sock"
    result = doctor("--target", f"unix://{missing}")
    assert result.returncode != 0
    failed = [line for line in _lines(result) if line.startswith("FAIL")]
    assert len(failed) == 1, result.stdout
    assert str(missing) in failed[0]
    assert "`edgecow serve`" in failed[0] and "`systemctl status edgecow`" in failed[0]


def test_doctor_reads_the_target_from_the_environment(tmp_path: Path) -> None:
    missing = tmp_path / "from-env.sock"
    env = {**os.environ, "EDGECOW_TARGET": f"unix://{missing}"}
    result = subprocess.run([sys.executable, "-m", "edge_server", "doctor"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "(from $EDGECOW_TARGET)" in _lines(result)[0]


def test_doctor_names_a_server_started_without_shared_memory(repo: Path, tmp_path: Path) -> None:
    with ServerProcess(repo, tmp_path, "--no-shm") as server:
        result = doctor("--target", server.unix_target)
    assert result.returncode != 0
    failed = [line for line in _lines(result) if line.startswith("FAIL")]
    assert len(failed) == 1, result.stdout
    assert "--no-shm" in failed[0]
    assert "shared memory works" not in result.stdout


def test_doctor_explains_a_socket_this_user_cannot_write(repo: Path, open_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the doctor as a second user")
    nobody = pwd.getpwnam("nobody")
    with ServerProcess(repo, open_dir) as server:
        os.chmod(server.socket, 0o600)
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(AS_NOBODY), str(nobody.pw_uid), str(nobody.pw_gid),
             "--target", server.unix_target],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
    assert result.returncode != 0, result.stdout + result.stderr
    failed = [line for line in _lines(result) if line.startswith("FAIL")]
    assert len(failed) == 1, result.stdout + result.stderr
    assert "may not write" in failed[0] and str(server.socket) in failed[0]
    assert "usermod -aG" in failed[0] and "log out and in again" in failed[0]


def test_doctor_runs_from_a_client_only_install(repo: Path, tmp_path: Path) -> None:
    with ServerProcess(repo, tmp_path) as server:
        result = subprocess.run([sys.executable, "-c", CLIENT_ONLY, "--target", server.unix_target],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "shared memory works" in result.stdout
