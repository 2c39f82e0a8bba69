"""The local lane's framing, shared by its client end (shm_client/lane.py) and server end (edge_server/local_lane.py).

    send_frame(sock, encoded_request)
    body = recv_frame(sock, limit=1 << 20, read_timeout=5.0)   # None at a clean end of the connection

The lane carries ModelInfer over a plain unix stream socket, for callers whose tensors are in shared memory.
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

import select
import socket
import struct
import time
from collections.abc import Callable

_LENGTH = struct.Struct("<Q")
_JOIN_BELOW = 1 << 16
FIRST_READ = 4096  # the first read takes the header and, for a small frame, the whole body
FIRST_CHUNK = 1 << 16  # a body's first bytes are read in place; requests over shared memory fit in this
_STAGING = 1 << 18  # the rest arrives through a buffer this big, so the body grows only with what was received
CONNECT_TIMEOUT = 5.0  # seconds to reach the lane; a server that does not accept by then is not used
REPLY_GRACE = 5.0  # seconds past a call's own timeout to wait for the server's answer (it stops the call then)
MAX_REPLY_BYTES = 1 << 62  # replies are as large as the outputs; the buffer grows only with the bytes received


class FrameTooLarge(ValueError):
    """A frame header announced more bytes than the receiver accepts."""


class FrameError(ValueError):
    """The peer broke the framing (sent a second message before the answer to its first)."""


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


def recv_frame(
    sock: socket.socket,
    limit: int,
    read_timeout: float | None = None,
    on_grow: Callable[[int], object] | None = None,
) -> bytearray | None:
    """The next frame's body; None at a clean end of the connection; FrameTooLarge past `limit` bytes.

    A small frame (a request over shared memory, its answer) arrives in one system call: the first read
    takes up to FIRST_READ bytes, header and body. The lane is strictly one request, one answer, so bytes
    past the frame in that read mean the peer sent a second message without waiting: FrameError.
    A header that claims more than is sent costs no memory: the first FIRST_CHUNK bytes are read in
    place, the rest through a small buffer onto the body, which so grows only with the bytes that arrive;
    `on_grow(n)` is called before the receiver holds n more bytes (and may raise to refuse them). With
    `read_timeout` (on a blocking socket) the whole frame must arrive within that many seconds of its
    first byte, else TimeoutError; the wait for that first byte is not limited, so an idle connection may
    wait for its next request. Without it the socket's own timeout applies to each read.
    """
    first = bytearray(FIRST_READ)
    got = sock.recv_into(first)
    if got == 0:
        return None
    deadline = None if read_timeout is None else time.monotonic() + read_timeout
    if got < _LENGTH.size:
        _fill(sock, memoryview(first)[got : _LENGTH.size], deadline)
        got = _LENGTH.size
    (size,) = _LENGTH.unpack_from(first)
    if size > limit:
        raise FrameTooLarge(f"a {size}-byte message is over the limit of {limit} bytes")
    grow = on_grow or (lambda _: None)
    arrived = got - _LENGTH.size
    if arrived > size:
        raise FrameError("the peer sent another message before the answer to the last one")
    if arrived == size:  # the common, small message: one read
        grow(size)
        del first[got:]
        del first[: _LENGTH.size]  # bytearray drops a prefix in place
        return first
    grow(min(size, FIRST_CHUNK))
    body = bytearray(min(size, FIRST_CHUNK))
    body[:arrived] = memoryview(first)[_LENGTH.size : got]
    _fill(sock, memoryview(body)[arrived:], deadline)
    if len(body) == size:
        return body
    grow(min(size - len(body), _STAGING))
    staging = memoryview(bytearray(min(size - len(body), _STAGING)))
    while len(body) < size:
        n = _recv_some(sock, staging[: size - len(body)], deadline)
        grow(n)
        body += staging[:n]  # bytearray grows in place (realloc), so the copy is this one
    return body


def _fill(sock: socket.socket, view: memoryview, deadline: float | None) -> None:
    """Fill `view` from the socket; ConnectionError if the peer closes first, TimeoutError past `deadline`."""
    got = 0
    while got < len(view):
        got += _recv_some(sock, view[got:], deadline)


def _recv_some(sock: socket.socket, view: memoryview, deadline: float | None) -> int:
    """At least one byte into `view`; ConnectionError at the end of the stream, TimeoutError past `deadline`."""
    while True:
        if deadline is None:
            n = sock.recv_into(view)
        else:
            try:
                n = sock.recv_into(view, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                _wait_readable(sock, deadline)
                continue
        if n == 0:
            raise ConnectionError("the peer closed the connection in the middle of a message")
        return n


def _wait_readable(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    poller = select.poll()  # not select(): descriptors above 1023 are common in the server
    poller.register(sock, select.POLLIN)
    if remaining <= 0 or not poller.poll(remaining * 1000):
        raise TimeoutError("the rest of the message did not arrive in time")
