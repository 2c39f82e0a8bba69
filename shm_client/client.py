"""EdgeClient: call an edgecow (or any KServe v2) server; shared memory when it is proven to work.

    with EdgeClient() as client:                       # finds the local server's socket by itself
        y = client.infer("identity", {"x": np.ones(1 << 20, np.float32)})["y"]

Transport: "auto" (default) uses POSIX shared memory only after the server has proven it sees this
process's shared memory (edgecow.v1 ProbeSharedMemory), otherwise raw bytes in gRPC messages. If a
shared-memory step fails later (say /dev/shm is full), that call goes over gRPC and the client logs it
once. Segments are pooled and reused, and removed on close() and at interpreter exit.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import secrets
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from .lane import LaneConnection
from .pool import SegmentPool
from .shared import datatypes, wire
from .shared._proto import edgecow_pb2, edgecow_pb2_grpc
from .shared._proto import inference_pb2 as pb
from .shared._proto import inference_pb2_grpc as pb_grpc
from .shared.errors import EdgecowError, InvalidArgument, from_rpc_error
from .shared.segments import CLIENT_PREFIX, Segment, process_alive, sweep_dead, unique_key

log = logging.getLogger("edgecow.client")

DEFAULT_TCP = "localhost:8001"
TRANSPORTS = ("auto", "shm", "grpc")
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_MAX_LEARNED_SIZES = 4096
# Seconds for the client's own housekeeping calls, which never carry the caller's timeout.
_PROBE_TIMEOUT = 5.0  # the shared-memory proof: a server that cannot answer it by then is used over gRPC
_REGISTER_TIMEOUT = 10.0  # registering maps and reserves the region on the server
_UNREGISTER_TIMEOUT = 2.0  # best effort: the server's reaper drops what a lost unregister leaves
_SLOT_TOO_SMALL = "its shared-memory slot has"  # the server's words for an output slot that is too small
_FALLBACK_CODES = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}


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


@dataclass
class _Lease:
    """Segments a call holds; with zero_copy the caller's result keeps them until released."""

    client: EdgeClient
    segments: list[Segment]

    def release(self) -> None:
        for segment in self.segments:
            self.client._pool.release(segment)
        self.segments = []


class ZeroCopyResult(dict):
    """Outputs as views into shared memory, valid until `release()` (or the end of a `with` block)."""

    def __init__(self, outputs: dict[str, np.ndarray], lease: _Lease) -> None:
        super().__init__(outputs)
        self._lease = lease

    def release(self) -> None:
        self.clear()
        self._lease.release()

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
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        self.target = resolve_target(target)
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
        self._model_infer = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=_encode_request,
            response_deserializer=_decode_response,
        )
        self._requested = transport
        self._transport: str | None = None if transport != "grpc" else "grpc"
        self._lock = threading.Lock()
        self._pool = SegmentPool()
        self._registered: set[str] = set()
        self._allocated: dict[str, Segment] = {}
        self._lane_path = ""  # the server's local lane, learned from the probe
        self._lane_local = threading.local()
        self._lane_connections: list[LaneConnection] = []
        self._metadata: dict[tuple[str, str], pb.ModelMetadataResponse] = {}
        self._sizes: dict[tuple, int] = {}
        self._warned = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _cleanup, self._pool)
        atexit.register(self._finalizer)
        if transport != "grpc":
            sweep_dead(CLIENT_PREFIX, process_alive)

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister this client's regions, remove its segments and close the channel."""
        if self._closed:
            return
        self._closed = True
        for name in list(self._registered):
            try:
                self._stub.SystemSharedMemoryUnregister(
                    pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=_UNREGISTER_TIMEOUT
                )
            except grpc.RpcError:
                pass  # the server drops registrations of vanished segments by itself
        self._registered.clear()
        with self._lock:
            connections, self._lane_connections = self._lane_connections, []
        for conn in connections:
            conn.close()
        self._finalizer()
        self._channel.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------------
    @property
    def transport(self) -> str:
        """"shm" or "grpc": what infer() uses, decided by a probe on first use."""
        if self._transport is None:
            with self._lock:
                if self._transport is None:
                    self._transport = self._probe()
        return self._transport

    def _probe(self) -> str:
        proven, reason = self._prove_shared_memory()
        if proven:
            return "shm"
        if self._requested == "shm":
            raise EdgecowError(f"shared memory with the server at {self.target} cannot be used: {reason}",
                               grpc.StatusCode.FAILED_PRECONDITION)
        log.debug("using gRPC transport: %s", reason)
        return "grpc"

    def _prove_shared_memory(self) -> tuple[bool, str]:
        token = secrets.token_bytes(32)
        try:
            probe = Segment.create(unique_key() + "-probe", len(token))
        except (OSError, EdgecowError) as err:
            return False, f"cannot create a shared-memory segment here ({err})"
        try:
            probe.write(token)
            reply = self._edgecow.ProbeSharedMemory(
                edgecow_pb2.ProbeSharedMemoryRequest(key=probe.key, token=token), timeout=_PROBE_TIMEOUT
            )
        except grpc.RpcError as err:
            return False, f"the server does not answer the shared-memory probe ({err.code().name})"
        finally:
            probe.close()
            probe.unlink()
        if not reply.matched:
            return False, reply.reason or "the server could not read this process's segment"
        try:
            beacon = Segment.open(reply.beacon_key, read_only=True)
        except EdgecowError as err:
            return False, f"this process cannot read the server's segment ({err})"
        try:
            seen = bytes(beacon.bytes_view(0, reply.beacon_byte_size))
        finally:
            beacon.close()
        if hashlib.sha256(seen).digest() != reply.beacon_sha256:
            return False, "the server's segment holds other bytes than it says"
        self._lane_path = reply.local_lane
        return True, ""

    # -- metadata --------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise EdgecowError("this EdgeClient is closed; make a new one", grpc.StatusCode.FAILED_PRECONDITION)

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        self._check_open()
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

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

    def metadata(self, model: str, version: str | int | None = None) -> dict[str, Any]:
        """Inputs and outputs of a model: {"name", "versions", "platform", "inputs": [...], "outputs": [...]}."""
        meta = self._model_metadata(model, "" if version is None else str(version))

        def tensors(items: Iterable[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

        return {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": meta.platform,
            "inputs": tensors(meta.inputs),
            "outputs": tensors(meta.outputs),
        }

    def _model_metadata(self, model: str, version: str) -> pb.ModelMetadataResponse:
        key = (model, version)
        meta = self._metadata.get(key)
        if meta is None:
            meta = self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=model, version=version))
            self._metadata[key] = meta
        return meta

    def status(self) -> edgecow_pb2.GetStatusResponse:
        """The server's edgecow status: models, providers, regions, process and system figures."""
        return self._call(self._edgecow.GetStatus, edgecow_pb2.GetStatusRequest())

    # -- zero-copy inputs ------------------------------------------------------------------------------
    def empty(self, shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
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
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0 or self.transport != "shm":
            return np.empty(shape, dtype)
        segment = self._pool.acquire(nbytes)
        # Views of the returned array keep `owner` alive (numpy points every view at it), so the
        # segment goes back to the pool only once no view of it is left.
        owner = np.frombuffer(segment.buffer, dtype=np.uint8, count=nbytes)
        with self._lock:
            self._allocated[segment.key] = segment
        weakref.finalize(owner, _return_allocated, weakref.ref(self), segment)
        return owner.view(dtype).reshape(shape)

    def _locate(self, array: np.ndarray) -> tuple[Segment, int] | None:
        """The segment made by empty() that holds `array` whole and contiguous, and the offset in it."""
        if not self._allocated or array.dtype == object or not array.flags.c_contiguous or not array.nbytes:
            return None
        start = array.ctypes.data
        with self._lock:
            segments = list(self._allocated.values())
        for segment in segments:
            base = segment.address()
            if base <= start and start + array.nbytes <= base + segment.size:
                return segment, start - base
        return None

    def _release_allocated(self, segment: Segment) -> None:
        with self._lock:
            self._allocated.pop(segment.key, None)
        self._pool.release(segment)

    # -- inference -------------------------------------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        version: str | int | None = None,
        *,
        zero_copy: bool = False,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run `model` on `inputs` ({name: array}); returns {output name: array}.

        `outputs` picks outputs (default: all). With `zero_copy=True` and the shm transport, outputs are
        views into shared memory in a ZeroCopyResult that must be released (or used in a `with`).
        """
        self._check_open()
        arrays = {name: _as_array(name, value) for name, value in inputs.items()}
        version = "" if version is None else str(version)
        if self.transport == "shm":
            try:
                return self._infer_shm(model, version, arrays, outputs, zero_copy, timeout)
            except _ShmFailure as failure:
                if not self._warned:
                    self._warned = True
                    log.warning("shared memory failed (%s); this call and later failures go over gRPC", failure)
        return self._infer_grpc(model, version, arrays, outputs, timeout)

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
        return {tensor.name: _from_raw(tensor, raw[i]) for i, tensor in enumerate(response.outputs)}

    def _infer_shm(
        self,
        model: str,
        version: str,
        arrays: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        zero_copy: bool,
        timeout: float | None,
    ) -> dict[str, np.ndarray]:
        lease = _Lease(self, [])
        try:
            request = self._request(model, version, arrays)
            shapes = tuple((name, array.shape) for name, array in arrays.items())
            # Outside the fallback below: an unknown model or version is the caller's error, not a
            # shared-memory failure, and must not be retried over gRPC with a misleading warning.
            meta = self._model_metadata(model, version)
            try:
                for tensor, array in zip(request.inputs, arrays.values()):
                    located = self._locate(array)
                    if located is not None:  # made by empty(): the server reads it where it is
                        segment, offset = located
                        self._register(segment)
                        _set_shm(tensor.parameters, segment.key, array.nbytes, offset)
                        continue
                    raw = datatypes.encode_bytes(array) if array.dtype == object else array
                    size = len(raw) if isinstance(raw, bytes) else array.nbytes
                    segment = self._segment(max(size, 1), lease)
                    segment.write(raw)
                    _set_shm(tensor.parameters, segment.key, size)
                out_segments = {}
                guessed = []  # output sizes taken from an earlier call rather than the model's shapes
                names = list(outputs) if outputs else [o.name for o in meta.outputs]
                specs = {o.name: o for o in meta.outputs}
                for name in names:
                    request_output = request.outputs.add(name=name)
                    size = self._output_size(model, version, specs.get(name), shapes)
                    if size is not None:
                        if any(d < 0 for d in specs[name].shape):
                            guessed.append((model, version, name, shapes))
                        segment = self._segment(max(size, 1), lease)
                        _set_shm(request_output.parameters, segment.key, size)
                        out_segments[name] = segment
            except (OSError, EdgecowError) as err:
                if isinstance(err, EdgecowError) and err.code not in _FALLBACK_CODES:
                    raise
                raise _ShmFailure(str(err)) from None
            try:
                response, raw = self._invoke(request, timeout)
            except EdgecowError as err:
                if err.code in _FALLBACK_CODES and "shared" in err.message:
                    self._forget_registrations()
                    raise _ShmFailure(err.message) from None
                if err.code == grpc.StatusCode.INVALID_ARGUMENT and _SLOT_TOO_SMALL in err.message and guessed:
                    # An output's size depends on the input values, not only on their shapes: forget the
                    # guess; this call goes over gRPC and teaches the size again.
                    for key in guessed:
                        self._sizes.pop(key, None)
                    raise _ShmFailure(err.message) from None
                raise
            results: dict[str, np.ndarray] = {}
            for i, tensor in enumerate(response.outputs):
                dt = datatypes.lookup(tensor.datatype)
                segment = out_segments.get(tensor.name)
                if segment is None:
                    results[tensor.name] = _from_raw(tensor, raw[i])
                    if not dt.variable_size:
                        if len(self._sizes) >= _MAX_LEARNED_SIZES:
                            self._sizes.clear()
                        self._sizes[(model, version, tensor.name, shapes)] = results[tensor.name].nbytes
                    continue
                view = segment.array(datatypes.numpy_dtype(dt), tuple(tensor.shape))
                results[tensor.name] = view if zero_copy else view.copy()
            if zero_copy:
                result = ZeroCopyResult(results, lease)
                lease = _Lease(self, [])
                return result
            return results
        finally:
            lease.release()

    def _invoke(
        self, request: pb.ModelInferRequest, timeout: float | None
    ) -> tuple[pb.ModelInferResponse, list[memoryview]]:
        """ModelInfer for a request whose tensors are in shared memory: on the local lane when the
        server offered one, else gRPC. Raises EdgecowError with the server's status code."""
        timeout = timeout if timeout is not None else self.timeout
        conn = self._lane_connection()
        if conn is not None:
            if timeout is not None:  # the server enforces it as the v2 `timeout` parameter (µs)
                request.parameters["timeout"].int64_param = max(1, int(timeout * 1e6))
            try:
                status, body = conn.call(_encode_request((request, [])), timeout)
            except TimeoutError:
                self._drop_lane_connection(conn)
                raise EdgecowError("the call did not finish in time", grpc.StatusCode.DEADLINE_EXCEEDED) from None
            except OSError:
                self._drop_lane_connection(conn)  # the server restarted or closed the lane: use gRPC
            else:
                if status == 0:
                    return _decode_response(body)
                raise EdgecowError(bytes(body).decode("utf-8", "replace"), _STATUS_BY_NUMBER.get(status))
        try:
            return self._model_infer((request, []), timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _lane_connection(self) -> LaneConnection | None:
        """This thread's connection to the local lane, made on first use; None without a lane."""
        if not self._lane_path:
            return None
        conn = getattr(self._lane_local, "conn", None)
        if conn is None:
            try:
                conn = LaneConnection(self._lane_path)
            except OSError as err:
                log.debug("local lane %s unusable (%s); using gRPC", self._lane_path, err)
                self._lane_path = ""
                return None
            self._lane_local.conn = conn
            with self._lock:
                self._lane_connections.append(conn)
        return conn

    def _drop_lane_connection(self, conn: LaneConnection) -> None:
        self._lane_local.conn = None
        with self._lock:
            if conn in self._lane_connections:
                self._lane_connections.remove(conn)
        conn.close()

    def _output_size(self, model: str, version: str, spec: Any, shapes: tuple) -> int | None:
        """Bytes to reserve for an output: exact for static shapes, else the size seen last time for
        the same input shapes, else None (the output comes back in the gRPC response)."""
        if spec is None:
            return None
        dt = datatypes.lookup(spec.datatype)
        if dt.variable_size:
            return None
        if all(d >= 0 for d in spec.shape):
            return datatypes.byte_size(dt, spec.shape)
        return self._sizes.get((model, version, spec.name, shapes))

    def _segment(self, size: int, lease: _Lease) -> Segment:
        segment = self._pool.acquire(size)
        lease.segments.append(segment)
        self._register(segment)
        return segment

    def _register(self, segment: Segment) -> None:
        if segment.key not in self._registered:
            request = pb.SystemSharedMemoryRegisterRequest(name=segment.key, key="/" + segment.key,
                                                           offset=0, byte_size=segment.size)
            try:
                self._stub.SystemSharedMemoryRegister(request, timeout=_REGISTER_TIMEOUT)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    # Its object was unlinked under us (a cleaner ran): a new segment serves the next call
                    # instead of this one failing the same way forever.
                    self._pool.discard(segment)
                if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise from_rpc_error(err) from None
            self._registered.add(segment.key)
        for evicted in self._pool.take_evicted():
            self._drop(evicted)

    def _drop(self, segment: Segment) -> None:
        if segment.key in self._registered:
            self._registered.discard(segment.key)
            try:
                self._stub.SystemSharedMemoryUnregister(
                    pb.SystemSharedMemoryUnregisterRequest(name=segment.key), timeout=_UNREGISTER_TIMEOUT
                )
            except grpc.RpcError:
                pass
        segment.close()
        segment.unlink()

    def _forget_registrations(self) -> None:
        """After the server lost our regions (a restart), register them again on next use."""
        self._registered.clear()


def _return_allocated(client_ref: weakref.ref, segment: Segment) -> None:
    client = client_ref()
    if client is not None:
        client._release_allocated(segment)


class _ShmFailure(Exception):
    """A shared-memory step failed; the call is repeated over gRPC."""


def _cleanup(pool: SegmentPool) -> None:
    pool.close()


def _as_array(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind in "US":
        array = array.astype(object)
    try:
        datatypes.from_numpy(array.dtype)
    except InvalidArgument:
        raise InvalidArgument(f"input {name!r} has dtype {array.dtype}, which has no v2 datatype") from None
    return array


def _set_shm(params: Any, key: str, size: int, offset: int = 0) -> None:
    params["shared_memory_region"].string_param = key
    params["shared_memory_byte_size"].int64_param = size
    if offset:
        params["shared_memory_offset"].int64_param = offset


def _to_raw(array: np.ndarray) -> bytes | np.ndarray:
    """What goes on the wire for one input: little-endian and contiguous (wire.join_field copies it once)."""
    if array.dtype == object:
        return datatypes.encode_bytes(array)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)


def _from_raw(tensor: Any, raw: bytes | memoryview) -> np.ndarray:
    """An output array over its raw bytes (a view into the response; copied only if misaligned)."""
    dt = datatypes.lookup(tensor.datatype)
    shape = tuple(tensor.shape)
    if dt.variable_size:
        return datatypes.decode_bytes(raw, datatypes.element_count(shape)).reshape(shape)
    array = np.frombuffer(raw, dtype=datatypes.numpy_dtype(dt)).reshape(shape)
    return array.copy() if array.ctypes.data % max(array.itemsize, 1) else array


def _encode_request(request: tuple[pb.ModelInferRequest, list[bytes | np.ndarray]]) -> bytes:
    message, raw = request
    return wire.join_field(message.SerializeToString(), wire.RAW_INPUT_FIELD, raw)


def _decode_response(data: bytes | memoryview) -> tuple[pb.ModelInferResponse, list[memoryview]]:
    rest, raw = wire.split_field(data, wire.RAW_OUTPUT_FIELD)
    return pb.ModelInferResponse.FromString(rest), raw
