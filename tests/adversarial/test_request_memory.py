"""Memory per request: every input form (raw, BYTES, typed contents, shared memory) is held to the same
limits before anything in proportion to its element count is allocated, and what the server takes for a
request stays within a small multiple of it.

    pytest tests/adversarial/test_request_memory.py
"""

from __future__ import annotations

import os
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shm_client.shared import datatypes, wire
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import ServerProcess
from tests.support.shm import owned_segments

MiB = 1 << 20
PREFIX = f"advmem-{os.getpid()}-"
# Peak RSS growth allowed for a request of n bytes. A request costs about 3x its size in the server
# (the message as gRPC received it, protobuf's copy, the decoded input) plus the output and the reply;
# before these fixes a 64 MiB request of empty BYTES elements took 4.4 GiB and fp32_contents 14x.
GROWTH_PER_BYTE = 6
GROWTH_SLACK = 200 * MiB
TENSOR_LIMIT = 40_000
REQUEST_LIMIT = 65_536


def _status_value(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/{pid}/status has no {field}")


class PeakMemory:
    """The server's peak RSS growth over a block: the kernel's high-water mark is reset first
    (clear_refs 5), so a peak from an earlier test cannot hide this one."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0

    def __enter__(self) -> PeakMemory:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError as err:
            pytest.skip(f"cannot reset the server's peak RSS here ({err.strerror})")
        self.start = _status_value(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status_value(self.pid, "VmHWM") - self.start


def _tag(number: int, kind: int) -> bytes:
    return wire.encode_varint(number << 3 | kind)


def _field(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + wire.encode_varint(len(payload)) + payload


def _contents_request(model: str, datatype: str, shape: list[int], field_number: int, packed: bytes) -> bytes:
    """A ModelInferRequest whose one input carries `packed` (the encoded values of InferTensorContents
    field `field_number`), encoded by hand: protobuf's Python API would take seconds to fill 16M values."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=shape).SerializeToString()
    tensor += _field(5, _field(field_number, packed))  # InferInputTensor.contents
    return pb.ModelInferRequest(model_name=model).SerializeToString() + _field(5, tensor)


def _raw_request(model: str, datatype: str, shape: list[int], raw: bytes) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    return wire.join_field(request.SerializeToString(), wire.RAW_INPUT_FIELD, [raw])


class RawCaller:
    """ModelInfer with the request as bytes and the outputs as views into the reply (no extra copies of
    big tensors in the test process)."""

    def __init__(self, target: str) -> None:
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self.channel = grpc.insecure_channel(target, options=options)
        self._call = self.channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def infer(self, data: bytes) -> list[memoryview]:
        """The raw outputs, as views into the reply."""
        return wire.split_field(self._call(data, timeout=120), wire.RAW_OUTPUT_FIELD)[1]

    def refused(self, data: bytes) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as raised:
            self.infer(data)
        return raised.value.code(), raised.value.details()

    def still_serves(self) -> None:
        text = np.array([b"still", b"here"], dtype=object)
        raw = self.infer(_raw_request("identity_string", "BYTES", [2], datatypes.encode_bytes(text)))
        assert datatypes.decode_bytes(raw[0], 2).tolist() == text.tolist()


@pytest.fixture(scope="module")
def fresh_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Default limits, and no other suite's calls in its memory."""
    server = ServerProcess(model_repo, tmp_path_factory.mktemp("mem")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limited_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        model_repo, tmp_path_factory.mktemp("memlim"),
        "--max-tensor-bytes", str(TENSOR_LIMIT), "--max-request-bytes", str(REQUEST_LIMIT),
    ).start()
    yield server
    server.stop()


@pytest.fixture
def caller(fresh_server: ServerProcess) -> Iterator[RawCaller]:
    caller = RawCaller(fresh_server.unix_target)
    yield caller
    caller.channel.close()


@pytest.fixture
def limited(limited_server: ServerProcess) -> Iterator[RawCaller]:
    caller = RawCaller(limited_server.unix_target)
    yield caller
    caller.channel.close()


# ---------------------------------------------------------------------------------------------------
# Default limits: the server's own memory stays a small multiple of the request.


def test_64_mib_of_empty_bytes_elements_is_refused_before_it_is_decoded(
    fresh_server: ServerProcess, caller: RawCaller
) -> None:
    count = 16 * MiB  # each element is only its 4-byte length prefix
    data = _raw_request("identity_string", "BYTES", [count], bytes(4 * count))
    with PeakMemory(fresh_server.pid) as peak:
        code, message = caller.refused(data)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert "max_tensor_bytes" in message and f"{count} BYTES elements" in message
    assert peak.growth <= GROWTH_PER_BYTE * len(data) + GROWTH_SLACK, f"grew {peak.growth / MiB:.0f} MiB"
    caller.still_serves()


def test_64_mib_of_typed_fp32_contents_takes_a_few_times_its_size(
    fresh_server: ServerProcess, caller: RawCaller
) -> None:
    count = 16 * MiB
    values = np.arange(count, dtype=np.float32)
    data = _contents_request("identity_float", "FP32", [count], 6, values.tobytes())  # 6: fp32_contents
    with PeakMemory(fresh_server.pid) as peak:
        raw = caller.infer(data)
    assert np.array_equal(np.frombuffer(raw[0], np.float32), values)
    assert peak.growth <= GROWTH_PER_BYTE * len(data) + GROWTH_SLACK, f"grew {peak.growth / MiB:.0f} MiB"


def test_narrow_typed_contents_are_range_checked_without_a_wide_copy(
    fresh_server: ServerProcess, caller: RawCaller
) -> None:
    count = 32 * MiB
    values = (np.arange(count) % 100).astype(np.int8)  # 1-byte varints, held as int32 by protobuf
    data = _contents_request("identity_int8", "INT8", [count], 2, values.view(np.uint8).tobytes())  # int_contents
    with PeakMemory(fresh_server.pid) as peak:
        raw = caller.infer(data)
    assert np.array_equal(np.frombuffer(raw[0], np.int8), values)
    # protobuf's own parse holds 4 bytes per 1-byte value; past that only a few copies of the tensor.
    bound = (4 + GROWTH_PER_BYTE) * len(data) + GROWTH_SLACK
    assert peak.growth <= bound, f"grew {peak.growth / MiB:.0f} MiB"
    bad = _contents_request("identity_int8", "INT8", [2], 2, wire.encode_varint(5) + wire.encode_varint(300))
    code, message = caller.refused(bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside the range of INT8" in message


def _reference_encoding(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


@pytest.mark.parametrize("items", [
    [b""] * 300_000,
    [b"abc"] * 300_000,
    [b"x" * 100_000] + [b"", "é", b"yz"] * 100_000,  # mostly short, one long: filled, not joined
    [b"k" * 4096] * 256,  # long elements: joined
], ids=["empty", "short", "mixed", "long"])
def test_encoding_many_bytes_elements_takes_a_few_words_each(items: list) -> None:
    """The response side of a BYTES output: 2n small objects per n elements were 220 bytes each."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    expected = _reference_encoding([item.encode() if isinstance(item, str) else item for item in items])
    tracemalloc.start()
    try:
        encoded = datatypes.encode_bytes(array)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert encoded == expected
    assert peak <= 2 * len(expected) + 64 * len(items), f"{peak / len(items):.0f} bytes per element"
    assert datatypes.decode_bytes(encoded, len(items)).tolist() == [
        item.encode() if isinstance(item, str) else item for item in items
    ]


# ---------------------------------------------------------------------------------------------------
# max_tensor_bytes holds for BYTES on every path; a BYTES element counts its data and its overhead.

ELEMENT = b"ab"
OVER = 400  # 400 * (128 + 2) bytes held in the server, over TENSOR_LIMIT, in 2,400 bytes on the wire
UNDER = 100


def _strings(count: int) -> np.ndarray:
    return np.array([ELEMENT] * count, dtype=object)


def _raw_strings(count: int) -> bytes:
    return _raw_request("identity_string", "BYTES", [count], datatypes.encode_bytes(_strings(count)))


def _bytes_contents_request(count: int) -> bytes:
    request = pb.ModelInferRequest(model_name="identity_string")
    request.inputs.add(name="x", datatype="BYTES", shape=[count]).contents.bytes_contents.extend([ELEMENT] * count)
    return request.SerializeToString()


def test_max_tensor_bytes_refuses_a_bytes_input_sent_raw(limited: RawCaller) -> None:
    code, message = limited.refused(_raw_strings(OVER))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_tensor_bytes" in message, message
    raw = limited.infer(_raw_strings(UNDER))
    assert datatypes.decode_bytes(raw[0], UNDER).tolist() == [ELEMENT] * UNDER


def test_max_tensor_bytes_refuses_a_bytes_input_sent_as_contents(limited: RawCaller) -> None:
    code, message = limited.refused(_bytes_contents_request(OVER))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_tensor_bytes" in message, message
    raw = limited.infer(_bytes_contents_request(UNDER))
    assert datatypes.decode_bytes(raw[0], UNDER).tolist() == [ELEMENT] * UNDER


def test_max_tensor_bytes_refuses_a_bytes_input_in_shared_memory(limited: RawCaller) -> None:
    encoded = datatypes.encode_bytes(_strings(OVER))
    with owned_segments(PREFIX) as make:
        segment = make("bytes", len(encoded), fill=encoded)
        limited.stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="advmem-bytes", key=segment.key, byte_size=len(encoded)),
            timeout=10,
        )
        try:
            for count, size in ((OVER, len(encoded)), (UNDER, len(datatypes.encode_bytes(_strings(UNDER))))):
                request = pb.ModelInferRequest(model_name="identity_string")
                params = request.inputs.add(name="x", datatype="BYTES", shape=[count]).parameters
                params["shared_memory_region"].string_param = "advmem-bytes"
                params["shared_memory_byte_size"].int64_param = size
                if count == OVER:
                    code, message = limited.refused(request.SerializeToString())
                    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_tensor_bytes" in message, message
                else:
                    raw = limited.infer(request.SerializeToString())
                    assert datatypes.decode_bytes(raw[0], UNDER).tolist() == [ELEMENT] * UNDER
        finally:
            limited.stub.SystemSharedMemoryUnregister(
                pb.SystemSharedMemoryUnregisterRequest(name="advmem-bytes"), timeout=10
            )
    status = limited.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
    assert "advmem-bytes" not in status.regions


def test_decoded_inputs_past_max_request_bytes_are_refused(limited: RawCaller) -> None:
    """Each tensor is under max_tensor_bytes and the message is a fraction of max_request_bytes, but
    decoded (small int64 values are 1 byte on the wire and 8 in the server) they are past it."""
    request = pb.ModelInferRequest(model_name="mixed")
    ids = 4500  # 36,000 bytes decoded, from 4.5 KB of varints
    rows = 2250  # 36,000 bytes of FP32
    request.inputs.add(name="features", datatype="FP32", shape=[rows, 4]).contents.fp32_contents.extend(
        [1.0] * rows * 4
    )
    request.inputs.add(name="ids", datatype="INT64", shape=[ids]).contents.int64_contents.extend([1] * ids)
    request.inputs.add(name="mask", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
    data = request.SerializeToString()
    assert len(data) < REQUEST_LIMIT
    code, message = limited.refused(data)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_request_bytes" in message, message
    del request.inputs[1].contents.int64_contents[ids // 2 :]
    request.inputs[1].shape[0] = ids - ids // 2
    raw = limited.infer(request.SerializeToString())
    assert np.frombuffer(raw[1], np.int64).tolist() == [2] * (ids - ids // 2)
