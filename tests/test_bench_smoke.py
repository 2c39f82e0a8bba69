"""The benchmark harness keeps working: `python -m bench all --quick` exits 0, prints every part's tables,
and leaves no process it started behind.

    pytest tests/test_bench_smoke.py

Only the shape of the output is checked, never a timing (the bench prints figures, it asserts none).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent

EXPECTED = [
    "== core (issue 2)",
    "== shm (issues 3, 10)",
    "== models (issue 10)",
    "== outside (issue 10)",
    "== startup (issue 10)",
    "== soak (issue 5)",
    "unix/echo",
    "default/in-process",
    "input copy (np.copyto)",
    "8 clients (processes), 4 KB",
    "target (issue 10, information only)",
    "resnet18",
    "encoder",
    "bit-identical",
    "startup and footprint",
    "server RSS <= in-process + 40 MB",
    "server RSS",
    "/dev/shm entries",
    "bench done in",
]


@pytest.fixture
def scratch() -> Iterator[str]:
    # Short on purpose: the bench's unix sockets live under it (108-byte limit on their paths).
    path = tempfile.mkdtemp(prefix="ebs-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _processes_using(path: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(path in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_quick_run_prints_every_table_and_stops_its_servers(scratch: str) -> None:
    env = {**os.environ, "TMPDIR": scratch}  # every server socket, repository and notify socket lands here
    done = subprocess.run([sys.executable, "-m", "bench", "all", "--quick"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    missing = [text for text in EXPECTED if text not in done.stdout]
    assert not missing, f"missing {missing} in:\n{done.stdout[-4000:]}"
    # perf_analyzer's table where it can run, one line saying why not where it cannot.
    assert ("shared memory  concurrency" in done.stdout) != ("perf_analyzer skipped:" in done.stdout)
    assert wait_until(lambda: not _processes_using(scratch), timeout=30), (
        f"still running after the bench: {[p.info['cmdline'] for p in _processes_using(scratch)]}"
    )
