"""Requests the server must refuse: the exact status code, one sentence naming the problem, and a server
that keeps answering afterwards.

    rejected(stub, request(inputs=[("x", "INT32", [2])]), grpc.StatusCode.INVALID_ARGUMENT, "must be FP32")
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support import models
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.unix_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def request(
    model: str = "identity_float",
    inputs: Sequence[tuple[str, str, list[int]]] = (("x", "FP32", [2]),),
    raw: Sequence[bytes] = (b"\0" * 8,),
    version: str = "",
    outputs: Sequence[str] = (),
) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, datatype, shape in inputs:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
    message.raw_input_contents.extend(raw)
    for name in outputs:
        message.outputs.add(name=name)
    return message


def _bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def still_serving(stub: pb_grpc.GRPCInferenceServiceStub, model: str = "identity_float") -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    x = np.array([1.0, -2.0], np.float32)
    response = stub.ModelInfer(request(model, raw=[x.tobytes()]), timeout=30)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4"), x)


def rejected(
    stub: pb_grpc.GRPCInferenceServiceStub, message: pb.ModelInferRequest, code: grpc.StatusCode, *says: str
) -> str:
    """Send `message`; assert the status code, that the details say `says`, in one line; return them."""
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(message, timeout=30)
    details = raised.value.details()
    assert raised.value.code() == code, details
    for fragment in says:
        assert fragment in details
    assert "\n" not in details and "Traceback" not in details
    still_serving(stub)
    return details


def test_unknown_model_is_not_found_and_server_keeps_serving(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(model="no_such_model"), NOT_FOUND, "model 'no_such_model' is not loaded")


def test_unknown_version_is_not_found_and_lists_the_loaded_ones(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(model="scale", version="7"), NOT_FOUND, "no loaded version 7", "loaded versions: 1, 2")


def test_version_that_is_not_a_number_is_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(model="scale", version="latest"), INVALID, "'latest' is not a positive integer")


def test_wrong_datatype_names_the_input_and_both_types(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(inputs=[("x", "INT32", [2])]), INVALID, "input 'x' must be FP32, not INT32")


def test_datatype_that_does_not_exist_lists_the_valid_ones(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(inputs=[("x", "FLOAT32", [2])]), INVALID, "unknown datatype 'FLOAT32'", "FP32, FP64")


def test_wrong_rank_says_the_rank_the_model_wants(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(inputs=[("x", "FP32", [1, 2])]), INVALID,
             "input 'x' must have 1 dimension(s) like [-1], not shape [1, 2]")


def test_wrong_fixed_dimension_says_the_expected_shape(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(model="static", inputs=[("x", "FP32", [4, 255])], raw=[b"\0" * 4 * 4 * 255]),
             INVALID, "must have shape [4, 256], not [4, 255]")


def test_negative_dimension_is_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(inputs=[("x", "FP32", [-2])]), INVALID, "negative dimension")


def test_missing_input_names_what_the_request_lacks(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(model="add_sub", inputs=[("a", "FP32", [1, 16])], raw=[b"\0" * 64]),
             INVALID, "model 'add_sub' needs input(s) b")


def test_unknown_input_name_lists_the_model_inputs(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(inputs=[("z", "FP32", [2])]), INVALID, "has no input 'z'", "its inputs are: x")


def test_input_given_twice_is_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(inputs=[("x", "FP32", [2])] * 2, raw=[b"\0" * 8] * 2), INVALID,
             "input 'x' is given more than once")


def test_unknown_output_name_lists_the_model_outputs(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(outputs=["z"]), INVALID, "has no output 'z'", "its outputs are: y")


def test_raw_byte_size_not_matching_the_shape_says_both_sizes(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(raw=[b"\0" * 7]), INVALID, "input 'x' has 7 raw bytes but shape [2] of FP32 needs 8")


def test_too_many_raw_entries_counts_them(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(raw=[b"\0" * 8, b"\0" * 8]), INVALID,
             "2 raw_input_contents entries for 1 inputs")


def test_too_few_raw_entries_counts_them(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(model="add_sub", inputs=[("a", "FP32", [1, 16]), ("b", "FP32", [1, 16])],
                           raw=[b"\0" * 64]), INVALID, "1 raw_input_contents entries for 2 inputs")


def test_input_without_any_data_says_how_to_send_it(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(raw=[]), INVALID, "input 'x' has no data")


def test_raw_entries_mixed_with_typed_contents_are_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    message = request(model="mixed", inputs=[("features", "FP32", [1, 4]), ("ids", "INT64", [1]),
                                             ("mask", "BOOL", [1])], raw=[b"\0" * 16, b"\0"])
    message.inputs[1].contents.int64_contents.append(3)
    rejected(stub, message, INVALID, "mixes raw_input_contents with typed contents")


def test_typed_contents_in_the_wrong_field_name_the_right_one(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    message = request(raw=[])
    message.inputs[0].contents.int64_contents.extend([1, 2])
    rejected(stub, message, INVALID, "input 'x' is FP32, which travels in fp32_contents, not int64_contents")


def test_typed_contents_with_the_wrong_count_are_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    message = request(raw=[])
    message.inputs[0].contents.fp32_contents.extend([1, 2, 3])
    rejected(stub, message, INVALID, "has 3 values in contents but shape [2] needs 2")


def test_typed_contents_out_of_range_for_int8_are_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    message = request(model="identity_int8", inputs=[("x", "INT8", [1])], raw=[])
    message.inputs[0].contents.int_contents.append(300)
    rejected(stub, message, INVALID, "outside the range of INT8")


def test_fp16_has_no_typed_contents_and_says_to_send_raw(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    message = request(model="identity_float16", inputs=[("x", "FP16", [1])], raw=[])
    message.inputs[0].contents.fp32_contents.append(1.0)
    rejected(stub, message, INVALID, "FP16 has no typed contents field; send it as raw bytes")


def test_bytes_with_a_truncated_length_prefix_are_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    raw = _bytes_element(b"a") + b"\x05\x00"  # the second element's 4-byte length is cut short
    rejected(stub, request(model="identity_string", inputs=[("x", "BYTES", [2])], raw=[raw]), INVALID,
             "input 'x'", "truncated")


def test_bytes_element_longer_than_the_payload_is_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    raw = struct.pack("<I", 10) + b"abc"
    rejected(stub, request(model="identity_string", inputs=[("x", "BYTES", [1])], raw=[raw]), INVALID,
             "input 'x'", "claims 10 bytes but only 3 remain")


def test_bytes_left_over_after_the_last_element_are_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    raw = _bytes_element(b"a") + b"!"
    rejected(stub, request(model="identity_string", inputs=[("x", "BYTES", [1])], raw=[raw]), INVALID,
             "input 'x'", "1 bytes after its 1 elements")


def test_bytes_that_are_not_utf8_for_a_string_model_are_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    raw = _bytes_element(b"ok") + _bytes_element(b"\xff\xfe")
    rejected(stub, request(model="strings", inputs=[("text", "BYTES", [2])], raw=[raw]), INVALID,
             "input 'text' element 1 is not valid UTF-8")


def test_bf16_for_an_fp32_input_is_a_datatype_mismatch(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rejected(stub, request(inputs=[("x", "BF16", [2])], raw=[b"\0" * 4]), INVALID,
             "input 'x' must be FP32, not BF16")


def test_bad_timeout_parameter_is_invalid(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    message = request()
    message.parameters["timeout"].string_param = "soon"
    rejected(stub, message, INVALID, "parameter 'timeout' must be a non-negative integer number of microseconds")


def test_classification_output_is_answered_not_silently_ignored(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    message = request(raw=[np.array([4.0, 5.0], np.float32).tobytes()])
    message.outputs.add(name="y").parameters["classification"].int64_param = 2
    response = stub.ModelInfer(message, timeout=30)
    assert response.outputs[0].datatype == "BYTES" and list(response.outputs[0].shape) == [2]
    assert response.raw_output_contents[0] == b"\n\0\0\x005.000000:1\n\0\0\x004.000000:0"  # 4-byte lengths
    strings = request("identity_string", (("x", "BYTES", [1]),), raw=[b"\x01\0\0\0a"])
    strings.outputs.add(name="y").parameters["classification"].int64_param = 1
    rejected(stub, strings, INVALID, "output 'y' is BYTES", "classification")


def test_reserved_request_parameters_are_accepted(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    message = request(raw=[np.array([4.0, 5.0], np.float32).tobytes()])
    message.parameters["sequence_id"].uint64_param = 3
    message.parameters["sequence_start"].bool_param = True
    message.parameters["priority"].uint64_param = 1
    message.parameters["binary_data_output"].bool_param = True
    message.parameters["triton_enable_empty_final_response"].bool_param = False
    message.inputs[0].parameters["binary_data_size"].int64_param = 8
    response = stub.ModelInfer(message, timeout=30)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4"), [4.0, 5.0])


def test_metadata_config_and_statistics_of_unknown_models_are_not_found(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    calls = [
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
        (stub.ModelConfig, pb.ModelConfigRequest(name="scale", version="5")),
        (stub.ModelStatistics, pb.ModelStatisticsRequest(name="nope")),
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="nope")),
        (stub.RepositoryIndex, pb.RepositoryIndexRequest(repository_name="elsewhere")),
    ]
    for method, message in calls:
        with pytest.raises(grpc.RpcError) as raised:
            method(message, timeout=10)
        assert raised.value.code() == NOT_FOUND, raised.value.details()
        assert raised.value.details()
    still_serving(stub)


# -- a repository with broken and unusual models -------------------------------------------------------

@pytest.fixture(scope="module")
def odd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("odd") / "models"
    models.write_model(root, "good", 1, models.identity_model())
    models.write_model(root, "bf16", 1, models.identity_model(TensorProto.BFLOAT16))
    not_onnx = root / "not_onnx" / "1" / "model.onnx"
    not_onnx.parent.mkdir(parents=True)
    not_onnx.write_text("this text file is not an ONNX model\n")
    models.write_model(root, "bad_config", 1, models.identity_model(), config="providers = [\n")
    models.write_model(root, "bad_policy", 1, models.identity_model(), config="version_policy = { latest = 0 }\n")
    models.write_model(root, "odd_key", 1, models.identity_model(), config="colour = 'red'\n")
    proc = ServerProcess(root, tmp_path_factory.mktemp("odd-srv")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def odd_stub(odd_server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(odd_server.unix_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _index(stub: pb_grpc.GRPCInferenceServiceStub) -> dict[str, pb.RepositoryIndexResponse.ModelIndex]:
    return {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}


def test_a_file_that_is_not_onnx_is_unavailable_with_a_reason_and_the_others_load(
    odd_server: ServerProcess, odd_stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    index = _index(odd_stub)
    assert index["good"].state == "READY"
    assert index["bf16"].state == "READY"
    broken = index["not_onnx"]
    assert (broken.version, broken.state) == ("1", "UNAVAILABLE")
    assert "model not_onnx version 1 cannot be loaded" in broken.reason
    assert not odd_stub.ModelReady(pb.ModelReadyRequest(name="not_onnx"), timeout=10).ready
    with pytest.raises(grpc.RpcError) as raised:
        odd_stub.ModelInfer(request(model="not_onnx"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot be loaded" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        odd_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="not_onnx"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "model 'not_onnx' could not be loaded" in raised.value.details()
    still_serving(odd_stub, "good")
    assert odd_server.alive()


def test_a_corrupt_config_toml_is_named_in_the_reason(
    odd_server: ServerProcess, odd_stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    # Named relative to the repository: callers learn which file to fix, not where the server keeps it.
    config = "bad_config/config.toml"
    entry = _index(odd_stub)["bad_config"]
    assert entry.state == "UNAVAILABLE"
    assert f"configuration file {config} is not valid TOML" in entry.reason
    assert str(odd_server.repo) not in entry.reason
    with pytest.raises(grpc.RpcError) as raised:
        odd_stub.ModelInfer(request(model="bad_config"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert config in raised.value.details() and str(odd_server.repo) not in raised.value.details()
    assert config in odd_server.log
    still_serving(odd_stub, "good")


def test_bad_values_and_unknown_keys_in_config_toml_are_named_in_the_reason(
    odd_server: ServerProcess, odd_stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    index = _index(odd_stub)
    policy = index["bad_policy"]
    assert policy.state == "UNAVAILABLE"
    assert "bad_policy/config.toml" in policy.reason and str(odd_server.repo) not in policy.reason
    assert "version_policy must be" in policy.reason and "{'latest': 0}" in policy.reason
    odd = index["odd_key"]
    assert odd.state == "UNAVAILABLE"
    assert "unknown key 'colour'" in odd.reason and "known keys:" in odd.reason


def test_bf16_model_is_described_but_its_input_is_unimplemented(
    odd_stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    meta = odd_stub.ModelMetadata(pb.ModelMetadataRequest(name="bf16"), timeout=10)
    assert [(t.name, t.datatype) for t in meta.inputs] == [("x", "BF16")]
    config = odd_stub.ModelConfig(pb.ModelConfigRequest(name="bf16"), timeout=10).config
    assert config.input[0].data_type == 14  # TYPE_BF16
    with pytest.raises(grpc.RpcError) as raised:
        odd_stub.ModelInfer(request(model="bf16", inputs=[("x", "BF16", [2])], raw=[b"\0" * 4]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert raised.value.details() == "datatype BF16 is not supported by edgecow; convert the tensor to FP32 or FP16"
    still_serving(odd_stub, "good")


def test_ready_filter_leaves_out_the_broken_models(odd_stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    ready = odd_stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10).models
    assert sorted(m.name for m in ready) == ["bf16", "good"]


def test_server_reports_ready_although_some_models_are_broken(odd_server: ServerProcess) -> None:
    assert "ready: 2 model version(s) [bf16:1, good:1]" in odd_server.log
    assert Path(odd_server.socket).is_socket()
