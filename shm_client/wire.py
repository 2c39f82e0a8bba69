"""Large tensors in ModelInfer messages without protobuf copying them.

    rest, raws = split_field(data, RAW_INPUT_FIELD)          # raws: memoryviews into `data`, no copy
    data = join_field(head_bytes, RAW_OUTPUT_FIELD, arrays)  # each array copied once, into the result

protobuf's Python API copies a `bytes` field when a message is parsed, again when the field is read,
and again when a message is built and serialised, so a 64 MB tensor was copied five or six times per
call. A repeated bytes field is only tag + length + payload repeated at the top level of the message,
and protobuf accepts fields in any order, so the raw tensor fields are cut out of (or appended to) the
encoded message by hand and the rest goes through protobuf as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6  # ModelInferResponse.raw_output_contents
_LENGTH_DELIMITED = 2


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    end = len(data)
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def split_field(data: bytes | bytearray | memoryview, field: int) -> tuple[bytes, list[memoryview]]:
    """Cut every top-level occurrence of length-delimited `field` out of an encoded message.

    Returns the message without them (ready for protobuf) and the payloads as views into `data`.
    """
    view = memoryview(data)
    pos, end = 0, len(view)
    keep: list[memoryview] = []
    found: list[memoryview] = []
    while pos < end:
        start = pos
        key, pos = _varint(view, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            _, pos = _varint(view, pos)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == _LENGTH_DELIMITED:
            length, pos = _varint(view, pos)
            if number == field:
                if pos + length > end:
                    raise WireError("a field runs past the end of the message")
                found.append(view[pos : pos + length])
                pos += length
                continue
            pos += length
        else:
            raise WireError(f"unsupported wire type {kind}")
        if pos > end:
            raise WireError("a field runs past the end of the message")
        keep.append(view[start:pos])
    rest = keep[0].tobytes() if len(keep) == 1 else b"".join(keep)
    return rest, found


def join_field(head: bytes, field: int, payloads: Sequence[bytes | memoryview | np.ndarray]) -> bytes:
    """`head` (an encoded message) followed by one `field` entry per payload, copying each payload once."""
    tag = encode_varint((field << 3) | _LENGTH_DELIMITED)
    parts: list[bytes | memoryview] = [head]
    for payload in payloads:
        if isinstance(payload, np.ndarray):
            payload = memoryview(np.ascontiguousarray(payload)).cast("B")
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        parts.append(tag + encode_varint(size))
        parts.append(payload)
    return b"".join(parts)
