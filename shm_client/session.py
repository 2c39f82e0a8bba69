"""The shared-memory side of EdgeClient: proof, pooled segments, registrations, the local lane.

    session = ShmSession(stubs)                       # EdgeClient makes one; users never touch it
    proven, reason = session.prove()
    outputs, version = session.infer(model, version, arrays, meta, outputs=None, timeout=None)

Inputs are written into pooled segments (or read where they are, when empty() made them); outputs come back
as arrays that own the segment the server wrote: the segment returns to the pool when the array and every
view of it are gone, so a call copies nothing but its inputs (and nothing at all with empty()).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import grpc
import numpy as np

from .lane import LaneConnection
from .pool import SegmentPool
from .shared import datatypes, wire
from .shared._proto import edgecow_pb2, edgecow_pb2_grpc
from .shared._proto import inference_pb2 as pb
from .shared._proto import inference_pb2_grpc as pb_grpc
from .shared.errors import EdgecowError, from_rpc_error
from .shared.segments import Segment, unique_key

if TYPE_CHECKING:
    from google.protobuf.internal.containers import MessageMap

log = logging.getLogger("edgecow.client")

_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_MAX_LEARNED_SIZES = 4096
# Seconds for the session's own housekeeping calls, which never carry the caller's timeout.
PROBE_TIMEOUT = 5.0  # the shared-memory proof: a server that cannot answer it by then is used over gRPC
REGISTER_TIMEOUT = 10.0  # registering maps and reserves the region on the server
UNREGISTER_TIMEOUT = 2.0  # best effort: the server's reaper drops what a lost unregister leaves
# Requests remembered by _encoded, and answers by _decoded (a few hundred bytes each; the largest answer
# remembered is _REMEMBERED_ANSWER_BYTES).
_REMEMBERED_REQUESTS = 64
_REMEMBERED_ANSWERS = 64
_REMEMBERED_ANSWER_BYTES = 2048
_SLOT_TOO_SMALL = "its shared-memory slot has"  # the server's words for an output slot that is too small
# Answers that mean "shared memory does not work here", after which the call is repeated over gRPC.
_FALLBACK_CODES = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}

RawRequest: TypeAlias = tuple[pb.ModelInferRequest, list[bytes | np.ndarray]]
RawResponse: TypeAlias = tuple[pb.ModelInferResponse, list[memoryview]]
# A string: grpc's classes are generic only in its type stubs.
RawInfer: TypeAlias = "grpc.UnaryUnaryMultiCallable[RawRequest, RawResponse]"
LearnedKey = tuple[str, str, str, tuple[tuple[str, tuple[int, ...]], ...]]


@dataclass
class Stubs:
    """The gRPC entry points a session uses; EdgeClient builds them on its channel."""

    inference: pb_grpc.GRPCInferenceServiceStub
    edgecow: edgecow_pb2_grpc.EdgecowServiceStub
    model_infer: RawInfer  # ModelInfer with raw tensors kept out of protobuf (see shared.wire)


_Slot = tuple[str, int, int]  # a tensor's place in shared memory: segment key, byte size, offset


@dataclass(frozen=True)
class _Call:
    """What a call's request says, as a key: the same model, inputs and slots make the same bytes."""

    model: str
    version: str
    inputs: tuple[tuple[str, np.dtype, tuple[int, ...]], ...]  # name, dtype, shape
    slots: tuple[_Slot, ...]  # each input's place, in the order of `inputs`
    outputs: tuple[tuple[str, _Slot | None], ...]  # each output asked for, and its slot if it has one

    def message(self, timeout_us: int | None) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=self.model, model_version=self.version)
        for (name, dtype, shape), (key, size, offset) in zip(self.inputs, self.slots):
            tensor = request.inputs.add(name=name, datatype=datatypes.from_numpy(dtype).name, shape=shape)
            _set_shm(tensor.parameters, key, size, offset)
        for name, slot in self.outputs:
            requested = request.outputs.add(name=name)
            if slot is not None:
                _set_shm(requested.parameters, slot[0], slot[1], slot[2])
        if timeout_us is not None:
            request.parameters["timeout"].int64_param = timeout_us
        return request


class ShmFailure(Exception):
    """A shared-memory step failed; the call is repeated over gRPC."""


@dataclass
class _Lease:
    """Segments one call holds until it ends (inputs, and outputs the answer did not fill)."""

    pool: SegmentPool
    segments: list[Segment] = field(default_factory=list)

    def release(self) -> None:
        for segment in self.segments:
            self.pool.release(segment)
        self.segments = []


class ShmSession:
    """Everything EdgeClient keeps for the shared-memory transport. Thread-safe."""

    def __init__(self, stubs: Stubs) -> None:
        self._stubs = stubs
        self._lock = threading.Lock()
        self._pool = SegmentPool()
        self._registered: set[str] = set()
        self._owned: dict[str, Segment] = {}  # segments held by arrays handed to the caller
        self._lane_path = ""  # the server's local lane, learned from the proof
        self._lane_local = threading.local()
        self._lane_connections: list[LaneConnection] = []
        self._sizes: dict[LearnedKey, int] = {}
        self._answers: dict[bytes, RawResponse] = {}  # see _decoded; never handed to the caller
        self._requests: dict[tuple[_Call, int | None], bytes] = {}  # see _encoded
        # Runs on close(), when the session is collected, or at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, self._pool.close)

    # -- proof -----------------------------------------------------------------------------------------
    def prove(self) -> tuple[bool, str]:
        """Whether the server sees this process's shared memory and this process the server's; why not."""
        token = secrets.token_bytes(32)
        try:
            probe = Segment.create(unique_key() + "-probe", len(token))
        except (OSError, EdgecowError) as err:
            return False, f"cannot create a shared-memory segment here ({err})"
        try:
            probe.write(token)
            reply = self._stubs.edgecow.ProbeSharedMemory(
                edgecow_pb2.ProbeSharedMemoryRequest(key=probe.key, token=token), timeout=PROBE_TIMEOUT
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

    # -- arrays in shared memory -----------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array in a pooled segment that returns to the pool when no view is left."""
        nbytes = math.prod(shape) * dtype.itemsize
        return self._adopt(self._pool.acquire(nbytes), dtype, shape)

    def _adopt(self, segment: Segment, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """An array over the start of `segment` that owns it: the caller's until no view is left."""
        nbytes = math.prod(shape) * dtype.itemsize
        # Views of the returned array keep `owner` alive (numpy points every view at it), so the
        # segment goes back to the pool only once no view of it is left.
        owner = np.frombuffer(segment.buffer, dtype=np.uint8, count=nbytes)
        with self._lock:
            self._owned[segment.key] = segment
        weakref.finalize(owner, _give_back, weakref.ref(self), segment)
        return owner.view(dtype).reshape(shape)

    def _locate(self, array: np.ndarray) -> tuple[Segment, int] | None:
        """The segment of an array this session handed out (empty() or an output) that holds `array`
        whole and contiguous, and the offset in it."""
        if not self._owned or array.dtype == object or not array.flags.c_contiguous or not array.nbytes:
            return None
        start = array.ctypes.data
        with self._lock:
            segments = list(self._owned.values())
        for segment in segments:
            base = segment.address()
            if base <= start and start + array.nbytes <= base + segment.size:
                return segment, start - base
        return None

    def _give_back(self, segment: Segment) -> None:
        with self._lock:
            self._owned.pop(segment.key, None)
        self._pool.release(segment)

    # -- inference -------------------------------------------------------------------------------------
    def infer(
        self,
        model: str,
        version: str,
        arrays: Mapping[str, np.ndarray],
        meta: pb.ModelMetadataResponse,
        outputs: Sequence[str] | None,
        timeout: float | None,
    ) -> tuple[dict[str, np.ndarray], str]:
        """Run `model` on `arrays` with the tensors in shared memory; the output arrays and the model
        version that answered.

        Raises ShmFailure when shared memory does not work for this call (the caller repeats it over
        gRPC), EdgecowError for the caller's own errors (or for output slots sized from stale metadata).
        """
        lease = _Lease(self._pool)
        try:
            shapes = tuple((name, tuple(array.shape)) for name, array in arrays.items())
            try:
                inputs = self._place_inputs(arrays, lease)
                placed, wanted, guessed = self._place_outputs(model, version, meta, outputs, shapes, lease)
            except (OSError, EdgecowError) as err:
                if isinstance(err, EdgecowError) and err.code not in _FALLBACK_CODES:
                    raise
                raise ShmFailure(str(err)) from None
            call = _Call(model, version, tuple((name, array.dtype, shapes[i][1])
                                               for i, (name, array) in enumerate(arrays.items())),
                         tuple(inputs), tuple(wanted))
            try:
                response, raw = self._invoke(call, timeout)
            except EdgecowError as err:
                if err.code in _FALLBACK_CODES and "shared" in err.message:
                    self.forget_registrations()
                    raise ShmFailure(err.message) from None
                if err.code == grpc.StatusCode.INVALID_ARGUMENT and _SLOT_TOO_SMALL in err.message and guessed:
                    # An output's size depends on the input values, not only on their shapes: forget the
                    # guess; this call goes over gRPC and teaches the size again.
                    for learned in guessed:
                        self._sizes.pop(learned, None)
                    raise ShmFailure(err.message) from None
                raise
            return self._collect(response, raw, placed, lease, (model, version), shapes), response.model_version
        finally:
            lease.release()

    def forget_sizes(self, model: str) -> None:
        """Drop the output sizes learned for `model`: another version of it answers now."""
        with self._lock:
            self._sizes = {key: size for key, size in self._sizes.items() if key[0] != model}

    def _place_inputs(self, arrays: Mapping[str, np.ndarray], lease: _Lease) -> list[_Slot]:
        """Where each input is in shared memory: made by empty() or an earlier output, where it is;
        otherwise copied into a pooled segment."""
        slots = []
        for array in arrays.values():
            located = self._locate(array)
            if located is not None:  # the server reads it where it is
                segment, offset = located
                self._register(segment)
                slots.append((segment.key, array.nbytes, offset))
                continue
            data: bytes | np.ndarray = datatypes.encode_bytes(array) if array.dtype == object else array
            size = len(data) if isinstance(data, bytes) else array.nbytes
            segment = self._segment(max(size, 1), lease)
            segment.write(data)
            slots.append((segment.key, size, 0))
        return slots

    def _place_outputs(
        self,
        model: str,
        version: str,
        meta: pb.ModelMetadataResponse,
        outputs: Sequence[str] | None,
        shapes: tuple[tuple[str, tuple[int, ...]], ...],
        lease: _Lease,
    ) -> tuple[dict[str, Segment], list[tuple[str, _Slot | None]], list[LearnedKey]]:
        """A segment for each output whose size is known; every output asked for with its slot (None: it
        comes back in the answer); which of the sizes were learned, not exact."""
        placed: dict[str, Segment] = {}
        wanted: list[tuple[str, _Slot | None]] = []
        guessed: list[LearnedKey] = []
        specs = {o.name: o for o in meta.outputs}
        for name in list(outputs) if outputs else list(specs):
            spec = specs.get(name)
            learned: LearnedKey = (model, version, name, shapes)
            # An unknown output is asked for all the same: the server names it in its answer.
            size = None if spec is None else self._output_size(spec, learned)
            if spec is None or size is None:
                wanted.append((name, None))
                continue
            if any(d < 0 for d in spec.shape):
                guessed.append(learned)
            segment = self._segment(max(size, 1), lease)
            wanted.append((name, (segment.key, size, 0)))
            placed[name] = segment
        return placed, wanted, guessed

    def _collect(
        self,
        response: pb.ModelInferResponse,
        raw: list[memoryview],
        placed: dict[str, Segment],
        lease: _Lease,
        key: tuple[str, str],
        shapes: tuple[tuple[str, tuple[int, ...]], ...],
    ) -> dict[str, np.ndarray]:
        """The answer's arrays: those in shared memory own their segment, the rest come from the message."""
        results: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(response.outputs):
            dt = datatypes.lookup(tensor.datatype)
            segment = placed.get(tensor.name)
            if segment is None:
                results[tensor.name] = from_raw(tensor, raw[i])
                if not dt.variable_size:
                    if len(self._sizes) >= _MAX_LEARNED_SIZES:
                        self._sizes.clear()
                    self._sizes[(*key, tensor.name, shapes)] = results[tensor.name].nbytes
                continue
            lease.segments.remove(segment)  # the array owns it from here
            results[tensor.name] = self._adopt(segment, datatypes.numpy_dtype(dt), tuple(tensor.shape))
        return results

    def _invoke(self, call: _Call, timeout: float | None) -> tuple[pb.ModelInferResponse, list[memoryview]]:
        """ModelInfer for a call whose tensors are in shared memory: on the local lane when the server
        offered one, else gRPC. Raises EdgecowError with the server's status code."""
        conn = self._lane_connection()
        if conn is not None:
            # The server enforces the timeout as the v2 `timeout` parameter (µs).
            timeout_us = None if timeout is None else max(1, int(timeout * 1e6))
            try:
                status, body = conn.call(self._encoded(call, timeout_us), timeout)
            except TimeoutError:
                self._drop_lane_connection(conn)
                raise EdgecowError("the call did not finish in time", grpc.StatusCode.DEADLINE_EXCEEDED) from None
            except OSError:
                self._drop_lane_connection(conn)  # the server restarted or closed the lane: use gRPC
            else:
                if status == 0:
                    return self._decoded(body)
                raise EdgecowError(bytes(body).decode("utf-8", "replace"), _STATUS_BY_NUMBER.get(status))
        try:
            return self._stubs.model_infer((call.message(None), []), timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _encoded(self, call: _Call, timeout_us: int | None) -> bytes:
        """The call's request as the lane sends it, remembered: a caller repeats the same model, shapes
        and segments call after call, so the same bytes serve again."""
        key = (call, timeout_us)
        body = self._requests.get(key)
        if body is None:
            body = encode_request((call.message(timeout_us), []))
            if len(self._requests) >= _REMEMBERED_REQUESTS:
                self._requests.clear()
            self._requests[key] = body
        return body

    def _decoded(self, body: memoryview) -> RawResponse:
        """decode_response, remembered for a small answer whose outputs are all in shared memory: such
        an answer is the same bytes call after call (same outputs, shapes and segments)."""
        if body.nbytes > _REMEMBERED_ANSWER_BYTES:
            return decode_response(body)
        key = bytes(body)
        known = self._answers.get(key)
        if known is None:
            response, raw = decode_response(key)
            if any(entry.nbytes for entry in raw):
                return response, raw
            if len(self._answers) >= _REMEMBERED_ANSWERS:
                self._answers.clear()
            known = self._answers[key] = (response, raw)
        return known

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

    def _output_size(self, spec: pb.ModelMetadataResponse.TensorMetadata, learned: LearnedKey) -> int | None:
        """Bytes to reserve for an output: exact for static shapes, else the size seen last time for
        the same input shapes, else None (the output comes back in the gRPC response)."""
        dt = datatypes.lookup(spec.datatype)
        if dt.variable_size:
            return None
        if all(d >= 0 for d in spec.shape):
            return datatypes.byte_size(dt, spec.shape)
        return self._sizes.get(learned)

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
                self._stubs.inference.SystemSharedMemoryRegister(request, timeout=REGISTER_TIMEOUT)
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
                self._stubs.inference.SystemSharedMemoryUnregister(
                    pb.SystemSharedMemoryUnregisterRequest(name=segment.key), timeout=UNREGISTER_TIMEOUT
                )
            except grpc.RpcError:
                pass
        segment.close()
        segment.unlink()

    def forget_registrations(self) -> None:
        """After the server lost our regions (a restart), register them again on next use."""
        self._registered.clear()

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister this session's regions, close its lane connections, unlink its segments.

        Arrays still held by the caller stay valid: their mappings go when the last view does.
        """
        for name in list(self._registered):
            try:
                self._stubs.inference.SystemSharedMemoryUnregister(
                    pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=UNREGISTER_TIMEOUT
                )
            except grpc.RpcError:
                pass  # the server drops registrations of vanished segments by itself
        self._registered.clear()
        with self._lock:
            connections, self._lane_connections = self._lane_connections, []
        for conn in connections:
            conn.close()
        self._finalizer()


def _give_back(session_ref: weakref.ref[ShmSession], segment: Segment) -> None:
    session = session_ref()
    if session is not None:
        session._give_back(segment)


def _set_shm(params: MessageMap[str, pb.InferParameter], key: str, size: int, offset: int = 0) -> None:
    params["shared_memory_region"].string_param = key
    params["shared_memory_byte_size"].int64_param = size
    if offset:
        params["shared_memory_offset"].int64_param = offset


def from_raw(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes | memoryview) -> np.ndarray:
    """An output array over its raw bytes (a view into the response; copied only if misaligned)."""
    dt = datatypes.lookup(tensor.datatype)
    shape = tuple(tensor.shape)
    if dt.variable_size:
        return datatypes.decode_bytes(raw, datatypes.element_count(shape)).reshape(shape)
    array = np.frombuffer(raw, dtype=datatypes.numpy_dtype(dt)).reshape(shape)
    return array.copy() if array.ctypes.data % max(array.itemsize, 1) else array


def encode_request(request: RawRequest) -> bytes:
    message, raw = request
    return wire.join_field(message.SerializeToString(), wire.RAW_INPUT_FIELD, raw)


def decode_response(data: bytes | memoryview) -> RawResponse:
    rest, raw = wire.split_field(data, wire.RAW_OUTPUT_FIELD)
    return pb.ModelInferResponse.FromString(rest), raw
