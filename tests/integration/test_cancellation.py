"""A caller that disappears mid-call stops its run: the model slot and regions are freed at once.

    pytest tests/integration/test_cancellation.py
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
from conftest import ServerProcess

from shm_client.shared._proto import edgecow_pb2, edgecow_pb2_grpc

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


def _gate_in_flight(server: ServerProcess) -> int:
    with grpc.insecure_channel(server.tcp_target) as channel:
        status = edgecow_pb2_grpc.EdgecowServiceStub(channel).GetStatus(edgecow_pb2.GetStatusRequest(), timeout=10)
    return sum(m.in_flight for m in status.models if m.name == "gate")


def test_killed_caller_stops_its_run_and_frees_the_model(server: ServerProcess, wait_until) -> None:
    client = subprocess.Popen([sys.executable, "-c", CLIENT, server.unix_target])
    try:
        assert wait_until(lambda: _gate_in_flight(server) == 1, timeout=60), "the call never started"
        client.kill()
        client.wait(10)
        assert wait_until(lambda: _gate_in_flight(server) == 0, timeout=15), "the run kept going"
    finally:
        client.kill()
    assert server.alive()
