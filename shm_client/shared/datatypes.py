"""THE table of v2 datatypes: wire string, numpy dtype, element size, ONNX type, typed-contents field.

    info = DATATYPES["FP16"]; info.numpy_dtype, info.itemsize        # float16, 2
    raw = encode_bytes(np.array([b"ab", b"c"], dtype=object))         # 4-byte LE lengths + bytes

Every other module asks this table; none keeps its own `if dtype == ...`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._proto import inference_pb2 as pb
from .errors import InvalidArgument, Unimplemented


@dataclass(frozen=True)
class DataType:
    """One v2 datatype and every name it goes by."""

    name: str  # the v2 wire string, e.g. "FP32"
    numpy_dtype: np.dtype | None  # None where numpy has no native type (BF16)
    itemsize: int  # bytes per element on the wire; 0 for BYTES (variable)
    onnx_type: str  # onnxruntime's type string, e.g. "tensor(float)"
    config_enum: int  # inference.DataType value used by ModelConfig
    contents_field: str | None  # InferTensorContents field that carries it, None if only raw

    @property
    def variable_size(self) -> bool:
        return self.itemsize == 0


def _dt(
    name: str, np_type: type[np.generic] | None, size: int, onnx: str, config: str, field: str | None
) -> DataType:
    enum = pb.DataType.Value(config)  # the model configuration's enum for this datatype
    return DataType(name, None if np_type is None else np.dtype(np_type), size, onnx, enum, field)


_TABLE = (
    _dt("BOOL", np.bool_, 1, "tensor(bool)", "TYPE_BOOL", "bool_contents"),
    _dt("UINT8", np.uint8, 1, "tensor(uint8)", "TYPE_UINT8", "uint_contents"),
    _dt("UINT16", np.uint16, 2, "tensor(uint16)", "TYPE_UINT16", "uint_contents"),
    _dt("UINT32", np.uint32, 4, "tensor(uint32)", "TYPE_UINT32", "uint_contents"),
    _dt("UINT64", np.uint64, 8, "tensor(uint64)", "TYPE_UINT64", "uint64_contents"),
    _dt("INT8", np.int8, 1, "tensor(int8)", "TYPE_INT8", "int_contents"),
    _dt("INT16", np.int16, 2, "tensor(int16)", "TYPE_INT16", "int_contents"),
    _dt("INT32", np.int32, 4, "tensor(int32)", "TYPE_INT32", "int_contents"),
    _dt("INT64", np.int64, 8, "tensor(int64)", "TYPE_INT64", "int64_contents"),
    _dt("FP16", np.float16, 2, "tensor(float16)", "TYPE_FP16", None),
    _dt("FP32", np.float32, 4, "tensor(float)", "TYPE_FP32", "fp32_contents"),
    _dt("FP64", np.float64, 8, "tensor(double)", "TYPE_FP64", "fp64_contents"),
    _dt("BYTES", np.object_, 0, "tensor(string)", "TYPE_STRING", "bytes_contents"),
    _dt("BF16", None, 2, "tensor(bfloat16)", "TYPE_BF16", None),
)

DATATYPES: dict[str, DataType] = {t.name: t for t in _TABLE}
_BY_ONNX: dict[str, DataType] = {t.onnx_type: t for t in _TABLE}
_BY_NUMPY: dict[np.dtype, DataType] = {t.numpy_dtype: t for t in _TABLE if t.numpy_dtype is not None}


def lookup(name: str) -> DataType:
    """The datatype for a v2 wire string; INVALID_ARGUMENT for a name that is not one."""
    try:
        return DATATYPES[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown datatype {name!r}; use one of {', '.join(DATATYPES)}"
        ) from None


def from_onnx(onnx_type: str) -> DataType:
    """The datatype for an onnxruntime type string such as 'tensor(float)'."""
    try:
        return _BY_ONNX[onnx_type]
    except KeyError:
        raise Unimplemented(f"onnx type {onnx_type} has no v2 datatype") from None


def from_numpy(dtype: np.dtype) -> DataType:
    """The datatype for a numpy dtype; str and bytes arrays map to BYTES."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return DATATYPES["BYTES"]
    try:
        return _BY_NUMPY[dtype.newbyteorder("=")]
    except KeyError:
        raise InvalidArgument(f"numpy dtype {dtype} has no v2 datatype") from None


def numpy_dtype(dt: DataType) -> np.dtype:
    """The numpy dtype that holds `dt`; UNIMPLEMENTED where numpy has none (BF16)."""
    if dt.numpy_dtype is None:
        raise Unimplemented(f"datatype {dt.name} is not supported by edgecow; convert the tensor to FP32 or FP16")
    return dt.numpy_dtype


def element_count(shape: Sequence[int]) -> int:
    """Number of elements in `shape`; INVALID_ARGUMENT for negative dims."""
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"shape {list(shape)} has a negative dimension; give every dimension's size")
        count *= dim
    return count


def byte_size(dt: DataType, shape: Sequence[int]) -> int:
    """Bytes a fixed-size tensor of `shape` takes on the wire."""
    return element_count(shape) * dt.itemsize


# ---------------------------------------------------------------------------------------------------
# BYTES: each element is a 4-byte little-endian length followed by that many bytes.

_LEN = struct.Struct("<I")
_MAX_ELEMENT = 2**32 - 1
_JOIN_FROM = 32  # mean element size from which encode_bytes joins rather than fills


def encode_bytes(array: np.ndarray) -> bytes:
    """Serialise a str/bytes/object array into the v2 BYTES layout (row-major).

    Short elements are filled into one buffer (the length prefixes in a few numpy passes, the data one
    copy each), so n of them cost a few words apiece rather than 2n small objects: 16M empty strings
    took 900 MB more than their 64 MB result. Long ones are joined, which copies each once and whose
    per-element objects are small beside the data.
    """
    items = [item.encode("utf-8") if isinstance(item, str) else bytes(item)
             for item in np.asarray(array, dtype=object).reshape(-1)]
    count = len(items)
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=count)
    if count and lengths.max() > _MAX_ELEMENT:
        raise InvalidArgument("a BYTES element is 4 GiB or larger, more than its 4-byte length prefix can give")
    data = int(lengths.sum())
    if data >= _JOIN_FROM * count:
        return b"".join([part for item in items for part in (_LEN.pack(len(item)), item)])
    out = np.empty(_LEN.size * count + data, dtype=np.uint8)
    starts = np.arange(0, _LEN.size * count, _LEN.size, dtype=np.int64)
    if count > 1:
        starts[1:] += np.cumsum(lengths[:-1])
    prefixes = lengths.astype("<u4").view(np.uint8).reshape(count, _LEN.size)
    for byte in range(_LEN.size):
        out[starts] = prefixes[:, byte]
        starts += 1
    view = out.data
    pos = 0
    for item in items:
        pos += _LEN.size
        if item:
            end = pos + len(item)
            view[pos:end] = item
            pos = end
    return out.tobytes()


def bytes_data_size(size: int, count: int) -> int:
    """The bytes of element data in a BYTES tensor of `size` bytes and `count` elements (all but the
    length prefixes); INVALID_ARGUMENT when `size` cannot even hold the prefixes, which refuses a
    shape of 2^31 elements before anything is allocated for them."""
    if count * _LEN.size > size:
        raise InvalidArgument(
            f"BYTES tensor is truncated: {count} elements need at least {count * _LEN.size} bytes of length "
            f"prefixes but it has {size} bytes"
        )
    return size - count * _LEN.size


def decode_bytes(buffer: bytes | memoryview, count: int) -> np.ndarray:
    """Parse `count` BYTES elements; INVALID_ARGUMENT if the buffer is truncated or has bytes left over."""
    view = memoryview(buffer)
    end = len(view)
    bytes_data_size(end, count)  # before the object array is allocated
    items = np.empty(count, dtype=object)
    unpack = _LEN.unpack_from
    pos = i = 0
    try:
        for i in range(count):
            (length,) = unpack(view, pos)
            pos += _LEN.size
            if not length:
                items[i] = b""  # the shared empty bytes object: empty elements cost only their slot
                continue
            stop = pos + length
            if stop > end:
                raise InvalidArgument(
                    f"BYTES tensor is truncated: element {i} claims {length} bytes but only {end - pos} remain"
                )
            items[i] = view[pos:stop].tobytes()
            pos = stop
    except struct.error:  # fewer than 4 bytes left where a length prefix should be
        raise InvalidArgument(
            f"BYTES tensor is truncated: element {i} of {count} has no 4-byte length prefix"
        ) from None
    if pos != end:
        raise InvalidArgument(
            f"BYTES tensor has {end - pos} bytes after its {count} elements; check the shape or the length prefixes"
        )
    return items


def to_bytes_array(array: np.ndarray) -> np.ndarray:
    """An object array of `bytes` from any str/bytes/object array (strings are UTF-8 encoded)."""
    flat = np.asarray(array, dtype=object).reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, item in enumerate(flat):
        out[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out.reshape(np.shape(array))
