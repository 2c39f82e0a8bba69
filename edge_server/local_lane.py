"""The server end of the local lane (see shm_client/lane.py): ModelInfer on a plain unix stream socket.

    lane = LocalLane(Path("/run/edgecow/edgecow-lane.sock"), plane, settings); lane.start(); ...; lane.stop()

A thin transport like grpc_service: frames in, DataPlane, frames out. One thread per connection (the
callers are the processes of this machine, and each keeps one connection per thread); calls on a
connection are sequential. Callers here are always local: the socket is a file in the runtime directory
with mode 0660, like the gRPC socket beside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path

import grpc

from shm_client import lane
from shm_client.errors import EdgecowError, InvalidArgument, ResourceExhausted

from . import convert
from .config import Settings
from .dataplane import DataPlane

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
_OK = b"\x00"


class LocalLane:
    """A listening unix socket whose connections each get a thread that runs their calls."""

    def __init__(self, path: Path, plane: DataPlane, settings: Settings) -> None:
        self.path = path
        self.plane = plane
        self.settings = settings
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale one; the gRPC socket beside it was checked for a live server
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o660)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, name="edgecow-lane", daemon=True).start()

    def stop(self) -> None:
        """Stop listening and close every connection (after the DataPlane has drained)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                if len(self._connections) >= MAX_CONNECTIONS:
                    conn.close()  # the client falls back to gRPC
                    continue
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="edgecow-lane-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    body = lane.recv_frame(conn, self.settings.max_request_bytes)
                except ValueError as err:
                    self._reply_error(conn, ResourceExhausted(str(err)))
                    return  # the rest of the oversized message cannot be skipped safely
                if body is None:
                    return
                self._handle(conn, body)
        except OSError:
            pass  # the client went away
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _handle(self, conn: socket.socket, body: bytearray) -> None:
        try:
            split = convert.decode_infer_request(body)
            if split.error:
                raise InvalidArgument(split.error)
            request = convert.to_infer_request(split.message, convert.deadline_for(split.message), split.raw)
            response = self.plane.infer(request, local=True)
            encoded = convert.encode_infer_response(convert.from_infer_response(response))
        except EdgecowError as err:
            self._reply_error(conn, err)
            return
        except Exception:  # one bad call must not end the connection's other calls
            log.exception("unexpected error on the local lane")
            self._reply_error(conn, EdgecowError("the call failed inside the server; see its log"))
            return
        lane.send_frame(conn, _OK, encoded)

    @staticmethod
    def _reply_error(conn: socket.socket, err: EdgecowError) -> None:
        code = err.code.value[0] if isinstance(err.code, grpc.StatusCode) else 13
        lane.send_frame(conn, bytes([code]), err.message.encode("utf-8", "replace"))

