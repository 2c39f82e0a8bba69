"""EdgeClient: call an edgecow (or any KServe v2) server; shared memory when it is proven to work.

    with EdgeClient() as client:                       # finds the local server's socket by itself
        y = client.infer("identity", {"x": np.ones(1 << 20, np.float32)})["y"]

Transport: "auto" (default) uses POSIX shared memory only after the server has proven it sees this
process's shared memory (edgecow.v1 ProbeSharedMemory), otherwise raw bytes in gRPC messages. If a
shared-memory step fails later (say /dev/shm is full), that call goes over gRPC and the client logs it
once. Segments are pooled and reused, and removed on close() and at interpreter exit.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from .session import ShmFailure, ShmSession, Stubs, decode_response, encode_request, from_raw
from .shared import datatypes
from .shared._proto import edgecow_pb2, edgecow_pb2_grpc
from .shared._proto import inference_pb2 as pb
from .shared._proto import inference_pb2_grpc as pb_grpc
from .shared.errors import EdgecowError, InvalidArgument, ServerUnreachable, from_rpc_error
from .shared.segments import CLIENT_PREFIX, process_alive, sweep_dead

log = logging.getLogger("edgecow.client")

DEFAULT_TCP = "localhost:8001"
TRANSPORTS = ("auto", "shm", "grpc")
# Seconds between shared-memory proofs while an "auto" client on a unix socket uses gRPC: the server may
# have started (or restarted with shared memory) since the last proof failed.
REPROBE_INTERVAL = 5.0
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def default_socket_candidates() -> list[Path]:
    """Where a local server's socket is looked for, in order (the server's own defaults)."""
    candidates = [Path("/run/edgecow/edgecow.sock")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "edgecow.sock")
    candidates.append(Path(f"/tmp/edgecow-{os.getuid()}") / "edgecow.sock")
    return candidates


def resolve_target(target: str | None = None) -> str:
    """A gRPC target: `target`, else $EDGECOW_TARGET, else the first local socket found, else TCP."""
    target = target or os.environ.get("EDGECOW_TARGET")
    if not target:
        for path in default_socket_candidates():
            if path.is_socket():
                return f"unix:{path}"
        return DEFAULT_TCP
    if target.startswith("unix://"):
        return "unix:" + target[len("unix://") :]
    if target.startswith("grpc://"):
        return target[len("grpc://") :]
    return target


_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class ZeroCopyResult(dict[str, np.ndarray]):
    """What `infer(..., zero_copy=True)` returned before every result owned its memory; kept so that code
    still runs. `release()` drops the arrays (their segments go back when no view is left)."""

    def release(self) -> None:
        self.clear()

    def __enter__(self) -> ZeroCopyResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class EdgeClient:
    """A client for one server. Thread-safe; use one per process and share it."""

    def __init__(
        self,
        target: str | None = None,
        *,
        transport: str = "auto",
        timeout: float | None = None,
        root_certificates: bytes | None = None,
        reprobe_interval: float = REPROBE_INTERVAL,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        if not reprobe_interval > 0:
            raise ValueError(f"reprobe_interval must be a positive number of seconds, not {reprobe_interval!r}")
        self.target = resolve_target(target)
        # Found by looking for the local sockets (none was there): an unreachable server names them too.
        self._searched = not (target or os.environ.get("EDGECOW_TARGET"))
        self.timeout = timeout
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self._channel = grpc.secure_channel(self.target, credentials, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._edgecow = edgecow_pb2_grpc.EdgecowServiceStub(self._channel)
        # ModelInfer with raw tensors kept out of protobuf's copies (see shm_client.shared.wire); the wire
        # format is the standard one, so any v2 server answers it.
        model_infer = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=encode_request,
            response_deserializer=decode_response,
        )
        self._model_infer = model_infer
        self._session = ShmSession(Stubs(self._stub, self._edgecow, model_infer))
        self._requested = transport
        self._transport: str | None = None if transport != "grpc" else "grpc"
        self._reprobe_interval = reprobe_interval
        self._next_probe = math.inf  # monotonic time of the next proof while on gRPC; inf = never
        self._lock = threading.Lock()
        self._metadata: dict[tuple[str, str], pb.ModelMetadataResponse] = {}
        self._warned = False
        self._closed = False
        if transport != "grpc":
            sweep_dead(CLIENT_PREFIX, process_alive)

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister this client's regions, remove its segments and close the channel."""
        if self._closed:
            return
        self._closed = True
        self._session.close()
        self._channel.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------------
    @property
    def transport(self) -> str:
        """"shm" or "grpc": what infer() uses, decided by a probe on first use.

        An "auto" client on a unix socket that fell back to gRPC proves again at most every
        `reprobe_interval` seconds; a shared-memory client proves again on the call after it lost its
        server, and one interval after a call had to fall back to gRPC.
        """
        if self._transport is None:
            with self._lock:
                if self._transport is None:
                    self._transport = self._probe()
        elif time.monotonic() >= self._next_probe and self._lock.acquire(blocking=False):
            # One thread proves; the others go on over gRPC meanwhile instead of waiting for it.
            try:
                if time.monotonic() >= self._next_probe:
                    self._transport = self._probe()
            finally:
                self._lock.release()
        return self._transport

    def _probe(self) -> str:
        proven, reason = self._session.prove()
        if proven:
            self._next_probe = math.inf
            return "shm"
        if self._requested == "shm":
            raise EdgecowError(f"shared memory with the server at {self.target} cannot be used: {reason}",
                               grpc.StatusCode.FAILED_PRECONDITION)
        log.debug("using gRPC transport: %s", reason)
        local = self.target.startswith("unix:")
        self._next_probe = time.monotonic() + self._reprobe_interval if local else math.inf
        return "grpc"

    def _lost_server(self, err: ServerUnreachable) -> EdgecowError:
        """What a call that found no server raises: the address(es) tried and how to start one. A client
        that used shared memory proves it again on its next call (a restarted server knows none of its
        regions, and may have started without shared memory)."""
        if self._requested != "grpc" and self._transport == "shm":
            self._session.forget_registrations()
            self._transport = None
        if err.target:
            return err
        tried = f"{self.target} ({err.cause})"
        if self._searched:
            sockets = ", ".join(str(path) for path in default_socket_candidates())
            tried += f", and there is no server socket at {sockets}"
        if err.cause.lower() == "permission denied":
            fix = ("this user may not use that socket: join the group that owns it (usually `edgecow`) and log "
                   "in again; `edgecow doctor` checks the rest")
        else:
            fix = "start the server with `edgecow serve`, or see why it stopped with `systemctl status edgecow`"
        return ServerUnreachable(f"no edgecow server answers at {tried}; {fix}", self.target)

    # -- metadata --------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise EdgecowError("this EdgeClient is closed; make a new one", grpc.StatusCode.FAILED_PRECONDITION)

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None = None,
    ) -> _Response:
        self._check_open()
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as err:
            error = from_rpc_error(err)
            if isinstance(error, ServerUnreachable):
                raise self._lost_server(error) from None
            raise error from None

    def ready(self, model: str | None = None, version: str | None = None) -> bool:
        """Whether the server (or `model`) is ready; False when the server cannot be reached."""
        try:
            if model is None:
                return self._call(self._stub.ServerReady, pb.ServerReadyRequest()).ready
            request = pb.ModelReadyRequest(name=model, version=version or "")
            return self._call(self._stub.ModelReady, request).ready
        except EdgecowError:
            return False

    def models(self) -> list[dict[str, str]]:
        """Every model the server knows: name, version, state and (when not ready) reason."""
        index = self._call(self._stub.RepositoryIndex, pb.RepositoryIndexRequest())
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in index.models]

    def load_model(self, model: str) -> None:
        """Load (or reload from disk) `model` on the server; only callers on the server's machine may."""
        self._call(self._stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=model))

    def unload_model(self, model: str) -> None:
        """Unload `model` on the server; only callers on the server's machine may."""
        self._call(self._stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=model))

    def reload_repository(self) -> str:
        """Have the server rescan its repository as SIGHUP does; returns what it serves afterwards."""
        return self._call(self._edgecow.ReloadRepository, edgecow_pb2.ReloadRepositoryRequest()).summary

    def metadata(self, model: str, version: str | int | None = None) -> dict[str, Any]:
        """Inputs and outputs of a model: {"name", "versions", "platform", "inputs": [...], "outputs": [...]},
        asked of the server each time (what infer() keeps of it is brought up to date too)."""
        meta = self._model_metadata(model, "" if version is None else str(version), fresh=True)

        def tensors(items: Iterable[pb.ModelMetadataResponse.TensorMetadata]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

        return {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": meta.platform,
            "inputs": tensors(meta.inputs),
            "outputs": tensors(meta.outputs),
        }

    def _model_metadata(self, model: str, version: str, fresh: bool = False) -> pb.ModelMetadataResponse:
        """ModelMetadata of `model` at `version` ("" = its default), from the cache unless `fresh`."""
        key = (model, version)
        meta = None if fresh else self._metadata.get(key)
        if meta is None:
            meta = self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=model, version=version))
            self._metadata[key] = meta
        return meta

    def _forget_model(self, model: str) -> None:
        """Another version of `model` answers now: what this client learned about it is stale."""
        for key in [key for key in list(self._metadata) if key[0] == model]:
            self._metadata.pop(key, None)
        self._session.forget_sizes(model)

    def status(self) -> edgecow_pb2.GetStatusResponse:
        """The server's edgecow status: models, providers, regions, process and system figures."""
        return self._call(self._edgecow.GetStatus, edgecow_pb2.GetStatusRequest())

    # -- zero-copy inputs ------------------------------------------------------------------------------
    def empty(self, shape: Sequence[int], dtype: npt.DTypeLike = np.float32) -> np.ndarray:
        """An uninitialised array that lives in this client's shared memory.

        Fill it and pass it (or a contiguous slice of it) to infer(): over shared memory the server reads
        it where it is, so the input costs no copy at all. The memory returns to the pool when the array
        and every view of it are gone. Without the shm transport it is an ordinary array.
        """
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        if dtype.kind == "O":
            raise InvalidArgument("BYTES tensors cannot be preallocated; pass them to infer() directly")
        datatypes.from_numpy(dtype)
        if math.prod(shape) == 0 or self.transport != "shm":
            return np.empty(shape, dtype)
        return self._session.empty(shape, dtype)

    # -- inference -------------------------------------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        *,
        zero_copy: bool = False,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run `model` on `inputs` ({name: array}); returns {output name: array}.

        `outputs` picks outputs (default: all). Over shared memory the arrays live in the segment the
        server wrote them to, which goes back to the pool once the array and its views are gone: no copy,
        nothing to release. `zero_copy=True` is accepted for older code and wraps the same arrays in a
        ZeroCopyResult.
        """
        self._check_open()
        arrays = {name: _as_array(name, value) for name, value in inputs.items()}
        version = "" if version is None else str(version)
        if self.transport == "shm":
            try:
                results = self._infer_shm(model, version, arrays, outputs,
                                          timeout if timeout is not None else self.timeout)
                return ZeroCopyResult(results) if zero_copy else results
            except ServerUnreachable as err:
                raise self._lost_server(err) from None
            except ShmFailure as failure:
                # Maybe the server lost shared memory (restarted with --no-shm, or in another namespace):
                # prove it again after the interval rather than fail over to gRPC on every call.
                self._next_probe = min(self._next_probe, time.monotonic() + self._reprobe_interval)
                if not self._warned:
                    self._warned = True
                    log.warning("shared memory failed (%s); this call and later failures go over gRPC", failure)
        results = self._infer_grpc(model, version, arrays, outputs, timeout)
        return ZeroCopyResult(results) if zero_copy else results

    def _infer_shm(
        self,
        model: str,
        version: str,
        arrays: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        timeout: float | None,
    ) -> dict[str, np.ndarray]:
        """One call over shared memory, its output slots sized from the cached metadata.

        The model may have been swapped since that was fetched (a hot swap to a version with larger,
        renamed or more outputs): an answer from another version than the one expected drops what was
        cached, and a call refused while the metadata has changed meanwhile is made again with the new one.
        """
        # Outside the caller's fallback: an unknown model or version is the caller's error, not a
        # shared-memory failure, and must not be retried over gRPC with a misleading warning.
        meta = self._model_metadata(model, version)
        try:
            results, answered = self._session.infer(model, version, arrays, meta, outputs, timeout)
        except EdgecowError as err:
            if err.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            fresh = self._model_metadata(model, version, fresh=True)
            if fresh == meta:
                raise  # the request is wrong, not what this client knew of the model
            self._session.forget_sizes(model)
            meta = fresh
            results, answered = self._session.infer(model, version, arrays, meta, outputs, timeout)
        expected = _expected_version(meta, version)
        if answered and expected and answered != expected:
            self._forget_model(model)
        return results

    def _request(self, model: str, version: str, arrays: Mapping[str, np.ndarray]) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        for name, array in arrays.items():
            dt = datatypes.from_numpy(array.dtype)
            request.inputs.add(name=name, datatype=dt.name, shape=array.shape)
        return request

    def _infer_grpc(
        self,
        model: str,
        version: str,
        arrays: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        timeout: float | None,
    ) -> dict[str, np.ndarray]:
        request = self._request(model, version, arrays)
        for name in outputs or ():
            request.outputs.add(name=name)
        response, raw = self._call(self._model_infer, (request, [_to_raw(a) for a in arrays.values()]), timeout)
        return {tensor.name: from_raw(tensor, raw[i]) for i, tensor in enumerate(response.outputs)}

def _expected_version(meta: pb.ModelMetadataResponse, version: str) -> str:
    """The version that answers a call for `version`: that one, or by default the highest one the
    metadata lists ("" when it lists none)."""
    if version:
        return version
    numbers = [int(v) for v in meta.versions if v.isascii() and v.isdigit()]
    return str(max(numbers)) if numbers else ""


def _as_array(name: str, value: npt.ArrayLike) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind in "US":
        array = array.astype(object)
    try:
        datatypes.from_numpy(array.dtype)
    except InvalidArgument:
        raise InvalidArgument(f"input {name!r} has dtype {array.dtype}, which has no v2 datatype") from None
    return array


def _to_raw(array: np.ndarray) -> bytes | np.ndarray:
    """What goes on the wire for one input: little-endian and contiguous (wire.join_field copies it once)."""
    if array.dtype == object:
        return datatypes.encode_bytes(array)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
