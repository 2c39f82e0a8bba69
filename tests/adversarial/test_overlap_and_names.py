"""Requests that would make the server do unbounded pairwise work, or let one output overwrite an input
through a second name for the same object.

    pytest tests/adversarial/test_overlap_and_names.py
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import ServerProcess
from tests.support.shm import owned_segments

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py

PREFIX = f"advovl-{os.getpid()}-"
MANY = 8000


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.unix_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def make_segment():
    with owned_segments(PREFIX) as make:
        yield make


def _register(stub: pb_grpc.GRPCInferenceServiceStub, name: str, key: str, size: int) -> None:
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name=name, key="/" + key, byte_size=size), timeout=10
    )


def _unregister(stub: pb_grpc.GRPCInferenceServiceStub, *names: str) -> None:
    for name in names:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=10)


def _shm(params, region: str, size: int, offset: int = 0) -> None:
    params["shared_memory_region"].string_param = region
    params["shared_memory_byte_size"].int64_param = size
    params["shared_memory_offset"].int64_param = offset


def _code_and_message(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def test_thousands_of_output_names_are_refused_by_name_before_any_pairwise_work(
    stub: pb_grpc.GRPCInferenceServiceStub, make_segment
) -> None:
    segment = make_segment("many", 1 << 16)
    _register(stub, "adv-many", segment.key, 1 << 16)
    try:
        x = np.ones(4, np.float32)
        for label, names in (
            ("the same output again and again", ["y"] * MANY),
            ("names the model lacks", [f"out{i}" for i in range(MANY)]),
        ):
            request = pb.ModelInferRequest(model_name="scale", model_version="1")
            request.inputs.add(name="x", datatype="FP32", shape=[4])
            request.raw_input_contents.append(x.tobytes())
            for i, name in enumerate(names):
                _shm(request.outputs.add(name=name).parameters, "adv-many", 16, (i * 16) % (1 << 16))
            code, message = _code_and_message(lambda: stub.ModelInfer(request, timeout=30))  # noqa: B023
            assert code == grpc.StatusCode.INVALID_ARGUMENT, label
            assert "overlap" not in message, label
            assert ("more than once" in message) or ("has no output 'out0'" in message), message
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    finally:
        _unregister(stub, "adv-many")


def test_an_output_in_a_hard_link_of_the_input_object_is_an_overlap(
    stub: pb_grpc.GRPCInferenceServiceStub, make_segment
) -> None:
    segment = make_segment("linked", 4096)
    alias = f"{PREFIX}alias"
    os.link(f"/dev/shm/{segment.key}", f"/dev/shm/{alias}")
    try:
        x = np.arange(8, dtype=np.float32)
        segment.write(x)
        _register(stub, "adv-in", segment.key, 4096)
        _register(stub, "adv-out", alias, 4096)
        request = pb.ModelInferRequest(model_name="scale", model_version="2")
        _shm(request.inputs.add(name="x", datatype="FP32", shape=[8]).parameters, "adv-in", 32)
        _shm(request.outputs.add(name="y").parameters, "adv-out", 32, 16)
        code, message = _code_and_message(lambda: stub.ModelInfer(request, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "overlap" in message
        np.testing.assert_array_equal(segment.array(np.float32, (8,)), x)  # nothing was written

        # Apart, the same two names are fine, and the output really lands in the shared object.
        _shm(request.outputs[0].parameters, "adv-out", 32, 64)
        stub.ModelInfer(request, timeout=10)
        np.testing.assert_array_equal(segment.array(np.float32, (8,), offset=64), x * 2)
    finally:
        _unregister(stub, "adv-in", "adv-out")
        os.unlink(f"/dev/shm/{alias}")


def test_inputs_may_share_bytes_but_outputs_may_not_share_with_anything(
    stub: pb_grpc.GRPCInferenceServiceStub, make_segment
) -> None:
    segment = make_segment("shared", 4096)
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    segment.write(a)
    _register(stub, "adv-shared", segment.key, 4096)
    try:
        request = pb.ModelInferRequest(model_name="add_sub")
        _shm(request.inputs.add(name="a", datatype="FP32", shape=[1, 16]).parameters, "adv-shared", 64)
        _shm(request.inputs.add(name="b", datatype="FP32", shape=[1, 16]).parameters, "adv-shared", 64)
        _shm(request.outputs.add(name="sum").parameters, "adv-shared", 64, 1024)
        _shm(request.outputs.add(name="diff").parameters, "adv-shared", 64, 2048)
        stub.ModelInfer(request, timeout=10)
        np.testing.assert_array_equal(segment.array(np.float32, (1, 16), offset=1024), a + a)

        # Two outputs that share one byte, found whichever way the request orders them.
        for first, second in (("sum", "diff"), ("diff", "sum")):
            del request.outputs[:]
            _shm(request.outputs.add(name=first).parameters, "adv-shared", 64, 1024)
            _shm(request.outputs.add(name=second).parameters, "adv-shared", 64, 1087)
            code, message = _code_and_message(lambda: stub.ModelInfer(request, timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "overlap" in message
        # An output that starts inside the inputs, which sort before it.
        del request.outputs[:]
        _shm(request.outputs.add(name="sum").parameters, "adv-shared", 64, 32)
        code, message = _code_and_message(lambda: stub.ModelInfer(request, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "overlap" in message
    finally:
        _unregister(stub, "adv-shared")


@pytest.mark.parametrize("version", ["\u00b2", "\u2460", "\u0661", "01", "1.0", " 1", "+1", "0", "-1", "9" * 40])
def test_malformed_versions_are_client_errors(stub: pb_grpc.GRPCInferenceServiceStub, version: str) -> None:
    request = pb.ModelInferRequest(model_name="scale", model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.ones(1, np.float32).tobytes())
    code, message = _code_and_message(lambda: stub.ModelInfer(request, timeout=10))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (version, code, message)
    code, _ = _code_and_message(
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="scale", version=version), timeout=10)
    )
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert not stub.ModelReady(pb.ModelReadyRequest(name="scale", version=version), timeout=10).ready
