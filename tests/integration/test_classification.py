"""The classification extension through tritonclient: an output asked for with class_count=k comes back
as its top k entries, "score:index[:label]" BYTES, per batch row when the model batches.

    pytest tests/integration/test_classification.py

Real server process, models built with onnx.helper, labels files in the models' directories.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support import models
from tests.support.processes import ServerProcess, serving
from tests.support.triton import triton_client

LABELS = ["cat", "dog", "", "bird", "fish"]  # class 2 has an empty line: no label, as Triton
KEY_PREFIX = f"edgecow-cls-{os.getpid()}-"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classification") / "models"
    # Batching (every tensor is [-1, 5], so max_batch_size is 4 without a config): ranked per row.
    models.write_model(root, "animals", 1, models.identity_model(TensorProto.FLOAT, ["batch", 5]),
                       config='labels = "labels/animals.txt"\n')
    (root / "animals" / "labels").mkdir()
    (root / "animals" / "labels" / "animals.txt").write_text("\n".join(LABELS) + "\n")
    # Not batching: ranked over every element, whatever the rank.
    models.write_model(root, "grid", 1, models.identity_model(TensorProto.FLOAT, [2, 3]))
    for dtype in ("INT8", "UINT64", "INT64", "DOUBLE"):
        models.write_model(root, f"flat_{dtype.lower()}", 1,
                           models.identity_model(getattr(TensorProto, dtype), [6]))
    models.write_model(root, "strings", 1, models.string_model())
    # Labels for one named output only.
    models.write_model(root, "two_outputs", 1, models.add_sub_model(shape=[1, 4]),
                       config='[labels]\ndiff = "diff.txt"\n')
    (root / "two_outputs" / "diff.txt").write_text("w\r\nx\r\ny\r\nz\r\n")  # CRLF lines are read as lines
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serving(repo, tmp_path_factory.mktemp("srv"))


@pytest.fixture
def triton(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    yield from triton_client(server)


def _expected(values: np.ndarray, k: int, labels: list[str] = ()) -> list[bytes]:
    """Triton's strings for one ranked row: highest first, equal values in index order."""
    flat = values.reshape(-1)
    order = sorted(range(flat.size), key=lambda i: (-flat[i].item(), i))[:k]
    out = []
    for index in order:
        value = flat[index]
        score = f"{float(value):f}" if flat.dtype.kind == "f" else str(int(value))
        label = labels[index] if index < len(labels) and labels[index] else ""
        out.append(f"{score}:{index}{':' + label if label else ''}".encode())
    return out


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_batching_model_ranks_each_row_with_its_labels(triton: grpcclient.InferenceServerClient) -> None:
    scores = np.array([[0.1, 0.7, 0.05, 0.9, 0.3], [0.5, 0.5, 0.9, 0.0, 0.2], [3, 1, 4, 1, 5]], np.float32)
    result = triton.infer("animals", [_input("x", scores, "FP32")],
                          outputs=[grpcclient.InferRequestedOutput("y", class_count=3)])
    tensor = result.get_output("y")
    assert tensor.datatype == "BYTES" and list(tensor.shape) == [3, 3]
    got = result.as_numpy("y")
    for row in range(3):
        assert list(got[row]) == _expected(scores[row], 3, LABELS)
    # Row 1: classes 0 and 1 tie at 0.5, so the lower index comes first; class 2's label line is empty.
    assert list(got[1]) == [b"0.900000:2", b"0.500000:0:cat", b"0.500000:1:dog"]


def test_k_larger_than_the_classes_returns_them_all(triton: grpcclient.InferenceServerClient) -> None:
    scores = np.array([[0.2, 0.1, 0.4, 0.3, 0.0]], np.float32)
    result = triton.infer("animals", [_input("x", scores, "FP32")],
                          outputs=[grpcclient.InferRequestedOutput("y", class_count=100)])
    assert result.as_numpy("y").shape == (1, 5)
    assert list(result.as_numpy("y")[0]) == _expected(scores[0], 100, LABELS)


def test_a_model_that_does_not_batch_is_ranked_over_all_its_elements(
    triton: grpcclient.InferenceServerClient,
) -> None:
    grid = np.array([[1.5, -2.0, 8.25], [0.0, 8.25, 3.0]], np.float32)
    result = triton.infer("grid", [_input("x", grid, "FP32")],
                          outputs=[grpcclient.InferRequestedOutput("y", class_count=4)])
    assert list(result.get_output("y").shape) == [4]
    assert list(result.as_numpy("y")) == _expected(grid, 4)
    assert list(result.as_numpy("y"))[:2] == [b"8.250000:2", b"8.250000:4"]


@pytest.mark.parametrize(
    ("model", "datatype", "values"),
    [
        ("flat_int8", "INT8", np.array([-128, 127, 0, -1, 5, 127], np.int8)),
        ("flat_uint64", "UINT64", np.array([0, 2**64 - 1, 7, 2**63, 1, 7], np.uint64)),
        ("flat_int64", "INT64", np.array([-(2**63), 2**63 - 1, 0, -5, 5, 0], np.int64)),
        ("flat_double", "FP64", np.array([0.125, -1e300, np.inf, 1e-9, 3.0, -np.inf], np.float64)),
    ],
)
def test_scores_print_as_triton_prints_them(
    triton: grpcclient.InferenceServerClient, model: str, datatype: str, values: np.ndarray
) -> None:
    """Integers as integers (no rounding through a float), floating types as C's "%f"."""
    result = triton.infer(model, [_input("x", values, datatype)],
                          outputs=[grpcclient.InferRequestedOutput("y", class_count=6)])
    assert list(result.as_numpy("y")) == _expected(values, 6)


def test_labels_apply_to_the_output_they_name_only(triton: grpcclient.InferenceServerClient) -> None:
    a = np.array([[1, 2, 3, 4]], np.float32)
    b = np.array([[4, 1, 1, 1]], np.float32)
    result = triton.infer(
        "two_outputs", [_input("a", a, "FP32"), _input("b", b, "FP32")],
        outputs=[grpcclient.InferRequestedOutput("sum", class_count=2),
                 grpcclient.InferRequestedOutput("diff", class_count=2)],
    )
    assert list(result.as_numpy("sum")) == _expected(a + b, 2)
    assert list(result.as_numpy("diff")) == _expected(a - b, 2, ["w", "x", "y", "z"])
    assert list(result.as_numpy("diff")) == [b"3.000000:3:z", b"2.000000:2:y"]


def test_classified_and_plain_outputs_in_one_request(triton: grpcclient.InferenceServerClient) -> None:
    a = np.array([[1, 2, 3, 4]], np.float32)
    b = np.ones((1, 4), np.float32)
    result = triton.infer(
        "two_outputs", [_input("a", a, "FP32"), _input("b", b, "FP32")],
        outputs=[grpcclient.InferRequestedOutput("sum"), grpcclient.InferRequestedOutput("diff", class_count=1)],
    )
    assert np.array_equal(result.as_numpy("sum"), a + b)
    assert list(result.as_numpy("diff")) == [b"3.000000:3:z"]


def test_classification_on_a_stream(triton: grpcclient.InferenceServerClient) -> None:
    scores = np.array([[0.3, 0.1, 0.6, 0.2, 0.0]], np.float32)
    answers: list = []
    triton.start_stream(callback=lambda result, error: answers.append((result, error)))
    try:
        triton.async_stream_infer("animals", [_input("x", scores, "FP32")],
                                  outputs=[grpcclient.InferRequestedOutput("y", class_count=2)])
    finally:
        triton.stop_stream()  # waits for the answers in flight
    ((result, error),) = answers
    assert error is None
    assert list(result.as_numpy("y")[0]) == [b"0.600000:2", b"0.300000:0:cat"]


def test_inputs_in_shared_memory_with_a_classified_output(
    triton: grpcclient.InferenceServerClient,
) -> None:
    scores = np.array([[0.1, 0.9, 0.3, 0.2, 0.4], [0.9, 0.1, 0.3, 0.2, 0.4]], np.float32)
    key = f"/{KEY_PREFIX}in"
    handle = shm.create_shared_memory_region("cls_in", key, scores.nbytes)
    try:
        shm.set_shared_memory_region(handle, [scores])
        triton.register_system_shared_memory("cls_in", key, scores.nbytes)
        tensor = grpcclient.InferInput("x", list(scores.shape), "FP32")
        tensor.set_shared_memory("cls_in", scores.nbytes)
        result = triton.infer("animals", [tensor], outputs=[grpcclient.InferRequestedOutput("y", class_count=1)])
        assert [list(row) for row in result.as_numpy("y")] == [[b"0.900000:1:dog"], [b"0.900000:0:cat"]]
    finally:
        triton.unregister_system_shared_memory("cls_in")
        shm.destroy_shared_memory_region(handle)


# -- refusals ------------------------------------------------------------------------------------------
@pytest.fixture
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.unix_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(model: str, output: str, **params: pb.InferParameter) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 5])
    request.raw_input_contents.append(np.arange(5, dtype=np.float32).tobytes())
    wanted = request.outputs.add(name=output)
    for key, value in params.items():
        wanted.parameters[key].CopyFrom(value)
    return request


def _refused(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details()


def test_classification_with_a_shared_memory_output_is_refused_as_triton_does(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    # tritonclient refuses this before sending; another client may not, and the server must say why.
    request = _request(
        "animals", "y", classification=pb.InferParameter(int64_param=2),
        shared_memory_region=pb.InferParameter(string_param="nowhere"),
        shared_memory_byte_size=pb.InferParameter(int64_param=64),
    )
    message = _refused(stub, request)
    assert "shared_memory_region" in message and "classification" in message


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (pb.InferParameter(int64_param=0), "at least 1"),
        (pb.InferParameter(int64_param=-3), "classification"),
        (pb.InferParameter(string_param="3"), "integer"),
        (pb.InferParameter(double_param=2.0), "integer"),
    ],
)
def test_a_class_count_that_is_not_a_positive_integer_is_refused(
    stub: pb_grpc.GRPCInferenceServiceStub, value: pb.InferParameter, words: str
) -> None:
    assert words in _refused(stub, _request("animals", "y", classification=value))


def test_an_output_that_cannot_be_ranked_is_refused(triton: grpcclient.InferenceServerClient) -> None:
    text = np.array([b"b", b"a"], dtype=object)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("strings", [_input("text", text, "BYTES")],
                     outputs=[grpcclient.InferRequestedOutput("echo", class_count=1)])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "BYTES" in caught.value.message() and "classification" in caught.value.message()
    # The same output without the parameter is served as before.
    result = triton.infer("strings", [_input("text", text, "BYTES")], outputs=[grpcclient.InferRequestedOutput("echo")])
    assert list(result.as_numpy("echo")) == [b"b", b"a"]
