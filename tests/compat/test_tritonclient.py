"""tritonclient.grpc, unchanged, against a real edgecow server on TCP and on its unix socket.

    client = tritonclient.grpc.InferenceServerClient(server.tcp_target)   # or "unix:///path/edgecow.sock"
    client.infer("identity_float", [x], outputs=[y]).as_numpy("y")
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support.arrays import random_array
from tests.support.processes import ServerProcess

IDENTITY_CASES = [
    ("identity_float", "FP32", "float32"),
    ("identity_int64", "INT64", "int64"),
    ("identity_bool", "BOOL", "bool"),
    ("identity_float16", "FP16", "float16"),
    ("identity_string", "BYTES", "object"),
]


@pytest.fixture(params=["tcp", "unix"], scope="module")
def url(request: pytest.FixtureRequest, server: ServerProcess) -> str:
    """tritonclient passes the url to grpc.insecure_channel, so "unix:///abs/path" works as is."""
    return server.tcp_target if request.param == "tcp" else f"unix://{server.socket}"


@pytest.fixture
def client(url: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url) as c:
        yield c


@pytest.fixture
def local_client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    """Repository control is for callers whose rights the server knows: those on the unix socket."""
    with triton.InferenceServerClient(f"unix://{server.socket}") as c:
        yield c


def _input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_server_is_live_and_ready_and_lists_its_extensions(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "edgecow"
    assert metadata.version
    for extension in ("system_shared_memory", "model_repository", "model_configuration", "statistics",
                      "binary_tensor_data", "parameters", "edgecow"):
        assert extension in metadata.extensions


def test_model_metadata_names_inputs_outputs_datatypes_and_variable_dims(
    client: triton.InferenceServerClient,
) -> None:
    metadata = client.get_model_metadata("mixed")
    assert metadata.name == "mixed"
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs == {"features": ("FP32", [-1, 4]), "ids": ("INT64", [-1]), "mask": ("BOOL", [-1])}
    outputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs}
    assert outputs == {"total": ("FP32", [-1]), "ids_twice": ("INT64", [-1]), "mask_not": ("BOOL", [-1])}


def test_model_config_uses_triton_enums_platform_and_backend(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("static").config
    assert config.name == "static"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", 11, [4, 256])]  # TYPE_FP32
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("y", 11, [4, 256])]
    strings = client.get_model_config("strings").config
    assert {i.name: i.data_type for i in strings.input} == {"text": model_config_pb2.TYPE_STRING}
    assert {o.name: o.data_type for o in strings.output} == {
        "echo": model_config_pb2.TYPE_STRING, "count": model_config_pb2.TYPE_INT64,
    }


@pytest.mark.parametrize(("model", "datatype", "dtype"), IDENTITY_CASES, ids=[c[1] for c in IDENTITY_CASES])
def test_identity_round_trips_raw_payload_of_each_datatype(
    client: triton.InferenceServerClient, model: str, datatype: str, dtype: str
) -> None:
    data = random_array((7,), dtype, seed=3)
    result = client.infer(model, [_input("x", data, datatype)], outputs=[triton.InferRequestedOutput("y")])
    out = result.as_numpy("y")
    assert result.get_output("y").datatype == datatype
    assert out.shape == (7,)
    if dtype == "object":
        assert out.tolist() == data.tolist()
    else:
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, data)


def test_string_model_echoes_utf8_bytes_and_counts_them(client: triton.InferenceServerClient) -> None:
    text = np.array([b"hello", "wörld €".encode(), b"", b"tab\tnew\nline"], dtype=object)
    result = client.infer("strings", [_input("text", text, "BYTES")])
    assert result.as_numpy("echo").tolist() == text.tolist()
    count = result.as_numpy("count")
    assert count.shape == () and int(count) == 4


def test_several_inputs_of_different_datatypes_come_back_by_position(
    client: triton.InferenceServerClient,
) -> None:
    features = random_array((3, 4), "float32", seed=1)
    ids = np.array([1, -2, 40], dtype=np.int64)
    mask = np.array([True, False], dtype=bool)
    inputs = [_input("features", features, "FP32"), _input("ids", ids, "INT64"), _input("mask", mask, "BOOL")]
    result = client.infer("mixed", inputs)
    np.testing.assert_allclose(result.as_numpy("total"), features.sum(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("ids_twice"), ids * 2)
    np.testing.assert_array_equal(result.as_numpy("mask_not"), ~mask)


def test_requesting_one_output_returns_only_that_output(client: triton.InferenceServerClient) -> None:
    a = random_array((1, 16), "float32", seed=1)
    b = random_array((1, 16), "float32", seed=2)
    result = client.infer("add_sub", [_input("a", a, "FP32"), _input("b", b, "FP32")],
                          outputs=[triton.InferRequestedOutput("diff")])
    assert [o.name for o in result.get_response().outputs] == ["diff"]
    assert result.as_numpy("sum") is None
    np.testing.assert_allclose(result.as_numpy("diff"), a - b)


def test_unknown_model_raises_not_found_through_tritonclient(client: triton.InferenceServerClient) -> None:
    x = np.ones(2, np.float32)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("no_such_model", [_input("x", x, "FP32")])
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in raised.value.message()
    assert client.is_server_live()


def test_version_selection_defaults_to_highest_and_picks_the_asked_one(url: str) -> None:
    x = np.array([1.0, 2.5, -3.0], np.float32)
    with triton.InferenceServerClient(url) as client:
        assert client.is_model_ready("scale", "1") and client.is_model_ready("scale", "2")
        assert list(client.get_model_metadata("scale").versions) == ["1", "2"]
        default = client.infer("scale", [_input("x", x, "FP32")])
        assert default.get_response().model_version == "2"
        np.testing.assert_array_equal(default.as_numpy("y"), x * 2)
        v1 = client.infer("scale", [_input("x", x, "FP32")], model_version="1")
        assert v1.get_response().model_version == "1"
        np.testing.assert_array_equal(v1.as_numpy("y"), x)
        v2 = client.infer("scale", [_input("x", x, "FP32")], model_version="2")
        np.testing.assert_array_equal(v2.as_numpy("y"), x * 2)
        with pytest.raises(InferenceServerException) as raised:
            client.infer("scale", [_input("x", x, "FP32")], model_version="9")
        assert raised.value.status() == "StatusCode.NOT_FOUND"
        assert "9" in raised.value.message()


def test_statistics_count_calls_and_measure_durations(client: triton.InferenceServerClient) -> None:
    def stats() -> object:
        (entry,) = client.get_inference_statistics("identity_int64").model_stats
        return entry

    before = stats()
    data = np.arange(5, dtype=np.int64)
    for _ in range(3):
        client.infer("identity_int64", [_input("x", data, "INT64")])
    after = stats()
    assert after.name == "identity_int64" and after.version == "1"
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count == before.execution_count + 3
    success = after.inference_stats.success
    assert success.count == before.inference_stats.success.count + 3
    assert success.ns > before.inference_stats.success.ns
    for name in ("compute_input", "compute_infer", "compute_output"):
        assert getattr(after.inference_stats, name).count == success.count
        assert getattr(after.inference_stats, name).ns > 0
    assert after.last_inference > 0
    every = client.get_inference_statistics()
    assert "identity_int64" in {s.name for s in every.model_stats}


def test_failed_call_is_counted_as_fail_not_success(client: triton.InferenceServerClient) -> None:
    (before,) = client.get_inference_statistics("identity_float").model_stats
    with pytest.raises(InferenceServerException):
        client.infer("identity_float", [_input("x", np.ones(2, np.int64), "INT64")])
    (after,) = client.get_inference_statistics("identity_float").model_stats
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count


def test_repository_index_lists_every_model_as_ready(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    states = {(m.name, m.version): m.state for m in index.models}
    assert states[("scale", "2")] == "READY"
    assert states[("strings", "1")] == "READY"
    assert {m.name for m in index.models} >= {"add_sub", "mixed", "gate", "static", "identity_float16"}
    assert all(m.state == "READY" for m in index.models)


def test_unload_then_load_toggles_model_readiness(local_client: triton.InferenceServerClient) -> None:
    client = local_client
    model = "add_sub_int32"
    assert client.is_model_ready(model)
    client.unload_model(model)
    try:
        assert not client.is_model_ready(model)
        a = np.ones((1, 16), np.int32)
        with pytest.raises(InferenceServerException) as raised:
            client.infer(model, [_input("a", a, "INT32"), _input("b", a, "INT32")])
        assert raised.value.status() == "StatusCode.NOT_FOUND"
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        assert index[model] == "UNLOADED"
    finally:
        client.load_model(model)
    assert client.is_model_ready(model)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    result = client.infer(model, [_input("a", a, "INT32"), _input("b", a, "INT32")])
    np.testing.assert_array_equal(result.as_numpy("sum"), a * 2)


def test_loading_a_model_that_is_not_in_the_repository_is_not_found(
    local_client: triton.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        local_client.load_model("not_there")
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert "not_there" in raised.value.message()


def test_a_loopback_caller_may_not_unload_models_by_default(server: ServerProcess) -> None:
    with triton.InferenceServerClient(server.tcp_target) as remote:
        with pytest.raises(InferenceServerException) as raised:
            remote.unload_model("add_sub_int32")
        assert raised.value.status() == "StatusCode.PERMISSION_DENIED"
        assert remote.is_model_ready("add_sub_int32")


def test_model_readiness_for_unknown_model_and_version_is_false(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready("scale")
    assert client.is_model_ready("scale", "2")
    assert client.is_model_ready("scale", "1")  # scale/config.toml serves every version
    assert not client.is_model_ready("scale", "3")
    assert not client.is_model_ready("identity_float", "2")
    assert not client.is_model_ready("no_such_model")


def test_stream_infer_answers_each_request_in_order_and_reports_errors_in_band(
    client: triton.InferenceServerClient,
) -> None:
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        sent = [np.full(3, i, np.float32) for i in range(4)]
        for i, x in enumerate(sent):
            client.async_stream_infer("identity_float", [_input("x", x, "FP32")], request_id=str(i))
        client.async_stream_infer("no_such_model", [_input("x", sent[0], "FP32")], request_id="bad")
        client.async_stream_infer("identity_float", [_input("x", sent[1], "FP32")], request_id="after")
        answers = [results.get(timeout=30) for _ in range(6)]
    finally:
        client.stop_stream()
    for i, (result, error) in enumerate(answers[:4]):
        assert error is None
        assert result.get_response().id == str(i)
        np.testing.assert_array_equal(result.as_numpy("y"), sent[i])
    result, error = answers[4]
    assert result is None and error is not None
    assert "NOT_FOUND" in error.message() and "no_such_model" in error.message()
    result, error = answers[5]
    assert error is None and result.get_response().id == "after"


def test_typed_contents_are_accepted_in_place_of_raw_bytes(url: str) -> None:
    request = pb.ModelInferRequest(model_name="mixed", id="typed")
    request.inputs.add(name="features", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(
        [1, 2, 3, 4, 0.5, 0.5, 0.5, 0.5]
    )
    request.inputs.add(name="ids", datatype="INT64", shape=[3]).contents.int64_contents.extend([7, -1, 2**40])
    request.inputs.add(name="mask", datatype="BOOL", shape=[2]).contents.bool_contents.extend([True, False])
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=30)
        strings = pb.ModelInferRequest(model_name="strings")
        strings.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"ab", b"c"])
        string_response = stub.ModelInfer(strings, timeout=30)
        small = pb.ModelInferRequest(model_name="identity_int8")
        small.inputs.add(name="x", datatype="INT8", shape=[3]).contents.int_contents.extend([-128, 0, 127])
        small_response = stub.ModelInfer(small, timeout=30)
    assert response.id == "typed"
    assert [o.name for o in response.outputs] == ["total", "ids_twice", "mask_not"]
    assert len(response.raw_output_contents) == 3
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4"), [10, 2])
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[1], "<i8"), [14, -2, 2**41])
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[2], np.bool_), [False, True])
    assert string_response.raw_output_contents[0] == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    np.testing.assert_array_equal(np.frombuffer(small_response.raw_output_contents[0], np.int8), [-128, 0, 127])

