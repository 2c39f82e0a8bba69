"""The server end of the local lane (see shm_client/shared/framing.py): ModelInfer on a plain unix stream socket.

    lane = LocalLane(Path("/run/edgecow/edgecow-lane.sock"), InferAdapter(plane), settings)
    lane.start(); ...; lane.stop()

Only the framing is the lane's own: each call goes through the same InferAdapter as gRPC. One thread per
connection (the callers are the processes of this machine, and each keeps one connection per thread);
calls on a connection are sequential. Callers here are always local: the socket is a file in the runtime
directory with mode 0660, like the gRPC socket beside it.

What a caller can hold is bounded: connections (`lane_max_connections`), the bytes of requests being
read or run (`lane_max_buffered_bytes`, charged as they arrive, not as the header claims), and the time
a request may take to arrive once it has begun (`lane_read_timeout`). A caller that hangs up mid-call
has that call cancelled, as on gRPC.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc

from shm_client.shared import framing
from shm_client.shared.errors import EdgecowError, FailedPrecondition, InvalidArgument, ResourceExhausted

from . import convert
from .config import Settings
from .messages import Cancellation
from .transport import InferAdapter

log = logging.getLogger(__name__)

REPLY_FLUSH_TIMEOUT = 5.0  # seconds stop() waits for replies of calls the data plane has finished
BACKLOG = 64  # connections the kernel queues before accept(); callers connect once per thread
_OK = b"\x00"


class LocalLane:
    """A listening unix socket whose connections each get a thread that runs their calls."""

    def __init__(self, path: Path, adapter: InferAdapter, settings: Settings) -> None:
        self.path = path
        self.adapter = adapter
        self.settings = settings
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._answering = 0  # calls between their request and their reply being sent
        self._answered = threading.Condition(self._lock)
        self._buffers = ByteBudget(settings.lane_max_buffered_bytes)
        self._watcher = HangupWatcher()

    def start(self) -> None:
        """Listen on `path`, which the caller has cleared of a stale socket (see server._prepare_socket);
        anything there now belongs to someone else and is never removed."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
        except OSError as err:
            listener.close()
            if err.errno == errno.EADDRINUSE:
                raise FailedPrecondition(
                    f"{self.path} appeared while the server started; stop whatever made it, choose another "
                    "--socket, or pass --no-local-lane"
                ) from None
            raise
        os.chmod(self.path, 0o660)
        listener.listen(BACKLOG)
        self._listener = listener
        self._watcher.start()
        threading.Thread(target=self._accept, args=(listener,), name="edgecow-lane", daemon=True).start()

    def stop(self) -> None:
        """Stop listening and close every connection (after the DataPlane has drained)."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with self._lock:
            # The data plane has drained, but a call it finished may not have sent its reply yet: cutting
            # the connection now would lose an answer the server already computed.
            self._answered.wait_for(lambda: self._answering == 0, REPLY_FLUSH_TIMEOUT)
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._watcher.stop()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                if len(self._connections) >= self.settings.lane_max_connections:
                    conn.close()  # the client falls back to gRPC
                    continue
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="edgecow-lane-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        self._watcher.add(conn)
        try:
            while self._serve_one(conn):
                pass
        except OSError:
            pass  # the client went away
        except Exception:  # a bug must cost this connection, not the server
            log.exception("unexpected error on a local-lane connection")
        finally:
            self._watcher.discard(conn)
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _serve_one(self, conn: socket.socket) -> bool:
        """Read and answer one request; False when the connection is to be closed."""
        with self._buffers.account() as charge:
            try:
                body = framing.recv_frame(
                    conn, self.settings.max_request_bytes, self.settings.lane_read_timeout, charge
                )
            except framing.FrameTooLarge as err:
                self._reply_error(conn, ResourceExhausted(f"{err}; send the tensors through shared memory"))
                return False  # the rest of the oversized message cannot be skipped safely
            except framing.FrameError as err:
                self._reply_error(conn, InvalidArgument(f"{err}; send one request at a time and wait for its answer"))
                return False  # where the next message begins is lost
            except ResourceExhausted as err:
                self._reply_error(conn, err)
                return False
            except TimeoutError:
                log.info("a local-lane caller began a request and did not finish it within %ss; closed its "
                         "connection", self.settings.lane_read_timeout)
                return False
            if body is None:
                return False
            self._handle(conn, body)
        return True

    def _handle(self, conn: socket.socket, body: bytearray) -> None:
        with self._lock:
            self._answering += 1
        try:
            self._answer(conn, body)
        finally:
            with self._lock:
                self._answering -= 1
                self._answered.notify_all()

    def _answer(self, conn: socket.socket, body: bytearray) -> None:
        cancellation = Cancellation()
        try:
            with self._watcher.watching(conn, cancellation):
                result = self.adapter.infer_body(body, local=True, cancellation=cancellation)
        except EdgecowError as err:
            self._reply_error(conn, err)
            return
        framing.send_frame(conn, _OK, convert.encode_infer_response(result))

    @staticmethod
    def _reply_error(conn: socket.socket, err: EdgecowError) -> None:
        code = err.code.value[0] if isinstance(err.code, grpc.StatusCode) else grpc.StatusCode.INTERNAL.value[0]
        framing.send_frame(conn, bytes([code]), err.message.encode("utf-8", "replace"))


class ByteBudget:
    """Bytes that all connections together may hold; each request is charged as its buffer grows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def account(self) -> Iterator[_Charge]:
        """A charge for one request; what it took is given back when the block ends."""
        charge = _Charge(self)
        try:
            yield charge
        finally:
            with self._lock:
                self._used -= charge.taken

    def _take(self, size: int) -> None:
        with self._lock:
            if self._used + size > self.limit:
                raise ResourceExhausted(
                    f"the local lane already holds its limit of {self.limit} request bytes "
                    "(lane_max_buffered_bytes); retry, or send the tensors through shared memory"
                )
            self._used += size


class _Charge:
    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.taken = 0

    def __call__(self, size: int) -> None:
        self._budget._take(size)
        self.taken += size


class HangupWatcher:
    """One thread that cancels a lane call whose caller hangs up (closes the socket, or dies) mid-call.

    A caller sends nothing while it waits for its answer, so the end of its stream (EPOLLRDHUP) means no
    one will read the answer. A connection is in one epoll set, which serves them all, from add() to
    discard(), so a call costs no system call here; a hangup seen between calls is kept and cancels the
    next call at once. A caller that half-closes its socket after sending counts as gone (EdgeClient
    never does that).
    """

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._wake: tuple[int, int] | None = None
        self._connections: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._epoll = select.epoll()
        self._wake = os.pipe()
        self._epoll.register(self._wake[0], select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, args=(self._epoll, self._wake[0]),
                                        name="edgecow-lane-hangups", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None or self._wake is None:
            return
        os.write(self._wake[1], b"x")
        self._thread.join()
        with self._lock:  # a call still running past the grace period stops being watched
            assert self._epoll is not None
            self._epoll.close()
            self._epoll = None
            self._connections.clear()
        for fd in self._wake:
            os.close(fd)
        self._thread, self._wake = None, None

    def add(self, conn: socket.socket) -> None:
        """Watch `conn` until discard(conn), which comes before it is closed."""
        with self._lock:
            if self._epoll is not None:  # None once the lane has stopped
                self._connections[conn.fileno()] = _Watched(conn)
                self._epoll.register(conn.fileno(), select.EPOLLRDHUP)

    def discard(self, conn: socket.socket) -> None:
        with self._lock:
            watched = self._connections.pop(conn.fileno(), None)
            if watched is not None and not watched.hung_up and self._epoll is not None:
                self._epoll.unregister(conn.fileno())

    @contextlib.contextmanager
    def watching(self, conn: socket.socket, cancellation: Cancellation) -> Iterator[None]:
        """Cancel `cancellation` if the caller on `conn` hangs up before the block ends."""
        gone = False
        with self._lock:
            watched = self._connections.get(conn.fileno())
            if watched is not None:
                watched.call = cancellation
                gone = watched.hung_up
        if gone:
            cancellation.cancel()
        try:
            yield
        finally:
            if watched is not None:
                with self._lock:
                    watched.call = None

    def _run(self, epoll: select.epoll, wake: int) -> None:
        while True:
            for fd, _ in epoll.poll():
                if fd == wake:
                    return
                with self._lock:
                    watched = self._connections.get(fd)
                    # The event may be from a connection whose descriptor has since been reused: ask
                    # the socket that is watched now.
                    if watched is None or watched.hung_up or not _hung_up(watched.conn):
                        continue
                    watched.hung_up = True
                    epoll.unregister(fd)  # level-triggered: it would be reported again and again
                    call = watched.call
                if call is not None:
                    log.info("a local-lane caller hung up mid-call; cancelling the call")
                    call.cancel()


class _Watched:
    """A lane connection under the HangupWatcher, and the call running on it, if any."""

    __slots__ = ("call", "conn", "hung_up")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.call: Cancellation | None = None
        self.hung_up = False


def _hung_up(conn: socket.socket) -> bool:
    poller = select.poll()
    poller.register(conn, select.POLLRDHUP)  # POLLHUP and POLLERR are always reported as well
    return bool(poller.poll(0))
