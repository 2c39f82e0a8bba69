"""Models with outputs the v2 protocol cannot carry (skl2onnx's ZipMap, SplitToSequence, Optional) load
and serve their tensor outputs; asking for the others is refused with a message that names them. A model
whose inputs are not tensors is refused at load, once, naming them.

    pytest tests/integration/test_nontensor_outputs.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shm_client import EdgeClient, EdgecowError
from tests.support import models
from tests.support.processes import ServerProcess, serving
from tests.support.triton import triton_client


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nontensor") / "models"
    models.write_model(root, "iris", 1, models.zipmap_model(), config="warmup = true\n")
    models.write_model(root, "sequences", 1, models.sequence_outputs_model())
    models.write_model(root, "takes_sequence", 1, models.sequence_input_model())
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serving(repo, tmp_path_factory.mktemp("srv"))


@pytest.fixture
def triton(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    yield from triton_client(server)


FEATURES = np.array([[5.1, 3.5, 1.4], [0.2, 7.0, 3.2], [6.3, 3.3, 6.0]], np.float32)


def _features() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("float_input", list(FEATURES.shape), "FP32")
    tensor.set_data_from_numpy(FEATURES)
    return tensor


def _refusal(triton: grpcclient.InferenceServerClient, model: str, inputs: list, output: str) -> str:
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(output)])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    return caught.value.message()


def test_a_zipmap_classifier_serves_its_label(triton: grpcclient.InferenceServerClient, repo: Path) -> None:
    expected = ort.InferenceSession(str(repo / "iris" / "1" / "model.onnx")).run(
        ["output_label"], {"float_input": FEATURES}
    )[0]
    # No outputs named: the tensor outputs, and only those.
    result = triton.infer("iris", [_features()])
    assert [o.name for o in result.get_response().outputs] == ["output_label"]
    assert np.array_equal(result.as_numpy("output_label"), expected)
    named = triton.infer("iris", [_features()], outputs=[grpcclient.InferRequestedOutput("output_label")])
    assert np.array_equal(named.as_numpy("output_label"), expected)


def test_asking_for_the_zipmap_says_what_to_do(triton: grpcclient.InferenceServerClient) -> None:
    message = _refusal(triton, "iris", [_features()], "output_probability")
    assert "'output_probability'" in message and "seq(map(int64,tensor(float)))" in message
    assert "zipmap" in message.lower() and "False" in message  # skl2onnx's option to get a tensor instead
    assert "output_label" in message  # what can be asked for


def test_metadata_and_config_list_the_tensor_outputs(triton: grpcclient.InferenceServerClient) -> None:
    metadata = triton.get_model_metadata("iris", as_json=True)
    assert [o["name"] for o in metadata["outputs"]] == ["output_label"]
    assert metadata["outputs"][0]["datatype"] == "INT64"
    config = triton.get_model_config("iris", as_json=True)["config"]
    assert [o["name"] for o in config["output"]] == ["output_label"]


def test_sequence_and_optional_outputs_are_refused_by_name(triton: grpcclient.InferenceServerClient) -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    tensor = grpcclient.InferInput("x", [3, 2], "FP32")
    tensor.set_data_from_numpy(x)
    for name, kind in (("parts", "seq(tensor(float))"), ("maybe", "optional(tensor(float))")):
        message = _refusal(triton, "sequences", [tensor], name)
        assert f"'{name}'" in message and kind in message and "y" in message and "zipmap" not in message.lower()
    result = triton.infer("sequences", [tensor])
    assert [o.name for o in result.get_response().outputs] == ["y"]
    assert np.array_equal(result.as_numpy("y"), x)


def test_shared_memory_callers_get_the_tensor_outputs_too(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target) as client:
        assert client.transport == "shm"
        result = client.infer("iris", {"float_input": FEATURES})
        assert list(result) == ["output_label"]
        with pytest.raises(EdgecowError, match="output_probability"):
            client.infer("iris", {"float_input": FEATURES}, outputs=["output_probability"])


def test_a_model_with_a_sequence_input_is_refused_naming_it(
    triton: grpcclient.InferenceServerClient, server: ServerProcess
) -> None:
    index = {m["name"]: m for m in triton.get_model_repository_index(as_json=True)["models"]}
    assert index["takes_sequence"]["state"] == "UNAVAILABLE"
    assert "'items'" in index["takes_sequence"]["reason"] and "seq(tensor(float))" in index["takes_sequence"]["reason"]
    assert index["iris"]["state"] == "READY" and index["sequences"]["state"] == "READY"
    refusals = [line for line in server.lines if "takes_sequence" in line and "'items'" in line]
    assert len(refusals) == 1, refusals  # logged once
    assert not any("has no v2 datatype" in line for line in server.lines)
