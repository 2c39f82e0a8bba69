"""The local lane: ModelInfer for shared-memory callers on a plain unix socket beside the gRPC one.

    pytest tests/integration/test_local_lane.py
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shm_client import EdgeClient, EdgecowError
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared.framing import recv_frame, send_frame
from tests.support.processes import ServerProcess


def test_a_shared_memory_client_runs_its_calls_on_the_lane(server: ServerProcess) -> None:
    x = np.arange(64, dtype=np.float32)
    with EdgeClient(server.unix_target) as client:
        assert client.transport == "shm"
        assert client._session._lane_path == str(server.lane_path.resolve())
        np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=2)["y"], x * 2)
        assert client._session._lane_local.conn is not None  # the call went through this thread's lane connection
        with pytest.raises(EdgecowError) as wrong:
            client.infer("scale", {"x": x.astype(np.float64)}, version=2)
        assert wrong.value.code == grpc.StatusCode.INVALID_ARGUMENT and "must be FP32" in str(wrong.value)
        # The connection survives an error and serves the next call.
        np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=1)["y"], x)


def test_a_call_past_its_timeout_on_the_lane_is_deadline_exceeded(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, timeout=0.3) as client:
        assert client.transport == "shm"
        with pytest.raises(EdgecowError) as late:
            client.infer("gate", {"x": np.ones(4, np.float32), "gate": np.zeros(1, np.int32)})  # never opens
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        x = np.ones(4, np.float32)
        np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=1)["y"], x)


def test_tcp_clients_are_not_offered_the_lane(model_repo: Path, tmp_path: Path) -> None:
    # Loopback counts as this machine only when the operator opts in; even then the lane stays unix-only.
    server = ServerProcess(model_repo, tmp_path, "--local-peers", "unix,loopback").start()
    try:
        with EdgeClient(server.tcp_target) as client:
            assert client.transport == "shm"
            assert client._session._lane_path == ""
    finally:
        assert server.stop() == 0


@pytest.fixture
def lane_socket(server: ServerProcess) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server.lane_path))
    yield sock
    sock.close()


def test_a_malformed_message_gets_an_error_frame_and_the_connection_goes_on(lane_socket: socket.socket) -> None:
    send_frame(lane_socket, b"\xff\xff\xff")
    body = recv_frame(lane_socket, 1 << 20)
    assert body is not None and body[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert b"well-formed" in body[1:]
    request = pb.ModelInferRequest(model_name="scale", model_version="1")
    request.inputs.add(name="x", datatype="FP32", shape=[2])
    request.raw_input_contents.append(np.array([1, 2], np.float32).tobytes())
    send_frame(lane_socket, request.SerializeToString())
    body = recv_frame(lane_socket, 1 << 30)
    assert body is not None and body[0] == 0
    response = pb.ModelInferResponse.FromString(bytes(body[1:]))
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32), [1, 2])


def test_an_oversized_message_is_refused_before_it_is_read(lane_socket: socket.socket) -> None:
    lane_socket.sendall(struct.pack("<Q", 1 << 40))
    body = recv_frame(lane_socket, 1 << 20)
    assert body is not None and body[0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert recv_frame(lane_socket, 1 << 20) is None  # and the connection is closed


def test_without_the_lane_shared_memory_calls_go_over_grpc(model_repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(model_repo, tmp_path, "--no-local-lane").start()
    try:
        assert not server.lane_path.exists()
        with EdgeClient(server.unix_target) as client:
            x = np.ones(8, np.float32)
            np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=2)["y"], x * 2)
            assert client.transport == "shm" and client._session._lane_path == ""
    finally:
        assert server.stop() == 0


def test_a_restarted_server_gets_new_lane_connections(model_repo: Path, tmp_path: Path) -> None:
    first = ServerProcess(model_repo, tmp_path).start()
    x = np.arange(8, dtype=np.float32)
    with EdgeClient(first.unix_target) as client:
        np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=2)["y"], x * 2)
        first.kill()
        second = ServerProcess(model_repo, tmp_path).start()
        try:
            for _ in range(3):
                np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=2)["y"], x * 2)
            assert client._session._lane_local.conn is not None
        finally:
            assert second.stop() == 0
