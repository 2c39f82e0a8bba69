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

from collections.abc import Iterator, Sequence

import numpy as np

RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6  # ModelInferResponse.raw_output_contents
_VARINT, _FIXED64, _LENGTH_DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = range(6)
# protobuf's parser (upb) refuses a tag longer than 5 bytes or above 2^32-1, any varint longer than
# 10 bytes, and a length of 2^31-1 or more; a varint's bits past 64 are dropped. The codec follows
# the same rules so that it accepts exactly the messages protobuf accepts.
_MAX_TAG_BYTES = 5
_MAX_TAG = 2**32 - 1
_MAX_VARINT_BYTES = 10
_MAX_LENGTH = 2**31 - 2
_U64 = 2**64 - 1


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: memoryview, pos: int, limit: int = _MAX_VARINT_BYTES) -> tuple[int, int]:
    """The varint at `pos` (at most `limit` bytes) and the position after it."""
    value = shift = 0
    end = min(len(data), pos + limit)
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & _U64, pos
        shift += 7
    raise WireError("truncated or overlong varint")


def _tag(data: memoryview, pos: int) -> tuple[int, int]:
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    tag, pos = _varint(data, pos, _MAX_TAG_BYTES)
    if tag > _MAX_TAG:
        raise WireError("a field tag is larger than 32 bits")
    return tag, pos


def _skip(data: memoryview, pos: int, number: int, kind: int) -> int:
    """The position after the value of a field whose tag ended at `pos` (not bounds-checked for
    fixed-size values: the caller compares the result with the end)."""
    if number == 0:
        raise WireError("field number 0 is not allowed")
    if kind == _VARINT:
        return _varint(data, pos)[1]
    if kind == _LENGTH_DELIMITED:
        length, pos = _varint(data, pos)
        if length > _MAX_LENGTH:
            raise WireError("a length-delimited field is 2 GiB or longer")
        return pos + length
    if kind == _FIXED64:
        return pos + 8
    if kind == _FIXED32:
        return pos + 4
    if kind == _START_GROUP:
        return _skip_group(data, pos, number)
    raise WireError(f"wire type {kind} is not valid here")


def _skip_group(data: memoryview, pos: int, number: int) -> int:
    """The position after the end-group tag that closes group `number`, whose start tag ended at
    `pos`. Nested groups are followed with a stack, not recursion: a hostile message may nest
    deeply (protobuf itself then refuses the part handed to it, which keeps every group)."""
    end = len(data)
    open_groups = [number]
    while open_groups:
        if pos >= end:
            raise WireError("a group is not closed before the end of the message")
        tag, pos = _tag(data, pos)
        inner, kind = tag >> 3, tag & 7
        if kind == _END_GROUP:
            if inner != open_groups.pop():
                raise WireError("an end-group tag does not match its group")
            continue
        if kind == _START_GROUP:
            if inner == 0:
                raise WireError("field number 0 is not allowed")
            open_groups.append(inner)
            continue
        pos = _skip(data, pos, inner, kind)
        if pos > end:
            raise WireError("a field runs past the end of the message")
    return pos


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
    Raises WireError exactly where protobuf's own parser would refuse the framing; the fields
    kept are handed to protobuf unchanged, so it judges their contents itself. `field` written
    with another wire type is not cut: protobuf keeps it as an unknown field.
    """
    view = memoryview(data)
    pos, end = 0, len(view)
    kept_from = 0  # start of the run of kept bytes not yet added to `keep`
    keep: list[memoryview] = []
    found: list[memoryview] = []
    wanted = (field << 3) | _LENGTH_DELIMITED
    while pos < end:
        start = pos
        tag = view[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _tag(view, pos)
        if tag == wanted:
            length, pos = _varint(view, pos)
            if length > _MAX_LENGTH or pos + length > end:
                raise WireError("a field runs past the end of the message")
            if kept_from < start:
                keep.append(view[kept_from:start])
            found.append(view[pos : pos + length])
            pos += length
            kept_from = pos
            continue
        pos = _skip(view, pos, tag >> 3, tag & 7)
        if pos > end:
            raise WireError("a field runs past the end of the message")
    if kept_from < end:
        keep.append(view[kept_from:end])
    rest = keep[0].tobytes() if len(keep) == 1 else b"".join(keep)
    return rest, found


def fields(view: memoryview, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Each top-level field of the message in view[start:end], as (field number, wire type, start, end)
    of its value; a length-delimited value's span leaves out its length prefix. Values are not read,
    so a reader can walk a large message (an ONNX file through mmap) and open only the fields it needs.
    """
    end = len(view) if end is None else end
    pos = start
    while pos < end:
        tag, pos = _tag(view, pos)
        number, kind = tag >> 3, tag & 7
        if kind == _LENGTH_DELIMITED:
            if number == 0:
                raise WireError("field number 0 is not allowed")
            length, value = _varint(view, pos)
            if length > _MAX_LENGTH:
                raise WireError("a length-delimited field is 2 GiB or longer")
            stop = value + length
        else:
            value, stop = pos, _skip(view, pos, number, kind)
        if stop > end:
            raise WireError("a field runs past the end of the message")
        yield number, kind, value, stop
        pos = stop


def join_field(head: bytes, field: int, payloads: Sequence[bytes | memoryview | np.ndarray]) -> bytes:
    """`head` (an encoded message) followed by one `field` entry per payload, copying each payload once."""
    tag = encode_varint((field << 3) | _LENGTH_DELIMITED)
    parts: list[bytes | memoryview] = [head]
    for payload in payloads:
        if isinstance(payload, np.ndarray):
            # Flattened to bytes by numpy: memoryview.cast refuses a shape with a zero in it ([1, 0]).
            payload = np.ascontiguousarray(payload).reshape(-1).view(np.uint8).data
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        parts.append(tag + encode_varint(size))
        parts.append(payload)
    return b"".join(parts)
