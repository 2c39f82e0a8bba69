"""The hand-written ModelInfer codec accepts exactly what protobuf's own parser accepts, and decodes it to
the same message: checked against the stock `ModelInferRequest.FromString` on generated messages (valid
fields, groups, overlong varints, stray tags, then flipped, cut and inserted bytes) and on a real server.

    pytest tests/adversarial/test_codec.py --hypothesis-show-statistics
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge_server.convert import decode_infer_request
from shm_client.shared import wire
from shm_client.shared._proto import inference_pb2 as pb
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py

# ---------------------------------------------------------------------------------------------------
# Encoding helpers: any varint, written in its shortest form or padded, or with bits past 64.


def varint(value: int, pad: int = 0) -> bytes:
    """`value` as a varint, `pad` bytes longer than it needs (continuation bytes holding zeros)."""
    out = bytearray(wire.encode_varint(value))
    if pad:
        out[-1] |= 0x80
        out += b"\x80" * (pad - 1) + b"\x00"
    return bytes(out)


def ten_byte_varint(value: int, high: int) -> bytes:
    """`value` (below 2^63) in 10 bytes whose last byte also holds `high` << 1: bits past 64, which
    protobuf drops."""
    out = bytearray()
    for _ in range(9):
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append((value & 1) | (high << 1))
    return bytes(out)


def tag(number: int, kind: int, pad: int = 0) -> bytes:
    return varint((number << 3) | kind, pad)


def stock(data: bytes) -> pb.ModelInferRequest | None:
    try:
        return pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return None


def assert_agrees(data: bytes) -> None:
    """decode_infer_request refuses what protobuf refuses and otherwise yields the same message."""
    expected = stock(data)
    got = decode_infer_request(data)
    if expected is None:
        assert got.error, f"the codec accepted a message protobuf refuses: {data.hex()}"
        return
    assert not got.error, f"the codec refused a message protobuf accepts: {data.hex()}"
    assert [bytes(raw) for raw in got.raw] == list(expected.raw_input_contents)
    rebuilt = pb.ModelInferRequest()
    rebuilt.CopyFrom(got.message)
    rebuilt.raw_input_contents.extend(bytes(raw) for raw in got.raw)
    assert rebuilt.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------------
# Strategies: a message is a list of encoded fields; a field is a tag and a value of any wire type.

def mostly(usual: st.SearchStrategy, rare: st.SearchStrategy, odds: int = 8) -> st.SearchStrategy:
    """`usual` about `odds` times in `odds + 1`: each field can break the whole message, so the breaking
    choices stay rare enough that about half of the messages are valid."""
    return st.sampled_from([usual] * odds + [rare]).flatmap(lambda chosen: chosen)


# The request's own fields (1 model_name .. 7 raw_input_contents) most often, so that known fields meet
# every wire type; then numbers up to the largest, and 0, which is never valid.
known_numbers = st.sampled_from([7, 5, 6, 1, 4, 2, 3, 8])
numbers = mostly(mostly(known_numbers, st.integers(9, 2**29 - 1), odds=3), st.just(0), odds=20)
pads = mostly(st.just(0), st.integers(1, 6), odds=4)
varint_values = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))
any_varint = mostly(
    st.builds(varint, varint_values, pads), st.builds(ten_byte_varint, st.integers(0, 2**63 - 1), st.integers(0, 63))
)
texts = st.text(max_size=6).map(str.encode)


def _map_entry(key: str, value: int) -> bytes:
    """One entry of the request's `parameters` map: key (field 1) and InferParameter (field 2)."""
    key_bytes = key.encode()
    param = pb.InferParameter(int64_param=value).SerializeToString()
    return tag(1, 2) + varint(len(key_bytes)) + key_bytes + tag(2, 2) + varint(len(param)) + param


def _input_tensor(name: str, dims: list[int]) -> bytes:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=dims).SerializeToString()


parameter = st.builds(_map_entry, st.text(max_size=3), st.integers(-(2**63), 2**63 - 1))
input_tensor = st.builds(_input_tensor, st.text(max_size=4), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3))
output_tensor = st.builds(lambda name: pb.ModelInferRequest.InferRequestedOutputTensor(name=name).SerializeToString(),
                          st.text(max_size=4))
# What each of the request's fields holds when it is length-delimited; anything else may hold any bytes.
PAYLOADS = {1: texts, 2: texts, 3: texts, 4: parameter, 5: input_tensor, 6: output_tensor}


def payloads(number: int) -> st.SearchStrategy[bytes]:
    return mostly(PAYLOADS.get(number, st.binary(max_size=12)), st.one_of(st.binary(max_size=12), input_tensor))


@st.composite
def length_delimited(draw: st.DrawFn, body: bytes) -> bytes:
    choice = draw(mostly(st.just("fits"), st.sampled_from(["past 64 bits", "wrong"]), odds=10))
    if choice == "past 64 bits":  # a length varint whose 10th byte has bits past 64
        return ten_byte_varint(len(body), draw(st.integers(0, 63))) + body
    if choice == "wrong":  # a length that does not match the body
        return varint(draw(st.integers(0, 2**32))) + body
    return varint(len(body), draw(pads)) + body


@st.composite
def scalar_field(draw: st.DrawFn) -> bytes:
    number = draw(numbers)
    kind = draw(mostly(st.sampled_from([0, 1, 2, 2, 5]), st.sampled_from([4, 6, 7]), odds=20))
    if draw(mostly(st.just(False), st.just(True), odds=30)):  # a tag above 32 bits, which protobuf refuses
        head = varint(((number | (1 << draw(st.integers(29, 31)))) << 3) | kind, draw(pads))
    else:
        head = tag(number, kind, draw(pads))
    if kind == 0:
        return head + draw(any_varint)
    if kind == 1:
        return head + draw(st.binary(min_size=8, max_size=8))
    if kind == 5:
        return head + draw(st.binary(min_size=4, max_size=4))
    if kind == 2:
        return head + draw(length_delimited(draw(payloads(number))))
    return head  # 4, 6, 7: a bare tag


def group(inner: st.SearchStrategy[list[bytes]]) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        number = draw(numbers)
        closing = draw(mostly(st.just(number), numbers))  # sometimes mismatched
        body = b"".join(draw(inner))
        return tag(number, 3, draw(pads)) + body + tag(closing, 4, draw(pads))

    return build()


fields = st.recursive(
    st.lists(scalar_field(), max_size=4), lambda inner: st.lists(st.one_of(scalar_field(), group(inner)), max_size=4),
    max_leaves=12,
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(fields)))
    for _ in range(draw(mostly(st.just(0), st.integers(1, 3), odds=2))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
    return bytes(data)


# 500 new messages a run (about 3 s): every run explores others, and what one finds joins CASES below.
@pytest.mark.slow
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
@example(tag(9, 3) + tag(1, 0) + b"\x01" + tag(9, 4))  # an unknown group: protobuf keeps it
@example(tag(7, 2, pad=5) + b"\x01A")  # a 6-byte tag: protobuf refuses it
def test_codec_agrees_with_protobuf_on_generated_messages(data: bytes) -> None:
    assert_agrees(data)


# ---------------------------------------------------------------------------------------------------
# The cases found by hand, one by one, so that a regression names itself.

VALID = pb.ModelInferRequest(model_name="identity_float", id="r").SerializeToString()
RAW = tag(7, 2) + b"\x04abcd"
CASES = {
    "unknown group": tag(9, 3) + tag(1, 0) + b"\x05" + tag(9, 4),
    "nested unknown groups": tag(9, 3) + tag(10, 3) + tag(10, 4) + tag(9, 4),
    "group holding a raw-looking field": tag(9, 3) + RAW + tag(9, 4),
    "raw field written as a group": tag(7, 3) + tag(7, 4),
    "group with a mismatched end": tag(9, 3) + tag(10, 4),
    "group never closed": tag(9, 3) + tag(1, 0) + b"\x01",
    "end group at the top level": tag(9, 4),
    "field number 0": tag(0, 0) + b"\x01",
    "group number 0": tag(0, 3) + tag(0, 4),
    "wire type 6": tag(1, 6),
    "wire type 7": tag(1, 7),
    "raw tag in 2 bytes": tag(7, 2, pad=1) + b"\x01A",
    "raw tag in 5 bytes": tag(7, 2, pad=4) + b"\x01A",
    "raw tag in 6 bytes": tag(7, 2, pad=5) + b"\x01A",
    "other tag in 6 bytes": tag(1, 2, pad=5) + b"\x01A",
    "tag above 32 bits": b"\xba\x80\x80\x80\x10\x01A",
    "tag with bit 31": b"\xba\x80\x80\x80\x08\x01A",
    "raw length in 10 bytes": tag(7, 2) + varint(1, pad=9) + b"A",
    "raw length with bits past 64": tag(7, 2) + ten_byte_varint(1, 1) + b"A",
    "raw length with bit 63": tag(7, 2) + ten_byte_varint(1 | 1 << 63, 0) + b"A",
    "raw length in 11 bytes": tag(7, 2) + varint(1, pad=10) + b"A",
    "varint in 10 bytes, high last byte": tag(9, 0) + ten_byte_varint(5, 63),
    "varint in 11 bytes": tag(9, 0) + varint(5, pad=10),
    "raw field as a varint": tag(7, 0) + b"\x05" + RAW,
    "raw field as fixed32": tag(7, 5) + b"1234",
    "raw field as fixed64": tag(7, 1) + b"12345678",
    "truncated fixed32": tag(9, 5) + b"123",
    "truncated raw": tag(7, 2) + b"\x05abcd",
    "raw length of 2^31-1": tag(7, 2) + varint(2**31 - 1) + b"A",
    "model_name not UTF-8": tag(1, 2) + b"\x01\xff",
    "largest field number": tag(2**29 - 1, 0) + b"\x01",
    "groups nested 50 deep": tag(9, 3) * 50 + tag(9, 4) * 50,
    "groups nested past protobuf's depth limit": tag(9, 3) * 200 + tag(9, 4) * 200,
    "groups nested 100000 deep": tag(9, 3) * 100_000 + tag(9, 4) * 100_000,
}


@pytest.mark.parametrize("case", list(CASES))
def test_codec_agrees_with_protobuf_on_hand_made_cases(case: str) -> None:
    assert_agrees(VALID + CASES[case] + RAW)


def test_unknown_group_fields_are_accepted_and_kept() -> None:
    data = VALID + tag(9, 3) + tag(1, 0) + b"\x05" + tag(9, 4) + RAW
    decoded = decode_infer_request(data)
    assert not decoded.error
    assert [bytes(raw) for raw in decoded.raw] == [b"abcd"]
    assert decoded.message.model_name == "identity_float"


def test_overlong_tag_is_refused() -> None:
    assert decode_infer_request(VALID + tag(7, 2, pad=5) + b"\x04abcd").error
    assert decode_infer_request(VALID + b"\xba\x80\x80\x80\x10\x04abcd").error


def test_raw_payloads_are_views_not_copies() -> None:
    data = bytearray(VALID + RAW)
    decoded = decode_infer_request(data)
    data[-4:] = b"wxyz"  # the view sees the buffer it came from
    assert bytes(decoded.raw[0]) == b"wxyz"


# ---------------------------------------------------------------------------------------------------
# The same two disagreements through a real server: gRPC hands the codec the bytes as they arrived.


@pytest.fixture
def raw_call(server: ServerProcess) -> Iterator[grpc.UnaryUnaryMultiCallable]:
    with grpc.insecure_channel(server.unix_target) as channel:
        yield channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=pb.ModelInferResponse.FromString,
        )


def _identity_request() -> tuple[bytes, np.ndarray]:
    x = np.arange(4, dtype=np.float32)
    request = pb.ModelInferRequest(model_name="identity_float")
    request.inputs.add(name="x", datatype="FP32", shape=[4])
    return request.SerializeToString(), x


def test_server_answers_a_request_holding_an_unknown_group(raw_call: grpc.UnaryUnaryMultiCallable) -> None:
    head, x = _identity_request()
    data = head + tag(99, 3) + tag(1, 0) + b"\x07" + tag(99, 4) + tag(7, 2) + varint(x.nbytes) + x.tobytes()
    reply = raw_call(data, timeout=10)
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == x.tolist()


def test_server_refuses_a_raw_entry_behind_an_overlong_tag(raw_call: grpc.UnaryUnaryMultiCallable) -> None:
    head, x = _identity_request()
    data = head + tag(7, 2, pad=5) + varint(x.nbytes) + x.tobytes()
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(data, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a well-formed ModelInferRequest" in raised.value.details()
    reply = raw_call(head + tag(7, 2) + varint(x.nbytes) + x.tobytes(), timeout=10)  # still serving
    assert len(reply.raw_output_contents) == 1
