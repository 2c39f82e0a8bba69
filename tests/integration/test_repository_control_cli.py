"""`edgecow models load|unload NAME` and `edgecow reload` against a real server: over the protocol
(RepositoryModelLoad/Unload, edgecow.v1 ReloadRepository), for local callers only.

    edgecow models unload scale --target unix:///run/edgecow/edgecow.sock
    edgecow reload
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.models import scale_model, write_model
from tests.support.processes import REPO_ROOT, ServerProcess


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_server", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def states(server: ServerProcess) -> dict[str, str]:
    result = run_cli("models", "list", "--target", server.unix_target)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line and not line.startswith(" ")]
    return {row[0]: row[2] for row in rows if len(row) >= 3}


def _serve(workdir: Path) -> Iterator[ServerProcess]:
    repo = workdir / "models"
    write_model(repo, "alpha", 1, scale_model(factor=2.0))
    write_model(repo, "beta", 1, scale_model(factor=3.0))
    proc = ServerProcess(repo, workdir).start()
    yield proc
    proc.stop()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own: the test loads, unloads or reloads."""
    yield from _serve(tmp_path)


@pytest.fixture(scope="module")
def untouched_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests whose commands are all refused, which each check that nothing changed."""
    yield from _serve(tmp_path_factory.mktemp("refused"))


def test_unload_then_load_a_model(server: ServerProcess) -> None:
    assert states(server) == {"alpha": "READY", "beta": "READY"}

    result = run_cli("models", "unload", "alpha", "--target", server.unix_target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("unloaded alpha")
    assert states(server).get("alpha") != "READY"
    assert states(server)["beta"] == "READY"

    result = run_cli("models", "load", "alpha", "--target", server.unix_target)
    assert result.returncode == 0, result.stderr
    assert "loaded alpha: v1 READY" in result.stdout
    assert states(server)["alpha"] == "READY"


def test_reload_picks_up_new_and_removed_models(server: ServerProcess) -> None:
    repo = server.repo
    assert repo is not None
    write_model(repo, "gamma", 1, scale_model(factor=4.0))
    shutil.rmtree(repo / "beta")

    result = run_cli("reload", "--target", server.unix_target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reloaded: ")
    assert "gamma:1" in result.stdout and "beta" not in result.stdout
    listed = states(server)
    assert listed["gamma"] == "READY" and listed["alpha"] == "READY"
    assert "beta" not in listed


def test_errors_are_one_line_without_a_traceback(untouched_server: ServerProcess) -> None:
    result = run_cli("models", "load", "nosuch", "--target", untouched_server.unix_target)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("edgecow: error: ") and "nosuch" in line

    result = run_cli("models", "unload", "nosuch", "--target", untouched_server.unix_target)
    assert result.returncode == 1 and "nosuch" in result.stderr
    assert states(untouched_server) == {"alpha": "READY", "beta": "READY"}


@pytest.mark.parametrize("command", [["models", "load", "alpha"], ["models", "unload", "alpha"], ["reload"]])
def test_remote_callers_may_not_control_the_repository(untouched_server: ServerProcess, command: list[str]) -> None:
    result = run_cli(*command, "--target", untouched_server.tcp_target)  # loopback TCP is remote by default
    assert result.returncode == 1
    assert "only callers on this machine may" in result.stderr
    assert "Traceback" not in result.stderr
    assert states(untouched_server) == {"alpha": "READY", "beta": "READY"}
