"""A caller that disappears mid-call stops its run: the model slot and regions are freed at once.

    pytest tests/integration/test_cancellation.py
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.support.processes import ServerProcess
from tests.support.stubs import in_flight

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py

CLIENT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from shm_client import EdgeClient
    client = EdgeClient(sys.argv[1], transport="grpc")
    # A gate that never opens: the call only ends if the server stops it.
    client.infer("gate", {"x": np.ones(4, np.float32), "gate": np.zeros(1, np.int32)})
    """
)


def test_killed_caller_stops_its_run_and_frees_the_model(server: ServerProcess, wait_until) -> None:
    client = subprocess.Popen([sys.executable, "-c", CLIENT, server.unix_target])
    try:
        assert wait_until(lambda: in_flight(server.unix_target, "gate") == 1, timeout=60), "the call never started"
        client.kill()
        client.wait(10)
        assert wait_until(lambda: in_flight(server.unix_target, "gate") == 0, timeout=15), "the run kept going"
    finally:
        client.kill()
    assert server.alive()
