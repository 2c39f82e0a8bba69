"""The local lane under a hostile or careless local caller: memory, time and connections are bounded, a
caller that dies mid-call is cancelled, and a second server cannot take over or delete a lane.

    pytest tests/adversarial/test_lane.py
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge_server.config import ConfigError, load_settings
from shm_client import EdgeClient
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared.framing import recv_frame, send_frame
from tests.support.processes import REPO_ROOT, ServerProcess
from tests.support.shm import owned_segments
from tests.support.stubs import in_flight, scale_request, v2_stub

READ_TIMEOUT = 1.0
BUFFER_BUDGET = 2_000_000
GIB = 1 << 30
PREFIX = f"lanetest-{os.getpid()}-"


@pytest.fixture(scope="module")
def lane_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        model_repo, tmp_path_factory.mktemp("lane"),
        "--lane-read-timeout", str(READ_TIMEOUT), "--lane-max-buffered-bytes", str(BUFFER_BUDGET),
    ).start()
    yield server
    server.stop()


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.connect(str(server.lane_path))
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (within the socket's timeout) without answering."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _serves(server: ServerProcess) -> bool:
    with EdgeClient(server.unix_target) as client:
        x = np.arange(16, dtype=np.float32)
        y = client.infer("scale", {"x": x}, version=2)["y"]
        return client._session._lane_local.conn is not None and np.array_equal(y, x * 2)


def test_a_header_claiming_gigabytes_costs_no_memory_and_a_stalled_request_is_cut_off(
    lane_server: ServerProcess,
) -> None:
    peak = _peak_rss(lane_server.pid)
    stalled = [_connect(lane_server) for _ in range(2)]
    trickle = _connect(lane_server)
    try:
        for sock in stalled:
            sock.sendall(struct.pack("<Q", GIB) + b"\x0a\x05scale")  # a promise of 1 GiB, and 7 bytes
        trickle.sendall(struct.pack("<Q", 1 << 20))
        stop = threading.Event()

        def drip() -> None:  # a byte at a time keeps the connection busy, but not the request alive
            for _ in range(200):
                if stop.wait(READ_TIMEOUT / 5):
                    return
                try:
                    trickle.send(b"\x00")
                except OSError:
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        assert all(_closed_by_server(sock) for sock in stalled), "a stalled request kept its connection"
        assert _closed_by_server(trickle), "a request sent a byte at a time kept its connection"
        stop.set()
        dripper.join()
    finally:
        for sock in [*stalled, trickle]:
            sock.close()
    growth = _peak_rss(lane_server.pid) - peak
    assert growth < 64 << 20, f"the server's peak memory grew by {growth >> 20} MiB"
    assert _serves(lane_server)


def test_request_bytes_held_by_the_lane_are_bounded(lane_server: ServerProcess) -> None:
    sock = _connect(lane_server)
    try:
        size = 2 * BUFFER_BUDGET
        sender = threading.Thread(target=_send_ignoring_errors, args=(sock, struct.pack("<Q", size) + bytes(size)))
        sender.start()
        body = recv_frame(sock, 1 << 20)
        sender.join()
        assert body is not None and body[0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert b"lane_max_buffered_bytes" in body[1:]
        assert _closed_by_server(sock)
    finally:
        sock.close()
    assert _serves(lane_server)


def test_a_second_request_sent_before_the_first_answer_is_refused(lane_server: ServerProcess) -> None:
    """The lane is one request, one answer: two messages in one write get an error and the connection
    closes, instead of the second being lost or misread."""
    sock = _connect(lane_server)
    try:
        message = scale_request().SerializeToString()
        frame = struct.pack("<Q", len(message)) + message
        sock.sendall(frame + frame)
        body = recv_frame(sock, 1 << 20)
        assert body is not None and body[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert b"one request at a time" in body[1:]
        assert _closed_by_server(sock)
    finally:
        sock.close()
    assert _serves(lane_server)


def _send_ignoring_errors(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server stopped reading and closed: what the test expects


def _raw_call(sock: socket.socket) -> int:
    send_frame(sock, scale_request().SerializeToString())
    body = recv_frame(sock, 1 << 20)
    assert body is not None
    return body[0]


def test_lane_connections_are_bounded(model_repo: Path, tmp_path: Path, wait_until) -> None:
    server = ServerProcess(model_repo, tmp_path, "--lane-max-connections", "2").start()
    socks: list[socket.socket] = []
    try:
        socks += [_connect(server) for _ in range(2)]
        assert [_raw_call(sock) for sock in socks] == [0, 0]
        extra = _connect(server)  # the kernel queues it; the server closes it at once
        socks.append(extra)
        assert _closed_by_server(extra)
        socks[0].close()

        def a_new_connection_is_served() -> bool:
            sock = _connect(server)
            socks.append(sock)
            try:
                return _raw_call(sock) == 0
            except (OSError, AssertionError):
                return False

        assert wait_until(a_new_connection_is_served, timeout=15), "a freed connection slot never came back"
    finally:
        for sock in socks:
            sock.close()
        assert server.stop() == 0


DYING_CALLER = textwrap.dedent(
    """
    import socket, sys
    from shm_client.shared.framing import recv_frame, send_frame
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    send_frame(sock, sys.stdin.buffer.read())
    recv_frame(sock, 1 << 30)  # about a day: the test kills this process first
    """
)


def _shm_input(request: pb.ModelInferRequest, name: str, datatype: str, shape: list[int], offset: int,
               size: int) -> None:
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    tensor.parameters["shared_memory_region"].string_param = "lane-dying"
    tensor.parameters["shared_memory_offset"].int64_param = offset
    tensor.parameters["shared_memory_byte_size"].int64_param = size


def test_a_lane_caller_killed_mid_call_has_its_call_cancelled(lane_server: ServerProcess, wait_until) -> None:
    stub = v2_stub(lane_server.unix_target)
    with owned_segments(PREFIX) as make:
        segment = make("inputs", 4096)
        segment.write(np.ones(4, np.float32).tobytes())
        segment.write(np.zeros(1, np.int32).tobytes(), offset=64)  # a gate nobody opens
        stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="lane-dying", key="/" + segment.key, byte_size=4096),
            timeout=10,
        )
        request = pb.ModelInferRequest(model_name="gate")
        _shm_input(request, "x", "FP32", [4], 0, 16)
        _shm_input(request, "gate", "INT32", [1], 64, 4)
        caller = subprocess.Popen(
            [sys.executable, "-c", DYING_CALLER, str(lane_server.lane_path)],
            stdin=subprocess.PIPE, cwd=REPO_ROOT,
        )
        try:
            assert caller.stdin is not None
            caller.stdin.write(request.SerializeToString())
            caller.stdin.close()
            assert wait_until(lambda: in_flight(lane_server.unix_target, "gate") == 1, timeout=30), (
                "the call never started"
            )
            caller.kill()
            caller.wait(10)
            assert wait_until(lambda: in_flight(lane_server.unix_target, "gate") == 0, timeout=15), (
                "the run went on after its caller died"
            )
        finally:
            caller.kill()
            caller.wait(10)
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="lane-dying"), timeout=10)
    assert lane_server.alive() and _serves(lane_server)


def test_a_second_server_on_a_colliding_lane_path_refuses_to_start(model_repo: Path, tmp_path: Path) -> None:
    first = ServerProcess(model_repo, tmp_path).start()
    try:
        # "edgecow" and "edgecow.sock" share the stem, so both servers would put their lane at edgecow-lane.sock.
        second = ServerProcess(model_repo, tmp_path, "--socket", str(tmp_path / "edgecow")).start()
        assert second.wait(30) != 0
        assert f"another server is already listening on {first.lane_path}" in second.log
        assert "--no-local-lane" in second.log
        assert "loaded model" not in second.log  # refused before a minute of model loading
        assert not (tmp_path / "edgecow").exists()
        assert first.lane_path.is_socket() and _serves(first)
    finally:
        assert first.stop() == 0


def test_a_file_at_the_lane_path_is_neither_deleted_nor_served_over(model_repo: Path, tmp_path: Path) -> None:
    squatter = tmp_path / "edgecow-lane.sock"
    squatter.write_text("not a socket")
    server = ServerProcess(model_repo, tmp_path).start()
    assert server.wait(30) != 0
    assert "exists and is not a socket" in server.log
    assert squatter.read_text() == "not a socket"
    assert not server.socket.exists()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"lane_read_timeout": 0}, "lane_read_timeout"),
        ({"lane_read_timeout": "nan"}, "lane_read_timeout"),
        ({"lane_read_timeout": "inf"}, "lane_read_timeout"),
        ({"lane_max_connections": 0}, "lane_max_connections"),
        ({"lane_max_buffered_bytes": 0}, "lane_max_buffered_bytes"),
    ],
)
def test_lane_limits_that_cannot_work_are_refused(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(overrides=overrides, environ={})
