"""Which callers count as this machine: by default only those on the unix socket (whose mode limits them to
the edgecow group), so a loopback TCP caller is remote and is refused shared memory, the region list, the
probe and model control while it can still infer. `--local-peers unix,loopback` opts loopback in.

    pytest tests/integration/test_local_peers.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shm_client import EdgeClient
from shm_client.shared._proto import edgecow_pb2, edgecow_pb2_grpc
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.segments import Segment, unique_key
from tests.support.processes import ServerProcess


@pytest.fixture(scope="module")
def loopback_opt_in(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(model_repo, tmp_path_factory.mktemp("peers"), "--local-peers", "unix,loopback").start()
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


def test_loopback_caller_is_refused_shared_memory_and_model_control_by_default(
    server: ServerProcess, segment: Segment
) -> None:
    with grpc.insecure_channel(server.unix_target) as local_channel:
        local = pb_grpc.GRPCInferenceServiceStub(local_channel)
        register = pb.SystemSharedMemoryRegisterRequest(name="peers-r", key="/" + segment.key, byte_size=4096)
        local.SystemSharedMemoryRegister(register, timeout=10)
    try:
        with grpc.insecure_channel(server.tcp_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            other = pb.SystemSharedMemoryRegisterRequest(name="r", key="/" + segment.key, byte_size=4096)
            for call in (
                lambda: stub.SystemSharedMemoryRegister(other, timeout=10),
                lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="scale"), timeout=10),
                lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="scale"), timeout=10),
                lambda: stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=10),
                # The list would tell a remote caller the keys of other callers' objects.
                lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10),
            ):
                assert _code(call) == grpc.StatusCode.PERMISSION_DENIED
            request = pb.ModelInferRequest(model_name="scale")
            tensor = request.inputs.add(name="x", datatype="FP32", shape=[4])
            tensor.parameters["shared_memory_region"].string_param = "peers-r"
            tensor.parameters["shared_memory_byte_size"].int64_param = 16
            assert _code(lambda: stub.ModelInfer(request, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
            status = edgecow_pb2_grpc.EdgecowServiceStub(channel).GetStatus(edgecow_pb2.GetStatusRequest(), timeout=10)
            assert status.process.pid == 0
            assert not any(listener.startswith("unix:") for listener in status.listeners)
            assert str(server.socket) not in str(status)
        with grpc.insecure_channel(server.unix_target) as local_channel:
            status = edgecow_pb2_grpc.EdgecowServiceStub(local_channel).GetStatus(
                edgecow_pb2.GetStatusRequest(), timeout=10
            )
            assert status.process.pid == server.pid
            regions = pb_grpc.GRPCInferenceServiceStub(local_channel).SystemSharedMemoryStatus(
                pb.SystemSharedMemoryStatusRequest(), timeout=10
            ).regions
            assert "peers-r" in regions
    finally:
        with grpc.insecure_channel(server.unix_target) as local_channel:
            pb_grpc.GRPCInferenceServiceStub(local_channel).SystemSharedMemoryUnregister(
                pb.SystemSharedMemoryUnregisterRequest(name="peers-r"), timeout=10
            )


def test_auto_transport_picks_grpc_over_loopback_and_shm_over_the_unix_socket(server: ServerProcess) -> None:
    x = np.arange(16, dtype=np.float32)
    with EdgeClient(server.tcp_target) as remote, EdgeClient(server.unix_target) as local:
        assert remote.transport == "grpc"
        assert local.transport == "shm"
        np.testing.assert_array_equal(remote.infer("scale", {"x": x}, version=2)["y"], x * 2)
        np.testing.assert_array_equal(local.infer("scale", {"x": x}, version=2)["y"], x * 2)


def test_an_operator_can_opt_loopback_in(loopback_opt_in: ServerProcess, segment: Segment) -> None:
    x = np.arange(16, dtype=np.float32)
    with EdgeClient(loopback_opt_in.tcp_target) as over_loopback:
        assert over_loopback.transport == "shm"
        np.testing.assert_array_equal(over_loopback.infer("scale", {"x": x}, version=2)["y"], x * 2)
    with grpc.insecure_channel(loopback_opt_in.tcp_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        register = pb.SystemSharedMemoryRegisterRequest(name="opt-in", key="/" + segment.key, byte_size=4096)
        stub.SystemSharedMemoryRegister(register, timeout=10)
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="opt-in"), timeout=10)
