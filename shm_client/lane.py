"""The local lane: ModelInfer over a plain unix stream socket, for callers whose tensors are in shared memory.

    conn = LaneConnection("/run/edgecow/edgecow-lane.sock")
    status, body = conn.call(encoded_request, timeout=5.0)      # status 0 = OK, else a grpc.StatusCode value

When the tensors travel through shared memory a request is a few hundred bytes, and a gRPC round trip
(HTTP/2 framing, grpcio's thread hand-offs) costs ~0.4 ms on a small edge CPU, far more than the model.
A unix socket round trip costs ~15 µs. The messages are the standard protobuf ModelInferRequest and
ModelInferResponse; only the framing differs:

    request:  u64 little-endian length, then the encoded ModelInferRequest
    response: u64 little-endian length, then one status byte (0 = OK, else the gRPC status code number),
              then the encoded ModelInferResponse (OK) or a UTF-8 message (error)

Everything else (registration, metadata, the probe that offers the lane) stays on gRPC.
"""

from __future__ import annotations

import socket
import struct

_LENGTH = struct.Struct("<Q")
_JOIN_BELOW = 1 << 16


def recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    """Exactly `size` bytes, or None when the peer closed the connection before sending any."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise ConnectionError("the peer closed the connection in the middle of a message")
        got += n
    return buffer


def send_frame(sock: socket.socket, *parts: bytes | memoryview) -> None:
    """One frame: the total length, then the parts (sent without joining them)."""
    sizes = [memoryview(part).nbytes for part in parts]
    header = _LENGTH.pack(sum(sizes))
    if sum(sizes) <= _JOIN_BELOW:
        sock.sendall(b"".join([header, *parts]))  # one system call for the common, small message
        return
    sock.sendall(header)
    for part in parts:
        sock.sendall(part)


def recv_frame(sock: socket.socket, limit: int) -> bytearray | None:
    """The next frame's body; None at a clean end of the connection; ValueError past `limit` bytes."""
    header = recv_exact(sock, _LENGTH.size)
    if header is None:
        return None
    (size,) = _LENGTH.unpack(header)
    if size > limit:
        raise ValueError(f"a {size}-byte message is over the limit of {limit} bytes")
    body = recv_exact(sock, size)
    if body is None:
        raise ConnectionError("the peer closed the connection in the middle of a message")
    return body


class LaneConnection:
    """One client connection to a lane; not thread-safe (EdgeClient keeps one per thread)."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise

    def call(self, request: bytes, timeout: float | None = None) -> tuple[int, memoryview]:
        """Send one encoded request and wait for its (status, body)."""
        self._sock.settimeout(timeout)
        send_frame(self._sock, request)
        body = recv_frame(self._sock, 1 << 62)
        if body is None:
            raise ConnectionError("the server closed the local lane")
        view = memoryview(body)
        return view[0], view[1:]

    def close(self) -> None:
        self._sock.close()
