"""A client that outlives its server, or was made before it: what it says, and how it finds shared memory again.

    client = EdgeClient(f"unix://{sock}", reprobe_interval=0.2)   # no server yet: calls say how to start one
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from shm_client import EdgeClient
from shm_client.shared.errors import EdgecowError, ServerUnreachable
from tests.support.models import identity_model, write_model
from tests.support.processes import ServerProcess
from tests.support.waiting import wait_until

X = np.arange(32, dtype=np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reconnect") / "models"
    write_model(root, "identity", 1, identity_model())
    write_model(root, "resnet", 1, identity_model())
    return root


def _serves_over(client: EdgeClient, transport: str) -> bool:
    """One call, made while the client uses `transport`, succeeds with the right answer."""
    try:
        used = client.transport  # what the call below goes over (a due proof runs here)
        y = client.infer("identity", {"x": X})["y"]
    except ServerUnreachable:
        return False
    np.testing.assert_array_equal(y, X)
    return used == transport


def test_a_call_with_no_server_names_the_socket_and_how_to_start_one(tmp_path: Path) -> None:
    missing = tmp_path / "edgecow.sock"
    with EdgeClient(f"unix://{missing}") as client:
        with pytest.raises(ServerUnreachable) as caught:
            client.infer("identity", {"x": X})
        with pytest.raises(ServerUnreachable) as listed:
            client.models()
    for err in (caught.value, listed.value):
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert str(missing) in err.message
        assert "`edgecow serve`" in err.message
        assert "`systemctl status edgecow`" in err.message
        assert "failed to connect to all addresses" not in err.message


def test_an_unknown_model_suggests_the_near_names(repo: Path, tmp_path: Path) -> None:
    with ServerProcess(repo, tmp_path) as server, EdgeClient(server.unix_target) as client:
        with pytest.raises(EdgecowError) as near:
            client.infer("resnt", {"x": X})
        with pytest.raises(EdgecowError) as far:
            client.metadata("qqqqqqqq")
        server.stop()
    assert near.value.code == grpc.StatusCode.NOT_FOUND
    assert near.value.message == "model 'resnt' is not loaded; did you mean 'resnet'? see `edgecow models list`"
    assert far.value.code == grpc.StatusCode.NOT_FOUND
    assert "did you mean" not in far.value.message
    assert "`edgecow models list`" in far.value.message


def test_a_client_made_before_its_server_moves_to_shared_memory_once_it_starts(repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(repo, tmp_path)
    with EdgeClient(f"unix://{server.socket}", reprobe_interval=0.2) as client:
        with pytest.raises(ServerUnreachable):
            client.infer("identity", {"x": X})
        assert client.transport == "grpc"
        with server.start():
            # Calls work over gRPC at once; within a few after the interval the client has proven shm.
            assert wait_until(lambda: _serves_over(client, "shm"), timeout=30)
            assert client.status().registered_regions > 0
            server.stop()


def test_a_client_proves_shared_memory_again_after_its_server_restarts(repo: Path, tmp_path: Path) -> None:
    with EdgeClient(f"unix://{tmp_path / 'edgecow.sock'}", reprobe_interval=0.2) as client:
        with ServerProcess(repo, tmp_path) as first:
            assert _serves_over(client, "shm")
            first.stop()
        with pytest.raises(ServerUnreachable):
            client.infer("identity", {"x": X})
        with ServerProcess(repo, tmp_path) as second:
            assert wait_until(lambda: _serves_over(client, "shm"), timeout=30)
            assert client.status().registered_regions > 0  # the new server knows this client's regions
            second.stop()
        with ServerProcess(repo, tmp_path, "--no-shm") as without_shm:
            assert wait_until(lambda: _serves_over(client, "grpc"), timeout=30)
            without_shm.stop()


def test_a_grpc_client_never_probes(repo: Path, tmp_path: Path) -> None:
    with ServerProcess(repo, tmp_path) as server:
        with EdgeClient(server.unix_target, transport="grpc", reprobe_interval=0.01) as client:
            for _ in range(5):
                assert not _serves_over(client, "shm")
            assert client.status().registered_regions == 0
        server.stop()


def test_reprobe_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="reprobe_interval"):
        EdgeClient("unix:///nonexistent.sock", reprobe_interval=0)
