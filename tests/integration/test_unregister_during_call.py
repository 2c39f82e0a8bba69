"""Unregistering regions while a call uses them, as Triton does it: the call finishes on them, they stay
listed until it ends, and no new call may start on them.

    hold = GatedCall(server)          # a `gate` model call held in flight until hold.open()
    stub.SystemSharedMemoryUnregister(...); status still lists the regions; hold.open(); they go
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from shm_client.shared._proto import edgecow_pb2, edgecow_pb2_grpc
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import ServerProcess
from tests.support.shm import owned_segments

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py

X = np.arange(64, dtype=np.float32)


def _shm(parameters: object, region: str, size: int) -> None:
    parameters["shared_memory_region"].string_param = region  # type: ignore[index]
    parameters["shared_memory_byte_size"].int64_param = size  # type: ignore[index]


class Caller:
    """v2 and edgecow stubs on the server's unix socket (shared memory is for local callers)."""

    def __init__(self, server: ServerProcess) -> None:
        self.channel = grpc.insecure_channel(server.unix_target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.edgecow = edgecow_pb2_grpc.EdgecowServiceStub(self.channel)

    def register(self, name: str, key: str, size: int) -> None:
        request = pb.SystemSharedMemoryRegisterRequest(name=name, key="/" + key, byte_size=size)
        self.stub.SystemSharedMemoryRegister(request, timeout=10)

    def unregister(self, name: str) -> None:
        self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=10)

    def listed(self, name: str = "") -> set[str]:
        request = pb.SystemSharedMemoryStatusRequest(name=name)
        return set(self.stub.SystemSharedMemoryStatus(request, timeout=10).regions)

    def in_flight(self) -> int:
        status = self.edgecow.GetStatus(edgecow_pb2.GetStatusRequest(), timeout=10)
        return sum(m.in_flight for m in status.models if m.name == "gate")

    def gated_request(self, x_region: str, y_region: str, gate_region: str) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name="gate")
        _shm(request.inputs.add(name="x", datatype="FP32", shape=[X.size]).parameters, x_region, X.nbytes)
        _shm(request.inputs.add(name="gate", datatype="INT32", shape=[1]).parameters, gate_region, 4)
        _shm(request.outputs.add(name="y").parameters, y_region, X.nbytes)
        return request


@pytest.fixture
def caller(server: ServerProcess) -> Iterator[Caller]:
    c = Caller(server)
    yield c
    c.unregister("")
    c.channel.close()


@pytest.mark.parametrize("unregister", ["by_name", "all"])
def test_unregister_during_a_call_keeps_the_regions_listed_until_it_ends(
    caller: Caller, unregister: str, wait_until
) -> None:
    names = {f"in-{unregister}", f"out-{unregister}", f"gate-{unregister}"}
    with owned_segments(f"unreg-{os.getpid()}-{unregister}-") as make:
        data, out, gate = make("x", X.nbytes, fill=X.tobytes()), make("y", X.nbytes), make("gate", 4)
        gate.array(np.int32, (1,))[0] = 0
        caller.register(f"in-{unregister}", data.key, X.nbytes)
        caller.register(f"out-{unregister}", out.key, X.nbytes)
        caller.register(f"gate-{unregister}", gate.key, 4)
        request = caller.gated_request(f"in-{unregister}", f"out-{unregister}", f"gate-{unregister}")
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                outcome["response"] = caller.stub.ModelInfer(request, timeout=120)
            except grpc.RpcError as err:
                outcome["error"] = err

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        try:
            assert wait_until(lambda: caller.in_flight() == 1, timeout=30)
            if unregister == "all":
                caller.unregister("")
            else:
                for name in sorted(names):
                    caller.unregister(name)
            # Triton's rule: listed (by name and in the full list) while the call still uses them...
            assert names <= caller.listed()
            assert caller.listed(f"in-{unregister}") == {f"in-{unregister}"}
            # ...but a new call naming them is refused at once, saying why.
            with pytest.raises(grpc.RpcError) as refused:
                caller.stub.ModelInfer(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert "is being unregistered" in refused.value.details()
            assert caller.in_flight() == 1  # the held call was not disturbed
        finally:
            gate.array(np.int32, (1,))[0] = 1
            thread.join(120)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        np.testing.assert_array_equal(out.array(np.float32, (X.size,)), X)  # written before the unmapping
        assert wait_until(lambda: not names & caller.listed(), timeout=30)
        # The names are free again, and a call on fresh registrations works.
        gate.array(np.int32, (1,))[0] = 1
        caller.register(f"in-{unregister}", data.key, X.nbytes)
        caller.register(f"out-{unregister}", out.key, X.nbytes)
        caller.register(f"gate-{unregister}", gate.key, 4)
        caller.stub.ModelInfer(request, timeout=60)
        for name in sorted(names):
            caller.unregister(name)
    assert not names & caller.listed()
