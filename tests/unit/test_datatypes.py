"""The one datatype table and the BYTES codec in shm_client/datatypes.py.

    DATATYPES["FP16"].itemsize == 2; decode_bytes(encode_bytes(array), array.size)
"""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest

from shm_client.shared import datatypes
from shm_client.shared.datatypes import DATATYPES, decode_bytes, encode_bytes
from shm_client.shared.errors import InvalidArgument, Unimplemented

# The v2 names and wire sizes from the protocol, and the ModelConfig DataType enum values.
PROTOCOL = {
    "BOOL": (1, 1), "UINT8": (1, 2), "UINT16": (2, 3), "UINT32": (4, 4), "UINT64": (8, 5),
    "INT8": (1, 6), "INT16": (2, 7), "INT32": (4, 8), "INT64": (8, 9), "FP16": (2, 10),
    "FP32": (4, 11), "FP64": (8, 12), "BYTES": (0, 13), "BF16": (2, 14),
}


def test_table_holds_every_v2_datatype_with_its_size_and_enum() -> None:
    assert {name: (t.itemsize, t.config_enum) for name, t in DATATYPES.items()} == PROTOCOL
    for name, info in DATATYPES.items():
        assert info.name == name
        if info.numpy_dtype is not None and name != "BYTES":
            assert info.numpy_dtype.itemsize == info.itemsize
    assert DATATYPES["BYTES"].variable_size
    assert not DATATYPES["FP32"].variable_size


@pytest.mark.parametrize(
    ("numpy_type", "name"),
    [(np.bool_, "BOOL"), (np.uint8, "UINT8"), (np.uint64, "UINT64"), (np.int8, "INT8"), (np.int64, "INT64"),
     (np.float16, "FP16"), (np.float32, "FP32"), (np.float64, "FP64"), (np.object_, "BYTES"),
     (np.dtype("S3"), "BYTES"), (np.dtype("U2"), "BYTES"), (np.dtype(">f4"), "FP32")],
)
def test_numpy_dtypes_map_to_their_v2_name(numpy_type: object, name: str) -> None:
    assert datatypes.from_numpy(np.dtype(numpy_type)).name == name


def test_numpy_dtype_without_a_v2_name_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="complex128 has no v2 datatype"):
        datatypes.from_numpy(np.dtype(np.complex128))


@pytest.mark.parametrize(
    ("onnx_type", "name"),
    [("tensor(float)", "FP32"), ("tensor(double)", "FP64"), ("tensor(float16)", "FP16"),
     ("tensor(bfloat16)", "BF16"), ("tensor(string)", "BYTES"), ("tensor(bool)", "BOOL"),
     ("tensor(int64)", "INT64"), ("tensor(uint16)", "UINT16")],
)
def test_onnx_types_map_to_their_v2_name(onnx_type: str, name: str) -> None:
    assert datatypes.from_onnx(onnx_type).name == name


def test_onnx_type_without_a_v2_name_is_unimplemented() -> None:
    with pytest.raises(Unimplemented, match=r"tensor\(complex64\)") as raised:
        datatypes.from_onnx("tensor(complex64)")
    assert raised.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_lookup_of_an_unknown_name_lists_the_valid_ones() -> None:
    assert datatypes.lookup("INT16").numpy_dtype == np.int16
    with pytest.raises(InvalidArgument, match="unknown datatype 'fp32'; use one of BOOL") as raised:
        datatypes.lookup("fp32")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_bf16_has_no_numpy_dtype_and_says_what_to_use() -> None:
    with pytest.raises(Unimplemented, match=r"BF16 is not supported.*FP32 or FP16"):
        datatypes.numpy_dtype(DATATYPES["BF16"])
    assert datatypes.numpy_dtype(DATATYPES["FP16"]) == np.float16


def test_typed_contents_fields_follow_the_protocol() -> None:
    fields = {name: t.contents_field for name, t in DATATYPES.items()}
    assert fields["INT8"] == fields["INT16"] == fields["INT32"] == "int_contents"
    assert fields["UINT8"] == fields["UINT16"] == fields["UINT32"] == "uint_contents"
    assert fields["INT64"] == "int64_contents" and fields["UINT64"] == "uint64_contents"
    assert fields["BYTES"] == "bytes_contents" and fields["BOOL"] == "bool_contents"
    assert fields["FP16"] is None and fields["BF16"] is None


def test_element_count_and_byte_size() -> None:
    assert datatypes.element_count([]) == 1
    assert datatypes.element_count([2, 0, 5]) == 0
    assert datatypes.byte_size(DATATYPES["FP64"], [3, 4]) == 96
    with pytest.raises(InvalidArgument, match="negative dimension"):
        datatypes.element_count([2, -1])


def test_bytes_encoding_is_little_endian_length_then_data() -> None:
    raw = encode_bytes(np.array([b"ab", b"", "é"], dtype=object))
    assert raw == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"


@pytest.mark.parametrize(
    "items",
    [[b"hello", b"", b"\x00\xff" * 300], ["naïve", "文字", ""], [b"x" * 70000]],
    ids=["bytes", "str", "long"],
)
def test_bytes_round_trip(items: list) -> None:
    array = np.array(items, dtype=object)
    decoded = decode_bytes(encode_bytes(array), len(items))
    expected = [i.encode() if isinstance(i, str) else i for i in items]
    assert decoded.dtype == object
    assert decoded.tolist() == expected


def test_bytes_round_trip_keeps_row_major_order() -> None:
    array = np.array([[b"a", b"b", b"c"], [b"d", b"e", b"f"]], dtype=object)
    decoded = decode_bytes(encode_bytes(array), 6).reshape(2, 3)
    assert decoded.tolist() == array.tolist()
    assert decode_bytes(memoryview(encode_bytes(array)), 6).tolist() == array.reshape(-1).tolist()


def test_zero_bytes_elements_decode_from_an_empty_buffer() -> None:
    assert decode_bytes(b"", 0).shape == (0,)


@pytest.mark.parametrize(
    ("buffer", "count"),
    [
        (b"\x01\x00", 1),  # the length prefix itself is cut short
        (struct.pack("<I", 1) + b"a" + b"\x05\x00", 2),  # the second prefix is cut short
        (struct.pack("<I", 10) + b"abc", 1),  # the element claims more bytes than remain
        (struct.pack("<I", 2**32 - 1), 1),  # an absurd length
    ],
    ids=["short-prefix", "second-prefix", "short-data", "huge-length"],
)
def test_truncated_bytes_are_invalid(buffer: bytes, count: int) -> None:
    with pytest.raises(InvalidArgument, match="truncated") as raised:
        decode_bytes(buffer, count)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_huge_element_count_for_a_small_buffer_is_refused_not_allocated() -> None:
    with pytest.raises(InvalidArgument, match="truncated"):
        decode_bytes(b"\x00" * 8, 2**40)


def test_bytes_after_the_last_element_are_invalid() -> None:
    with pytest.raises(InvalidArgument, match="3 bytes after its 1 elements"):
        decode_bytes(encode_bytes(np.array([b"ok"], dtype=object)) + b"xyz", 1)


def test_to_bytes_array_encodes_strings_and_keeps_shape() -> None:
    out = datatypes.to_bytes_array(np.array([["a", "b"], ["ç", "d"]]))
    assert out.shape == (2, 2)
    assert out.tolist() == [[b"a", b"b"], ["ç".encode(), b"d"]]
