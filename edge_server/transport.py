"""What the transports share: the one ModelInfer adapter (only the framing differs) and bounded slots.

    adapter = InferAdapter(plane)
    message, raw = adapter.infer_body(body, local=True, cancellation=Cancellation())   # a message's bytes
    message, raw = adapter.infer(proto_request, local=False)                            # or a decoded one
    slots.acquire(peer_host(context.peer())); ...; slots.release(...)   # RESOURCE_EXHAUSTED past a limit

The adapter turns a request into the data plane's request (with the call's deadline and cancellation),
runs it, and hands back the response for the transport to encode. Whatever goes wrong leaves it as an
EdgecowError carrying its status code, so gRPC, its streams and the local lane answer every failure the
same way. A small request whose tensors are all in shared memory is decoded and checked once and then
remembered by its bytes (PREPARED_REQUESTS of them): callers repeat the same message call after call.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import urllib.parse
import weakref
from collections.abc import Callable

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared.errors import EdgecowError, InvalidArgument, ResourceExhausted

from . import convert
from .dataplane import DataPlane
from .messages import Cancellation, InferRequest

log = logging.getLogger(__name__)


class InferAdapter:
    """ModelInfer for any transport: request in, (response message, raw outputs) out, EdgecowError on failure."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self._prepared: dict[bytes, _Prepared] = {}
        self._prepared_lock = threading.Lock()

    @staticmethod
    def decode(body: bytes | bytearray) -> convert.SplitInferRequest:
        """A framed request's bytes as a message with its raw tensors cut out (never raises)."""
        return convert.decode_infer_request(body)

    def infer(
        self,
        request: convert.SplitInferRequest | pb.ModelInferRequest,
        *,
        local: bool,
        transport_remaining: float | None = None,
        cancellation: Cancellation | None = None,
    ) -> convert.InferReply:
        """Run one call. `transport_remaining` is the transport's own deadline in seconds (gRPC's);
        `cancellation` is cancelled by the transport when the caller goes away mid-call."""
        return self._guarded(lambda: self._request(request, transport_remaining, cancellation), local)

    def infer_body(
        self,
        body: bytes | bytearray,
        *,
        local: bool,
        cancellation: Cancellation,
        transport_remaining: float | None = None,
    ) -> convert.InferReply:
        """infer(decode(body)), with the decoding of a request whose tensors are all in shared memory
        remembered by its bytes: a caller sends the same small message call after call (same model,
        shapes and regions), and decoding it again costs more than a small model's run."""
        return self._guarded(lambda: self._request_from(body, cancellation, transport_remaining), local)

    @staticmethod
    def _request(
        request: convert.SplitInferRequest | pb.ModelInferRequest,
        transport_remaining: float | None,
        cancellation: Cancellation | None,
    ) -> InferRequest:
        if isinstance(request, convert.SplitInferRequest):
            if request.error:
                raise InvalidArgument(request.error)
            message, raw = request.message, request.raw
        else:
            message, raw = request, None
        infer_request = convert.to_infer_request(message, convert.deadline_for(message, transport_remaining), raw)
        infer_request.cancellation = cancellation
        return infer_request

    def _request_from(
        self, body: bytes | bytearray, cancellation: Cancellation, transport_remaining: float | None
    ) -> InferRequest:
        key = bytes(body) if len(body) <= PREPARED_MAX_BYTES else b""
        prepared = self._prepared.get(key) if key else None
        if prepared is None:
            split = self.decode(body)
            request = self._request(split, transport_remaining, cancellation)
            if key and not split.raw and all(t.shm is not None for t in request.inputs):
                request.memo = weakref.WeakKeyDictionary()
                self._remember(key, (request, convert.request_timeout(split.message)))
            return request
        template, timeout = prepared  # nothing in it changes from call to call but the deadline
        deadline = convert.deadline_from(timeout, transport_remaining)
        return InferRequest(template.model, template.version, template.id, template.inputs, template.outputs,
                            deadline, cancellation, template.memo)

    def _remember(self, key: bytes, prepared: _Prepared) -> None:
        with self._prepared_lock:
            if len(self._prepared) >= PREPARED_REQUESTS:
                del self._prepared[next(iter(self._prepared))]  # the oldest
            self._prepared[key] = prepared

    def _guarded(self, build: Callable[[], InferRequest], local: bool) -> convert.InferReply:
        """Build the request and run it; whatever goes wrong leaves as an EdgecowError."""
        try:
            return convert.from_infer_response(self.plane.infer(build(), local=local))
        except EdgecowError:
            raise
        except MemoryError:
            raise ResourceExhausted("the server ran out of memory for this call; send a smaller request") from None
        except Exception:
            log.exception("unexpected error in ModelInfer")
            raise EdgecowError("the call failed inside the server; see its log") from None


# Requests remembered by InferAdapter.infer_body, and the largest message remembered: one in shared
# memory takes a few hundred bytes, so the cache holds well under a megabyte.
PREPARED_REQUESTS = 256
PREPARED_MAX_BYTES = 4096
_Prepared = tuple[InferRequest, "float | None"]  # the checked request, and its v2 timeout in seconds


class Slots:
    """At most `total` holders at once, and at most `per_key` under one key (a caller's address).

    Streams hold a gRPC worker thread for as long as they are open, so without this bound a few idle
    streams would leave no worker for unary calls and health checks.
    """

    def __init__(self, total: int, per_key: int, what: str, total_setting: str, per_key_setting: str) -> None:
        self.total = total
        self.per_key = per_key
        self._what = what
        self._settings = (total_setting, per_key_setting)
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._count = 0

    def acquire(self, key: str) -> None:
        """Take one slot under `key`; ResourceExhausted at once when none is free. Give it back with
        release(key)."""
        with self._lock:
            if self._count >= self.total:
                raise ResourceExhausted(
                    f"the server already has its limit of {self.total} {self._what} open; close one, or have the "
                    f"operator raise {self._settings[0]}"
                )
            if self._held.get(key, 0) >= self.per_key:
                raise ResourceExhausted(
                    f"this caller already has its limit of {self.per_key} {self._what} open; close one, or have "
                    f"the operator raise {self._settings[1]}"
                )
            self._held[key] = self._held.get(key, 0) + 1
            self._count += 1

    def release(self, key: str) -> None:
        with self._lock:
            self._count -= 1
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]


def peer_host(peer: str) -> str:
    """A gRPC peer without its port ("ipv4:10.0.0.7"), so one machine's connections count together;
    every unix-socket caller is "unix" (gRPC does not tell them apart)."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return "unix"
    kind, _, address = peer.partition(":")
    host = urllib.parse.unquote(address).rsplit(":", 1)[0].strip("[]")
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return f"ipv4:{ip.ipv4_mapped}"  # the same machine over IPv4 and IPv6-mapped IPv4
        return f"{kind}:{ip}"
    return f"{kind}:{host}"
