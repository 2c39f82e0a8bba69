"""Tensors with no elements, in and out, on every path: gRPC raw and typed contents, shared memory
with EdgeClient (local lane and gRPC) and with tritonclient, for every datatype.

    pytest tests/integration/test_zero_size.py

A detector that finds nothing answers with outputs shaped [0, 3] or [1, 0]; a batch of zero is a
request like any other. Answers are compared with onnxruntime run in this process.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as triton_shm
from onnx import TensorProto
from tritonclient import utils as triton_utils

from shm_client import EdgeClient
from shm_client.shared import datatypes
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.segments import SHM_DIR
from tests.support import models
from tests.support.arrays import random_array
from tests.support.processes import ServerProcess, serving

# ONNX element type -> numpy dtype, every one the v2 protocol carries (BF16 has no numpy type).
ELEMENT_TYPES = {
    "FLOAT": np.float32, "DOUBLE": np.float64, "FLOAT16": np.float16, "BOOL": np.bool_,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "STRING": np.object_,
}
EMPTY_SHAPES = [(0, 3), (1, 0), (0, 0)]
KEY_PREFIX = f"edgecow-zero-{os.getpid()}-"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zero") / "models"
    for element in ELEMENT_TYPES:
        models.write_model(root, f"pair_{element.lower()}", 1, models.identity_model(getattr(TensorProto, element),
                                                                                       ["a", "b"]))
    models.write_model(root, "detector", 1, models.detector_model())
    models.write_model(root, "static_empty", 1, models.scale_model(shape=[0, 3], factor=2.0))
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serving(repo, tmp_path_factory.mktemp("srv"))


@pytest.fixture(scope="module")
def laneless_server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Without the local lane, EdgeClient's shared-memory calls go over gRPC."""
    yield from serving(repo, tmp_path_factory.mktemp("srv"), "--no-local-lane")


@pytest.fixture
def triton(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(f"unix://{server.socket}")
    yield client
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    client.close()
    assert not [name for name in os.listdir(SHM_DIR) if name.startswith(KEY_PREFIX)]


def _empty(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def _reference(repo: Path, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _nothing_found() -> dict[str, np.ndarray]:
    """Detector inputs that find nothing: every score under the threshold, and no top-k asked for."""
    return {
        "boxes": np.arange(12, dtype=np.float32).reshape(4, 3),
        "scores": np.full(4, 0.25, dtype=np.float32),
        "k": np.array([0], dtype=np.int64),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        assert got[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(got[name], expected)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
@pytest.mark.parametrize("element", list(ELEMENT_TYPES))
def test_empty_tensors_of_every_datatype_round_trip_with_edgeclient(
    server: ServerProcess, transport: str, element: str
) -> None:
    dtype = ELEMENT_TYPES[element]
    with EdgeClient(server.unix_target, transport=transport) as client:
        assert client.transport == transport
        # Three rounds: over shared memory the first teaches the client the output's size (none), and the
        # later ones give the server a zero-byte output slot to write into.
        for _ in range(3):
            for shape in EMPTY_SHAPES:
                y = client.infer(f"pair_{element.lower()}", {"x": _empty(shape, dtype)})["y"]
                assert y.shape == shape and y.dtype == np.dtype(dtype)
        # A non-empty call on the same model still works after the empty ones.
        x = random_array((2, 3), np.dtype(dtype).name if dtype is not np.object_ else "object")
        np.testing.assert_array_equal(client.infer(f"pair_{element.lower()}", {"x": x})["y"], x)


@pytest.mark.parametrize("element", ["FLOAT", "FLOAT16", "BOOL", "STRING", "UINT64"])
def test_empty_tensors_over_shared_memory_without_the_lane(laneless_server: ServerProcess, element: str) -> None:
    dtype = ELEMENT_TYPES[element]
    with EdgeClient(laneless_server.unix_target, transport="shm") as client:
        for _ in range(2):
            for shape in EMPTY_SHAPES:
                with client.infer(f"pair_{element.lower()}", {"x": _empty(shape, dtype)}, zero_copy=True) as out:
                    assert out["y"].shape == shape and out["y"].dtype == np.dtype(dtype)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_detector_that_finds_nothing(server: ServerProcess, repo: Path, transport: str) -> None:
    feeds = _nothing_found()
    want = _reference(repo, "detector", feeds)
    assert want["kept"].shape == (0, 3) and want["hit_index"].shape == (1, 0) and want["top_index"].shape == (0,)
    with EdgeClient(server.unix_target, transport=transport) as client:
        for _ in range(3):  # over shm: output sizes learned from the first call are zero-byte slots after it
            _assert_same(client.infer("detector", feeds), want)
        # A batch of zero boxes finds nothing as well.
        empty = {"boxes": np.empty((0, 3), np.float32), "scores": np.empty(0, np.float32), "k": feeds["k"]}
        _assert_same(client.infer("detector", empty), _reference(repo, "detector", empty))
        # And the same client still finds what is there.
        some = {**feeds, "scores": np.array([0.9, 0.1, 0.7, 0.2], np.float32), "k": np.array([2], np.int64)}
        _assert_same(client.infer("detector", some), _reference(repo, "detector", some))


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_model_declaring_a_zero_dimension(server: ServerProcess, transport: str) -> None:
    """Its output's size (none) is known before the run: onnxruntime is bound to a zero-byte slot."""
    with EdgeClient(server.unix_target, transport=transport) as client:
        meta = client.metadata("static_empty")
        assert meta["inputs"][0]["shape"] == [0, 3] and meta["outputs"][0]["shape"] == [0, 3]
        for _ in range(2):
            y = client.infer("static_empty", {"x": np.empty((0, 3), np.float32)})["y"]
            assert y.shape == (0, 3) and y.dtype == np.float32


def test_typed_contents_with_no_values(server: ServerProcess) -> None:
    """A client that sends typed contents has no value to put in them for an empty tensor, so the
    tensor arrives with no data at all; an empty `contents` message is the same thing."""
    with grpc.insecure_channel(f"unix:{server.socket}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for element, v2 in (("FLOAT", "FP32"), ("FLOAT16", "FP16"), ("STRING", "BYTES"), ("BOOL", "BOOL")):
            request = pb.ModelInferRequest(model_name=f"pair_{element.lower()}")
            request.inputs.add(name="x", datatype=v2, shape=[0, 3])
            response = stub.ModelInfer(request)
            assert list(response.outputs[0].shape) == [0, 3] and response.outputs[0].datatype == v2
            assert list(response.raw_output_contents) == [b""]
        request = pb.ModelInferRequest(model_name="detector")
        request.inputs.add(name="boxes", datatype="FP32", shape=[0, 3]).contents.SetInParent()
        request.inputs.add(name="scores", datatype="FP32", shape=[0])
        request.inputs.add(name="k", datatype="INT64", shape=[1]).contents.int64_contents.append(0)
        response = stub.ModelInfer(request)
        shapes = {o.name: list(o.shape) for o in response.outputs}
        assert shapes == {"kept": [0, 3], "hit_index": [1, 0], "top_scores": [0], "top_index": [0]}
        # Data is still required where the shape has elements.
        request = pb.ModelInferRequest(model_name="pair_float")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
        with pytest.raises(grpc.RpcError) as missing:
            stub.ModelInfer(request)
        assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no data" in missing.value.details()


def test_raw_contents_for_an_empty_tensor_must_be_empty(server: ServerProcess) -> None:
    with grpc.insecure_channel(f"unix:{server.socket}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="pair_float", raw_input_contents=[b"\0\0\0\0"])
        request.inputs.add(name="x", datatype="FP32", shape=[0, 3])
        with pytest.raises(grpc.RpcError) as extra:
            stub.ModelInfer(request)
        assert extra.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 0" in extra.value.details()
        request.raw_input_contents[0] = b""
        assert list(stub.ModelInfer(request).outputs[0].shape) == [0, 3]


@pytest.mark.parametrize("element", list(ELEMENT_TYPES))
def test_tritonclient_empty_tensors_in_the_request(triton: grpcclient.InferenceServerClient, element: str) -> None:
    dtype = ELEMENT_TYPES[element]
    v2 = datatypes.from_numpy(np.dtype(dtype)).name
    for shape in EMPTY_SHAPES:
        inp = grpcclient.InferInput("x", list(shape), v2)
        inp.set_data_from_numpy(_empty(shape, dtype))
        result = triton.infer(f"pair_{element.lower()}", [inp])
        y = result.as_numpy("y")
        assert y.shape == shape and result.get_output("y").datatype == v2


def test_tritonclient_detector_finds_nothing_through_shared_memory(
    triton: grpcclient.InferenceServerClient, repo: Path
) -> None:
    """Zero-byte input and output references, each at an offset inside its region (one at the very end)."""
    feeds = _nothing_found()
    want = _reference(repo, "detector", feeds)
    size = 4096
    handle = triton_shm.create_shared_memory_region("zero", f"/{KEY_PREFIX}zero", size)
    try:
        triton_shm.set_shared_memory_region(handle, [feeds["boxes"]], offset=0)
        triton_shm.set_shared_memory_region(handle, [feeds["scores"]], offset=64)
        triton_shm.set_shared_memory_region(handle, [feeds["k"]], offset=128)
        triton.register_system_shared_memory("zero", f"/{KEY_PREFIX}zero", size)
        inputs = []
        for (name, array), offset in zip(feeds.items(), (0, 64, 128)):
            inp = grpcclient.InferInput(name, list(array.shape), triton_utils.np_to_triton_dtype(array.dtype))
            inp.set_shared_memory("zero", array.nbytes, offset=offset)
            inputs.append(inp)
        slots = {"kept": 1024, "hit_index": 2048, "top_scores": 3000, "top_index": size}
        outputs = []
        for name, offset in slots.items():
            out = grpcclient.InferRequestedOutput(name)
            out.set_shared_memory("zero", 0, offset=offset)
            outputs.append(out)
        result = triton.infer("detector", inputs, outputs=outputs)
        assert list(result.get_response().raw_output_contents) == [b""] * 4
        for name, expected in want.items():
            tensor = result.get_output(name)
            assert tuple(tensor.shape) == expected.shape
            assert tensor.datatype == datatypes.from_numpy(expected.dtype).name
            got = triton_shm.get_contents_as_numpy(
                handle, triton_utils.triton_to_np_dtype(tensor.datatype), tensor.shape, offset=slots[name]
            )
            np.testing.assert_array_equal(got, expected)

        # A batch of zero boxes: zero-byte input references too.
        empty = [grpcclient.InferInput("boxes", [0, 3], "FP32"), grpcclient.InferInput("scores", [0], "FP32"),
                 grpcclient.InferInput("k", [1], "INT64")]
        empty[0].set_shared_memory("zero", 0, offset=size)
        empty[1].set_shared_memory("zero", 0, offset=100)
        empty[2].set_shared_memory("zero", 8, offset=128)
        result = triton.infer("detector", empty, outputs=outputs)
        assert [list(result.get_output(n).shape) for n in slots] == [[0, 3], [1, 0], [0], [0]]

        # A zero-byte reference past the region's end is still outside it.
        late = grpcclient.InferRequestedOutput("kept")
        late.set_shared_memory("zero", 0, offset=size + 1)
        with pytest.raises(triton_utils.InferenceServerException) as outside:
            triton.infer("detector", inputs, outputs=[late])
        assert outside.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        triton.unregister_system_shared_memory()
        triton_shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("element", ["FLOAT16", "STRING", "BOOL", "INT8"])
def test_tritonclient_empty_outputs_into_shared_memory(triton: grpcclient.InferenceServerClient, element: str) -> None:
    dtype = ELEMENT_TYPES[element]
    v2 = datatypes.from_numpy(np.dtype(dtype)).name
    key = f"/{KEY_PREFIX}out-{element.lower()}"
    handle = triton_shm.create_shared_memory_region("out", key, 64)
    try:
        triton.register_system_shared_memory("out", key, 64)
        for shape in EMPTY_SHAPES:
            inp = grpcclient.InferInput("x", list(shape), v2)
            inp.set_data_from_numpy(_empty(shape, dtype))
            out = grpcclient.InferRequestedOutput("y")
            out.set_shared_memory("out", 0, offset=32)
            result = triton.infer(f"pair_{element.lower()}", [inp], outputs=[out])
            assert tuple(result.get_output("y").shape) == shape
            assert list(result.get_response().raw_output_contents) == [b""]
    finally:
        triton.unregister_system_shared_memory()
        triton_shm.destroy_shared_memory_region(handle)


def test_tritonclient_stream_answers_empty_outputs(triton: grpcclient.InferenceServerClient, repo: Path) -> None:
    feeds = _nothing_found()
    want = _reference(repo, "detector", feeds)
    answers: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        inputs = []
        for name, array in feeds.items():
            inp = grpcclient.InferInput(name, list(array.shape), triton_utils.np_to_triton_dtype(array.dtype))
            inp.set_data_from_numpy(array)
            inputs.append(inp)
        triton.async_stream_infer("detector", inputs, request_id="nothing")
        result, error = answers.get(timeout=30)
    finally:
        triton.stop_stream()
    assert error is None
    for name, expected in want.items():
        got = result.as_numpy(name)
        assert got.shape == expected.shape and got.dtype == expected.dtype
