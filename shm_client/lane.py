"""The client end of the local lane: one unix stream connection carrying framed ModelInfer calls.

    conn = LaneConnection("/run/edgecow/edgecow-lane.sock")
    status, body = conn.call(encoded_request, timeout=5.0)      # status 0 = OK, else a grpc.StatusCode value

The framing is in shm_client/shared/framing.py, which the server's end shares.
"""

from __future__ import annotations

import socket

from .shared.framing import CONNECT_TIMEOUT, MAX_REPLY_BYTES, REPLY_GRACE, FrameError, recv_frame, send_frame


class LaneConnection:
    """One client connection to a lane; not thread-safe (EdgeClient keeps one per thread)."""

    def __init__(self, path: str, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(connect_timeout)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise
        self._wait: float | None = connect_timeout  # the socket's timeout now

    def call(self, request: bytes, timeout: float | None = None) -> tuple[int, memoryview]:
        """Send one encoded request and wait for its (status, body): for ever without a `timeout`, else
        the call's own timeout and REPLY_GRACE for the answer to come back."""
        wait = None if timeout is None else timeout + REPLY_GRACE
        if wait != self._wait:  # setting it costs a system call; most callers keep one timeout
            self._sock.settimeout(wait)
            self._wait = wait
        send_frame(self._sock, request)
        try:
            body = recv_frame(self._sock, MAX_REPLY_BYTES)
        except FrameError as err:
            raise ConnectionError(f"the local lane broke its framing ({err})") from None
        if body is None:
            raise ConnectionError("the server closed the local lane")
        view = memoryview(body)
        return view[0], view[1:]

    def close(self) -> None:
        self._sock.close()
