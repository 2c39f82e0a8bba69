"""The benchmark harness keeps working: `python -m bench all --quick` exits 0 and prints its tables.

    pytest tests/test_bench_smoke.py

Only the shape of the output is checked, never a timing (the bench prints figures, it asserts none).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

EXPECTED_HEADERS = [
    "== core (issue 2)",
    "== shm (issue 3)",
    "== soak (issue 5)",
    "unix/echo",
    "shm/in-process",
    "8 clients (processes), 4 KB",
    "target (information only)",
    "server RSS",
    "/dev/shm entries",
    "bench done in",
]


@pytest.mark.timeout(600)
def test_bench_quick_run_prints_every_table() -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "all", "--quick"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    missing = [header for header in EXPECTED_HEADERS if header not in done.stdout]
    assert not missing, f"missing {missing} in:\n{done.stdout[-4000:]}"
