"""Which callers count as this machine is configurable: with `--local-peers unix`, a loopback TCP caller
is remote and is refused shared memory, the probe and model loading, while it can still infer.

    pytest tests/integration/test_local_peers.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess

from shm_client import EdgeClient
from shm_client._proto import inference_pb2 as pb
from shm_client._proto import inference_pb2_grpc as pb_grpc
from shm_client.regions import Segment, unique_key


@pytest.fixture(scope="module")
def unix_only(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(model_repo, tmp_path_factory.mktemp("peers"), "--local-peers", "unix").start()
    yield server
    assert server.stop() == 0


@pytest.fixture
def segment() -> Iterator[Segment]:
    made = Segment.create(unique_key() + "-peers", 4096)
    yield made
    made.close()
    made.unlink()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def test_loopback_caller_is_refused_shared_memory_when_only_unix_peers_are_local(
    unix_only: ServerProcess, segment: Segment
) -> None:
    with grpc.insecure_channel(unix_only.tcp_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        register = pb.SystemSharedMemoryRegisterRequest(name="r", key="/" + segment.key, byte_size=4096)
        assert _code(lambda: stub.SystemSharedMemoryRegister(register, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
        load = pb.RepositoryModelLoadRequest(model_name="scale")
        assert _code(lambda: stub.RepositoryModelLoad(load, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
        request = pb.ModelInferRequest(model_name="scale")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[4])
        tensor.parameters["shared_memory_region"].string_param = "r"
        tensor.parameters["shared_memory_byte_size"].int64_param = 16
        assert _code(lambda: stub.ModelInfer(request, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
        status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
        assert not status.regions


def test_auto_transport_picks_grpc_over_loopback_and_shm_over_the_unix_socket(unix_only: ServerProcess) -> None:
    x = np.arange(16, dtype=np.float32)
    with EdgeClient(unix_only.tcp_target) as remote, EdgeClient(unix_only.unix_target) as local:
        assert remote.transport == "grpc"
        assert local.transport == "shm"
        np.testing.assert_array_equal(remote.infer("scale", {"x": x}, version=2)["y"], x * 2)
        np.testing.assert_array_equal(local.infer("scale", {"x": x}, version=2)["y"], x * 2)
