"""The one error type of edgecow, on both sides of the wire.

    try: client.infer("add", {"a": a})
    except EdgecowError as err: print(err.code.name, err)   # e.g. NOT_FOUND, "model 'add' is not loaded..."
"""

from __future__ import annotations

import grpc


class EdgecowError(Exception):
    """An error with the gRPC status code it maps to; the message says what to fix in one sentence."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(EdgecowError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EdgecowError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EdgecowError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(EdgecowError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(EdgecowError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(EdgecowError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(EdgecowError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(EdgecowError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(EdgecowError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(EdgecowError):
    code = grpc.StatusCode.ABORTED


class ServerUnreachable(Unavailable):
    """No server listens at the target: the call never reached one. `target` is the address tried, once
    the client has said so in the message ("" while the message is still gRPC's own)."""

    def __init__(self, message: str, target: str = "") -> None:
        super().__init__(message)
        self.target = target

    @property
    def cause(self) -> str:
        """What the connection attempt ran into, e.g. "Connection refused" or "Permission denied"."""
        return self.message.rpartition(": ")[2].strip() or self.message


# What gRPC says when it could not connect at all, as opposed to a server answering UNAVAILABLE.
_NOT_CONNECTED = "failed to connect to all addresses"


def from_rpc_error(err: grpc.RpcError) -> EdgecowError:
    """The EdgecowError a failed call stands for, keeping the server's code and message."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE and _NOT_CONNECTED in (details or ""):
        return ServerUnreachable(details or _NOT_CONNECTED)
    return EdgecowError(details or str(code), code)
