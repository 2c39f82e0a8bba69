"""Deadlines on ModelStreamInfer, as Triton answers them: the stream's own deadline ends the stream with
DEADLINE_EXCEEDED; a call's v2 `timeout` parameter fails that call in the stream, which goes on.

    responses = stub.ModelStreamInfer(requests, timeout=1.0)   # a call held past 1 s ends the stream
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import ServerProcess
from tests.support.shm import owned_segments

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py

X = np.arange(16, dtype=np.float32)
GATE_REGION = "stream-deadline-gate"


class Requests:
    """A request iterator for a stream that the test feeds one message at a time."""

    def __init__(self) -> None:
        self._queue: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def send(self, request: pb.ModelInferRequest) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[pb.ModelInferRequest]:
        while (request := self._queue.get()) is not None:
            yield request


@pytest.fixture
def gate_flag(server: ServerProcess) -> Iterator[np.ndarray]:
    """The `gate` model's INT32 gate in a registered region: 0 holds a call in flight, 1 lets it finish."""
    channel = grpc.insecure_channel(server.unix_target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with owned_segments(f"stream-deadline-{os.getpid()}-") as make:
        segment = make("gate", 4)
        flag = segment.array(np.int32, (1,))
        flag[0] = 0
        stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name=GATE_REGION, key="/" + segment.key, byte_size=4), timeout=10
        )
        try:
            yield flag
        finally:
            flag[0] = 1
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=GATE_REGION), timeout=10)
            channel.close()


def _gated(request_id: str, timeout_us: int = 0) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="gate", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[X.size])
    request.raw_input_contents.append(X.tobytes())
    gate = request.inputs.add(name="gate", datatype="INT32", shape=[1])
    gate.parameters["shared_memory_region"].string_param = GATE_REGION
    gate.parameters["shared_memory_byte_size"].int64_param = 4
    if timeout_us:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def test_the_streams_deadline_ends_the_stream_with_deadline_exceeded(
    server: ServerProcess, gate_flag: np.ndarray
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.unix_target))
    requests = Requests()
    responses = stub.ModelStreamInfer(iter(requests), timeout=1.0)
    requests.send(_gated("held"))  # the gate stays shut: the call outlives the stream's deadline
    received = []
    with pytest.raises(grpc.RpcError) as ended:
        for response in responses:
            received.append(response)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "Deadline Exceeded" in ended.value.details()
    assert received == []  # the deadline is the stream's status, never an in-stream error_message
    requests.close()
    # The server let go of the call and the stream: a new stream serves at once.
    gate_flag[0] = 1
    again = Requests()
    replies = stub.ModelStreamInfer(iter(again), timeout=60)
    again.send(_gated("after"))
    reply = next(replies)
    assert reply.error_message == "" and reply.infer_response.id == "after"
    again.close()
    assert list(replies) == []


def test_a_calls_timeout_parameter_fails_that_call_inside_the_stream(
    server: ServerProcess, gate_flag: np.ndarray
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.unix_target))
    requests = Requests()
    responses = stub.ModelStreamInfer(iter(requests), timeout=120)
    requests.send(_gated("timed", timeout_us=300_000))
    failed = next(responses)
    assert failed.error_message.startswith("DEADLINE_EXCEEDED: ")
    assert failed.infer_response.id == "timed"
    gate_flag[0] = 1
    requests.send(_gated("next"))  # the stream goes on
    served = next(responses)
    assert served.error_message == "" and served.infer_response.id == "next"
    np.testing.assert_array_equal(np.frombuffer(served.infer_response.raw_output_contents[0], np.float32), X)
    requests.close()
    assert list(responses) == []


def test_tritonclient_sees_deadline_exceeded_when_its_stream_timeout_passes(
    server: ServerProcess, gate_flag: np.ndarray
) -> None:
    """Triton's own client-timeout QA check: start_stream(stream_timeout=...) and a call held past it."""
    results: queue.Queue[object] = queue.Queue()
    with triton.InferenceServerClient(f"unix://{server.socket}") as client:
        client.start_stream(callback=lambda result, error: results.put(error or result), stream_timeout=1)
        x = triton.InferInput("x", [X.size], "FP32")
        x.set_data_from_numpy(X)
        flag = triton.InferInput("gate", [1], "INT32")
        flag.set_shared_memory(GATE_REGION, 4)
        client.async_stream_infer("gate", [x, flag])
        outcome = results.get(timeout=60)
        client.stop_stream()
    assert isinstance(outcome, InferenceServerException)
    assert outcome.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "Deadline Exceeded" in str(outcome)
