"""`edgecow status --json` against a real server: numbers are JSON numbers and zero counts are present as 0.

    data = json.loads(run_cli("status", "--target", server.unix_target, "--json").stdout)
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from shm_client import EdgeClient
from tests.support.processes import REPO_ROOT, ServerProcess

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py


def _status_json(target: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "edge_server", "status", "--target", target, "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_status_json_prints_numbers_as_numbers_and_zero_counts(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target) as client:
        client.infer("scale", {"x": np.ones(4, np.float32)})
    data = _status_json(server.unix_target)
    process = data["process"]
    assert isinstance(process, dict)
    assert process["pid"] == server.pid
    for name in ("rss_bytes", "threads", "open_files", "cpu_percent", "uptime_seconds"):
        assert _is_number(process[name]), (name, process[name])
    assert process["rss_bytes"] > 0
    system = data["system"]
    assert isinstance(system, dict)
    for name in ("memory_total_bytes", "memory_available_bytes", "shm_total_bytes", "load_average_1m"):
        assert _is_number(system[name]), (name, system[name])
    # Nothing is registered: the counts are there, as 0, not left out.
    assert data["registered_regions"] == 0
    assert data["mapped_bytes"] == 0
    models = data["models"]
    assert isinstance(models, list) and models
    for model in models:
        assert _is_number(model["inference_count"]) and _is_number(model["in_flight"]), model
        assert model["in_flight"] == 0
    used = [m for m in models if m["name"] == "scale"]
    assert sum(m["inference_count"] for m in used) >= 1
    assert any(m["inference_count"] == 0 for m in models if m["name"] != "scale")


def test_status_json_over_tcp_hides_the_pid_as_zero(server: ServerProcess) -> None:
    data = _status_json(server.tcp_target)
    process = data["process"]
    assert isinstance(process, dict)
    assert process["pid"] == 0
