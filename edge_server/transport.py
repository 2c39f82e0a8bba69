"""What the transports share: the one ModelInfer adapter (only the framing differs) and bounded slots.

    adapter = InferAdapter(plane)
    message, raw = adapter.infer(adapter.decode(body), local=True, cancellation=Cancellation())
    slots.acquire(peer_host(context.peer())); ...; slots.release(...)   # RESOURCE_EXHAUSTED past a limit

The adapter turns a decoded request into the data plane's request (with the call's deadline and
cancellation), runs it, and hands back the response for the transport to encode. Whatever goes wrong
leaves it as an EdgecowError carrying its status code, so gRPC, its streams and the local lane answer
every failure the same way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import urllib.parse

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared.errors import EdgecowError, InvalidArgument, ResourceExhausted

from . import convert
from .dataplane import DataPlane
from .messages import Cancellation

log = logging.getLogger(__name__)


class InferAdapter:
    """ModelInfer for any transport: request in, (response message, raw outputs) out, EdgecowError on failure."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

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
        try:
            if isinstance(request, convert.SplitInferRequest):
                if request.error:
                    raise InvalidArgument(request.error)
                message, raw = request.message, request.raw
            else:
                message, raw = request, None
            infer_request = convert.to_infer_request(message, convert.deadline_for(message, transport_remaining), raw)
            infer_request.cancellation = cancellation
            return convert.from_infer_response(self.plane.infer(infer_request, local=local))
        except EdgecowError:
            raise
        except MemoryError:
            raise ResourceExhausted("the server ran out of memory for this call; send a smaller request") from None
        except Exception:
            log.exception("unexpected error in ModelInfer")
            raise EdgecowError("the call failed inside the server; see its log") from None


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
