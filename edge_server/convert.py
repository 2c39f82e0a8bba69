"""Protobuf messages <-> dataplane objects, both directions side by side.

    request = to_infer_request(proto_request, deadline=None)
    proto_response = from_infer_response(response)
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.message import DecodeError

from shm_client.shared import datatypes, wire
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared.errors import InvalidArgument

from .messages import INT64_MAX, Contents, InferRequest, InferResponse, InputTensor, RequestedOutput, ShmRef

if TYPE_CHECKING:  # the runtime imports onnxruntime; this module only reads a spec's fields
    from .runtime import TensorSpec

SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_SIZE = "shared_memory_byte_size"
CLASSIFICATION = "classification"


def _param_value(param: pb.InferParameter) -> object:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def to_shm_ref(params: Mapping[str, pb.InferParameter], what: str) -> ShmRef | None:
    """The shared-memory reference in a tensor's parameters, or None; INVALID_ARGUMENT if half-given."""
    if SHM_REGION not in params:
        if SHM_SIZE in params or SHM_OFFSET in params:
            raise InvalidArgument(f"{what} gives a shared-memory size or offset but no shared_memory_region")
        return None
    region = params[SHM_REGION]
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise InvalidArgument(f"{what}: shared_memory_region must be a non-empty string parameter")
    if SHM_SIZE not in params:
        raise InvalidArgument(f"{what}: shared_memory_byte_size is required with shared_memory_region")
    size = _int_param(params[SHM_SIZE], f"{what}: shared_memory_byte_size")
    offset = _int_param(params[SHM_OFFSET], f"{what}: shared_memory_offset") if SHM_OFFSET in params else 0
    return ShmRef(region.string_param, size, offset)


def _int_param(param: pb.InferParameter, what: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"{what} must be an integer parameter, not {kind or 'empty'}")
    value = param.int64_param if kind == "int64_param" else param.uint64_param
    if value < 0 or value > INT64_MAX:
        raise InvalidArgument(f"{what} must be between 0 and 2^63-1, not {value}")
    return value


# The element type each InferTensorContents field has in the proto: values are read straight into
# it (no Python list, no float64/int64 detour), and narrowed to the tensor's type after a range check.
_CONTENTS_DTYPES = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


_CONTENTS_CHUNK = 1 << 16


def to_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> Contents:
    """A tensor's typed `contents`, checked to be in its datatype's field but not decoded yet: the data
    plane decodes them once it has checked their count and size against the server's limits."""
    dt = datatypes.lookup(tensor.datatype)
    if dt.contents_field is None:
        raise InvalidArgument(f"input {tensor.name!r}: {dt.name} has no typed contents field; send it as raw bytes")
    for field, _ in tensor.contents.ListFields():
        if field.name != dt.contents_field:
            raise InvalidArgument(
                f"input {tensor.name!r} is {dt.name}, which travels in {dt.contents_field}, not {field.name}"
            )
    count = len(getattr(tensor.contents, dt.contents_field))
    # ByteSize is computed by protobuf without making the values into Python objects; for BYTES it
    # bounds the elements' data from above.
    data_bytes = tensor.contents.ByteSize() if dt.variable_size else count * dt.itemsize
    return Contents(count, data_bytes, lambda: to_contents_array(tensor))


def to_contents_array(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    """The values of a tensor sent as typed `contents`, as an array of its datatype. They are read in
    chunks into the result, so a narrower type (INT8 from int_contents) needs no full-size copy in the
    proto's type beside it."""
    dt = datatypes.lookup(tensor.datatype)
    assert dt.contents_field is not None  # to_contents checked it
    values = getattr(tensor.contents, dt.contents_field)
    if dt.variable_size:
        return np.fromiter(values, dtype=object, count=len(values))
    dtype = datatypes.numpy_dtype(dt)
    wire_dtype = _CONTENTS_DTYPES[dt.contents_field]
    limits = np.iinfo(dtype) if dtype.kind in "iu" and dtype != wire_dtype else None
    array = np.empty(len(values), dtype=dtype)
    remaining = iter(values)
    for start in range(0, len(values), _CONTENTS_CHUNK):
        chunk = np.fromiter(itertools.islice(remaining, _CONTENTS_CHUNK), dtype=wire_dtype)
        if limits is not None and (chunk.min() < limits.min or chunk.max() > limits.max):
            raise InvalidArgument(f"input {tensor.name!r}: contents hold values outside the range of {dt.name}")
        array[start : start + chunk.size] = chunk
    return array


def to_infer_request(
    request: pb.ModelInferRequest,
    deadline: float | None = None,
    raw_contents: Sequence[bytes | memoryview] | None = None,
) -> InferRequest:
    """Pair raw entries with inputs in order, read shm references and typed contents."""
    inputs = []
    raw = list(request.raw_input_contents) if raw_contents is None else list(raw_contents)
    uses_contents = False
    raw_users = 0
    for tensor in request.inputs:
        what = f"input {tensor.name!r}"
        shm = to_shm_ref(tensor.parameters, what)
        has_contents = tensor.HasField("contents") and bool(tensor.contents.ListFields())
        item = InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), shm=shm)
        if shm is not None and has_contents:
            raise InvalidArgument(f"{what} gives both a shared-memory region and contents; give one")
        if has_contents:
            uses_contents = True
            item.contents = to_contents(tensor)
        elif shm is None:
            if raw_users < len(raw):
                item.raw = raw[raw_users]
            raw_users += 1
        inputs.append(item)
    if raw and uses_contents:
        raise InvalidArgument("the request mixes raw_input_contents with typed contents; use one or the other")
    if raw and raw_users != len(raw):
        raise InvalidArgument(
            f"the request has {len(raw)} raw_input_contents entries for {raw_users} inputs that need one"
        )
    outputs = [to_requested_output(output) for output in request.outputs]
    return InferRequest(request.model_name, request.model_version, request.id, inputs, outputs, deadline)


def to_requested_output(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> RequestedOutput:
    """An output's shared-memory slot or classification count (Triton refuses both at once: the strings
    come back in the response)."""
    what = f"output {output.name!r}"
    shm = to_shm_ref(output.parameters, what)
    count = to_class_count(output.parameters, what)
    if shm is not None and count:
        raise InvalidArgument(
            f"{what} asks for both shared_memory_region and classification; classification results come back in "
            "the response, so drop one of the two"
        )
    return RequestedOutput(output.name, shm, count)


def to_class_count(params: Mapping[str, pb.InferParameter], what: str) -> int:
    """The `classification` parameter (how many top classes to return), 0 when absent."""
    if CLASSIFICATION not in params:
        return 0
    count = _int_param(params[CLASSIFICATION], f"{what}: classification")
    if count < 1:
        raise InvalidArgument(f"{what}: classification must be at least 1 (the number of top classes to return)")
    return count


def deadline_for(request: pb.ModelInferRequest, transport_remaining: float | None = None) -> float | None:
    """The monotonic deadline of a call: the nearer of the v2 `timeout` parameter and the transport's
    own (the gRPC deadline). A gRPC call without one reports about 2^63 s remaining, which means none
    (a timer that long cannot even start)."""
    return deadline_from(request_timeout(request), transport_remaining)


def deadline_from(timeout: float | None, transport_remaining: float | None) -> float | None:
    """deadline_for, given the `timeout` parameter in seconds."""
    limits = [transport_remaining, timeout]
    remaining = [t for t in limits if t is not None and t < threading.TIMEOUT_MAX]
    return time.monotonic() + min(remaining) if remaining else None


def request_timeout(request: pb.ModelInferRequest) -> float | None:
    """The v2 `timeout` parameter (microseconds) in seconds, or None."""
    if "timeout" not in request.parameters:
        return None
    value = _param_value(request.parameters["timeout"])
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument("parameter 'timeout' must be a non-negative integer number of microseconds")
    return value / 1e6 if value else None


# ModelInfer's answer as the transports send it: the message without its raw entries, and those entries.
InferReply = tuple[pb.ModelInferResponse, list[bytes | np.ndarray]]


def from_infer_response(response: InferResponse) -> InferReply:
    """The response message without its raw entries, and those entries: one per output in order, an
    empty one for an output in shared memory. The arrays are not copied here; see shm_client.shared.wire."""
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    raw: list[bytes | np.ndarray] = []
    for output in response.outputs:
        tensor = message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if output.array is None:
            assert output.shm is not None
            tensor.parameters[SHM_REGION].string_param = output.shm.region
            tensor.parameters[SHM_SIZE].int64_param = output.shm.byte_size
            tensor.parameters[SHM_OFFSET].int64_param = output.shm.offset
            raw.append(b"")
        elif output.array.dtype == object:
            raw.append(datatypes.encode_bytes(output.array))
        else:
            raw.append(output.array)
    return message, raw


def to_full_response(message: pb.ModelInferResponse, raw: Sequence[bytes | np.ndarray]) -> pb.ModelInferResponse:
    """The complete message (for the stream RPC, which goes through protobuf as usual)."""
    for entry in raw:
        message.raw_output_contents.append(entry if isinstance(entry, bytes) else np.ascontiguousarray(entry).tobytes())
    return message


def to_tensor_metadata(target: pb.ModelMetadataResponse.TensorMetadata, spec: TensorSpec) -> None:
    target.name = spec.name
    target.datatype = spec.datatype.name
    target.shape.extend(spec.shape)


@dataclass
class SplitInferRequest:
    """A ModelInferRequest whose raw tensors were cut out as views into the received bytes."""

    message: pb.ModelInferRequest
    raw: list[memoryview]
    error: str = ""


def decode_infer_request(data: bytes | bytearray) -> SplitInferRequest:
    """ModelInfer's request deserializer: never raises (gRPC would answer INTERNAL), flags instead."""
    try:
        rest, raw = wire.split_field(data, wire.RAW_INPUT_FIELD)
        return SplitInferRequest(pb.ModelInferRequest.FromString(rest), raw)
    except (wire.WireError, DecodeError):
        return SplitInferRequest(pb.ModelInferRequest(), [], "the request is not a well-formed ModelInferRequest")


def encode_infer_response(response: InferReply) -> bytes:
    message, raw = response
    return wire.join_field(message.SerializeToString(), wire.RAW_OUTPUT_FIELD, raw)
