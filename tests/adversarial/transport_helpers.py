"""Helpers for the transport tests: systemd's side of $NOTIFY_SOCKET, idle streams, a TLS certificate.

    sd = Notify(tmp_path / "notify"); server = ServerProcess(..., env=sd.env(watchdog_usec=400_000))
    assert sd.wait_for_pings(3)

A module rather than a conftest: tests/conftest.py is imported as `conftest`, and a second one would clash.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from conftest import ServerProcess

from shm_client.shared._proto import edgecow_pb2, edgecow_pb2_grpc
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc


class Notify:
    """Collects the sd_notify datagrams a server sends, as systemd would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._pings = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def env(self, watchdog_usec: int) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(watchdog_usec)}

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            if "WATCHDOG=1" in data.decode().splitlines():
                with self._changed:
                    self._pings += 1
                    self._changed.notify_all()

    @property
    def pings(self) -> int:
        return self._pings

    def wait_for_pings(self, count: int, timeout: float = 15.0) -> bool:
        """Wait until `count` more WATCHDOG=1 than now have arrived."""
        with self._changed:
            target = self._pings + count
            return self._changed.wait_for(lambda: self._pings >= target, timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


def v2_stub(target: str) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))


def in_flight(target: str, model: str) -> int:
    """Calls of `model` the server is running now (ask over the unix socket: it sees every figure)."""
    reply = edgecow_pb2_grpc.EdgecowServiceStub(grpc.insecure_channel(target)).GetStatus(
        edgecow_pb2.GetStatusRequest(), timeout=10
    )
    return sum(m.in_flight for m in reply.models if m.name == model)


def scale_request(value: float = 1.0) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="scale", model_version="1")
    request.inputs.add(name="x", datatype="FP32", shape=[4])
    request.raw_input_contents.append(np.full(4, value, np.float32).tobytes())
    return request


def scale_answers(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    reply = stub.ModelInfer(scale_request(3.0), timeout=10)
    return np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [3.0] * 4


def live(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    try:
        return stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    except grpc.RpcError:
        return False


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


def lane_path(server: ServerProcess) -> Path:
    return server.socket.with_name(f"{server.socket.stem}-lane.sock")

