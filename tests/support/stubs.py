"""Raw v2 and edgecow stubs, and the one-line questions tests ask a running server.

    stub = v2_stub(server.unix_target); assert live(stub) and registered_names(stub) == set()
    assert wait_until(lambda: in_flight(server.unix_target, "gate") == 1)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import psutil

from shm_client.shared._proto import edgecow_pb2, edgecow_pb2_grpc
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc


def v2_stub(target: str) -> pb_grpc.GRPCInferenceServiceStub:
    """A v2 stub with no send limit, so a test can send what the server must refuse."""
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
    return pb_grpc.GRPCInferenceServiceStub(channel)


def in_flight(target: str, model: str) -> int:
    """Calls of `model` the server is running now (ask over the unix socket: it sees every figure)."""
    with grpc.insecure_channel(target) as channel:  # closed at once: tests poll this in a loop
        reply = edgecow_pb2_grpc.EdgecowServiceStub(channel).GetStatus(edgecow_pb2.GetStatusRequest(), timeout=10)
    return sum(m.in_flight for m in reply.models if m.name == model)


def idle(target: str) -> bool:
    """No calls in flight on any model and no shared memory registered: the server as it started."""
    with grpc.insecure_channel(target) as channel:
        status = edgecow_pb2_grpc.EdgecowServiceStub(channel).GetStatus(edgecow_pb2.GetStatusRequest(), timeout=10)
        regions = pb_grpc.GRPCInferenceServiceStub(channel).SystemSharedMemoryStatus(
            pb.SystemSharedMemoryStatusRequest(), timeout=10
        )
    return not regions.regions and all(m.in_flight == 0 for m in status.models)


def registered_names(stub: pb_grpc.GRPCInferenceServiceStub) -> set[str]:
    reply = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
    return set(reply.regions)


def live(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    """ServerLive; False when the server does not answer within 5 s."""
    try:
        return stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    except grpc.RpcError:
        return False


def rpc_error(call: Callable[[], object]) -> grpc.RpcError | None:
    """The error `call` raised, None when it succeeded."""
    try:
        call()
    except grpc.RpcError as err:
        return err
    return None


def scale_shm_request(input_region: str, output_region: str, count: int, version: str = "") -> pb.ModelInferRequest:
    """`scale` on `count` FP32 values read from `input_region`, y written into `output_region` (both at offset 0)."""
    request = pb.ModelInferRequest(model_name="scale", model_version=version)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[count])
    tensor.parameters["shared_memory_region"].string_param = input_region
    tensor.parameters["shared_memory_byte_size"].int64_param = 4 * count
    output = request.outputs.add(name="y")
    output.parameters["shared_memory_region"].string_param = output_region
    output.parameters["shared_memory_byte_size"].int64_param = 4 * count
    return request


def scale_request(value: float = 1.0) -> pb.ModelInferRequest:
    """`scale` version 1 (y = x) on four copies of `value`."""
    request = pb.ModelInferRequest(model_name="scale", model_version="1")
    request.inputs.add(name="x", datatype="FP32", shape=[4])
    request.raw_input_contents.append(np.full(4, value, np.float32).tobytes())
    return request


def scale_answers(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    reply = stub.ModelInfer(scale_request(3.0), timeout=10)
    return np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [3.0] * 4


def non_loopback_ipv4() -> str | None:
    """An address of this box that is not loopback, so a TCP peer there counts as remote."""
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family.name == "AF_INET" and not addr.address.startswith("127."):
                return addr.address
    return None


class IdleStream:
    """A ModelStreamInfer stream that makes one call to prove it was admitted, then stays open, idle,
    until close()."""

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        self._requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        self._responses: Iterator[pb.ModelStreamInferResponse] = stub.ModelStreamInfer(
            iter(self._requests.get, None), timeout=120
        )
        self._requests.put(scale_request())
        self.error: grpc.RpcError | None = None
        try:
            reply = next(self._responses)
            assert not reply.error_message, reply.error_message
        except grpc.RpcError as err:
            self.error = err

    @property
    def open(self) -> bool:
        return self.error is None

    def close(self, timeout: float = 10.0) -> bool:
        """End the stream from this side; True when the server ended it too within `timeout`."""
        self._requests.put(None)
        if self.error is not None:
            return True
        done = threading.Event()

        def drain() -> None:
            for _ in self._responses:
                pass
            done.set()

        threading.Thread(target=drain, daemon=True).start()
        return done.wait(timeout)
