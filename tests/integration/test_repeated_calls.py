"""Calls repeated with the same regions: what the server remembers between them never changes an answer.

The server keeps, per lane request bytes, the decoded request, and per thread and model, the onnxruntime
binding of the last call's buffers (edge_server/transport.py, edge_server/runtime.py). These tests repeat
calls where only what those caches must not hold changes: the data, the shapes, the region behind a
name, its offset, and the time (a remembered request must not remember its deadline).

    pytest tests/integration/test_repeated_calls.py
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from shm_client import EdgeClient, EdgecowError
from shm_client.lane import LaneConnection
from shm_client.session import decode_response, encode_request
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.segments import Segment
from tests.support.processes import ServerProcess
from tests.support.stubs import scale_shm_request, v2_stub
from tests.support.waiting import wait_until

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py


def test_new_data_in_the_same_input_array_gives_new_answers(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target) as client:
        assert client.transport == "shm"
        x = client.empty((256,), np.float32)
        for step in range(20):
            x[...] = np.arange(256, dtype=np.float32) * step
            np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=2)["y"], x * 2)


def test_shapes_that_alternate_are_each_bound_afresh(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target) as client:
        for step in range(12):
            n = (3, 1000, 7)[step % 3]
            x = np.arange(n, dtype=np.float32) + step
            np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=2)["y"], x * 2)
            # another model version between, on the same thread
            np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=1)["y"], x)


def test_results_kept_by_the_caller_are_not_overwritten_by_later_calls(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target) as client:
        kept = [client.infer("scale", {"x": np.full(64, i, np.float32)}, version=2)["y"] for i in range(10)]
        for i, y in enumerate(kept):
            np.testing.assert_array_equal(y, np.full(64, 2 * i, np.float32))


def test_the_same_request_bytes_follow_the_region_a_name_has_now(
    server: ServerProcess, segments: Callable[..., Segment]
) -> None:
    """A name registered again on another object, or at another offset, is read where it is now,
    although the request naming it is byte for byte the one the server has seen."""
    stub = v2_stub(server.unix_target)
    data = [np.arange(16, dtype=np.float32) + 100 * i for i in range(3)]
    first, second = segments("rep-a", 4096), segments("rep-b", 4096)
    first.write(data[0].tobytes())
    second.write(data[1].tobytes() + data[2].tobytes())
    out = segments("rep-out", 4096)
    body = encode_request((scale_shm_request("rep-in", "rep-y", 16, version="2"), []))
    with contextlib.closing(LaneConnection(str(server.lane_path))) as lane:
        _register(stub, "rep-y", out, 0)
        for segment, offset, expected in ((first, 0, data[0]), (second, 0, data[1]), (second, 64, data[2]),
                                          (first, 0, data[0])):
            _register(stub, "rep-in", segment, offset)
            status, reply = lane.call(body, timeout=30)
            assert status == 0, bytes(reply).decode()
            response, _ = decode_response(reply)
            assert list(response.outputs[0].shape) == [16]
            np.testing.assert_array_equal(np.frombuffer(out.bytes_view(0, 64), np.float32), expected * 2)
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="rep-in"))
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="rep-y"))
        # The same bytes once the name is gone: refused as for any first call.
        status, reply = lane.call(body, timeout=30)
        assert status == grpc.StatusCode.NOT_FOUND.value[0] and b"rep-in" in bytes(reply)


def test_a_remembered_request_keeps_its_timeout_not_its_deadline(server: ServerProcess) -> None:
    """The same request with a 0.3 s timeout, repeated for longer than that, passes every time."""
    timeout = 0.3
    with EdgeClient(server.unix_target, timeout=timeout) as client:
        x = client.empty((16,), np.float32)
        x[...] = 1
        start = time.monotonic()
        calls = 0

        def repeated_past_the_timeout() -> bool:
            nonlocal calls
            np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=2)["y"], x * 2)
            calls += 1
            return time.monotonic() - start > 3 * timeout

        assert wait_until(repeated_past_the_timeout, timeout=60, interval=0.01)
        assert calls > 1


def test_a_wrong_request_repeated_is_refused_every_time(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target) as client:
        x = client.empty((8,), np.float64)
        for _ in range(3):
            with pytest.raises(EdgecowError) as wrong:
                client.infer("scale", {"x": x}, version=2)
            assert wrong.value.code == grpc.StatusCode.INVALID_ARGUMENT and "must be FP32" in str(wrong.value)


def _register(stub: pb_grpc.GRPCInferenceServiceStub, name: str, segment: Segment, offset: int) -> None:
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name=name, key="/" + segment.key, offset=offset, byte_size=1024)
    )
